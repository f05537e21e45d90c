"""Pretrain HMST. See `python train.py --help` and README.md."""

import sys

from hmst.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
