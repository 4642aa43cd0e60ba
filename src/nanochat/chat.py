"""`python -m nanochat.chat ckpt=<run or export dir> [-p "prompt"]`: chat with a model in the terminal.

See nanochat.serving.chat_cli for the commands and options.
"""

from nanochat.serving.chat_cli import main

if __name__ == "__main__":
    main()
