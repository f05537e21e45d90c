"""End-to-end tour of a trained HMST checkpoint. See `python demo.py --help`."""

import sys

from hmst.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
