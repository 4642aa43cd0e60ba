"""`python -m nanochat.chat ckpt=<run or export dir> [-p "prompt"]`: chat with a model in the terminal.

See nanochat.serving.cli for the commands and options.
"""

from nanochat.serving.cli import main

if __name__ == "__main__":
    main()
