"""`python serve.py ckpt=<run dir or export dir>`: the same as `nanochat serve ...`, from a checkout."""

import sys

from nanochat.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
