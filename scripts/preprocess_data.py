"""Pre-tokenize text into uint16/uint32 shards + manifest (see hmst/data.py).

    python scripts/preprocess_data.py --input data/tinyshakespeare.txt \
        --output data/tokenized/train \
        [--tokenizer-path CKPT_OR_JSON | --vocab-size 4096]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hmst.data import preprocess, read_documents  # noqa: E402
from hmst.tokenizer import HMSTTokenizer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--input", nargs="+", required=True, help="text files or directories"
    )
    p.add_argument(
        "--output", required=True, help="output directory (replaced atomically)"
    )
    tok = p.add_mutually_exclusive_group()
    tok.add_argument(
        "--tokenizer-path", help="tokenizer.json or a checkpoint directory"
    )
    tok.add_argument(
        "--vocab-size", type=int, default=4096, help="train a new tokenizer"
    )
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    args = p.parse_args(argv)
    try:
        t0 = time.time()
        if args.tokenizer_path:
            tokenizer = HMSTTokenizer.load(args.tokenizer_path)
        else:
            tokenizer = HMSTTokenizer.train(read_documents(args.input), args.vocab_size)
        m = preprocess(args.input, args.output, tokenizer, args.shard_tokens)
    except (ValueError, OSError) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {m['num_tokens']:,} tokens ({m['dtype']}, {len(m['shards'])} shard(s), "
        f"vocab {m['vocab_size']}, tokenizer {m['tokenizer_hash']}) to {args.output} "
        f"in {time.time() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
