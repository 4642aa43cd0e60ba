"""`python train.py stage=base model=d20 trainer=8xh100`: the same as `nanochat train ...`, from a checkout."""

import sys

from nanochat.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
