"""`python -m nanochat <verb> ...` is the `nanochat` command (torchrun launches it this way: `-m nanochat train`)."""

from nanochat.cli import main

if __name__ == "__main__":
    main()
