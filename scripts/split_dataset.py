"""Split a pre-tokenized directory into train and validation sets, deterministically.

    python scripts/split_dataset.py [--input data/tokenized/train] \
        [--train-output data/tokenized/train_split] [--val-output data/tokenized/val] \
        [--val-fraction 0.1] [--seed 0]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hmst.data import split_pretokenized  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default="data/tokenized/train")
    p.add_argument("--train-output", default="data/tokenized/train_split")
    p.add_argument("--val-output", default="data/tokenized/val")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-tokens", type=int, default=2048)
    args = p.parse_args(argv)
    try:
        tm, vm = split_pretokenized(
            args.input,
            args.train_output,
            args.val_output,
            args.val_fraction,
            args.seed,
            args.block_tokens,
        )
    except (ValueError, OSError) as e:
        print(f"split_dataset.py: error: {e}", file=sys.stderr)
        return 2
    print(
        f"train: {tm['num_tokens']:,} tokens -> {args.train_output}; "
        f"val: {vm['num_tokens']:,} tokens -> {args.val_output} (seed {args.seed})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
