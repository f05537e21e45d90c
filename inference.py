"""Generate with a trained HMST checkpoint. See `python inference.py --help`."""

import sys

from hmst.cli.inference import main

if __name__ == "__main__":
    sys.exit(main())
