"""Stage 2 memory training: a kNN-LM datastore over the model's hidden states.

    python -m hmst.training.memory_train --checkpoint checkpoints/micro/best \\
        --output checkpoints/micro/knn \\
        [--data data/tinyshakespeare.txt] [--val-split 0.1]

Builds the datastore from the training split (the same tail split as train.py), tunes
k, temperature and lam on one part of the held-out split (--protocol), prints held-out
perplexity on the rest without and with memory, and writes DIR/datastore/ and
DIR/knn_params.json. The logic lives in `hmst.memory.knnlm`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PROG = "memory_train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="model checkpoint directory")
    p.add_argument("--output", required=True, help="directory for datastore + params")
    p.add_argument("--data", default="data/tinyshakespeare.txt", help="text corpus")
    p.add_argument("--val-split", type=float, default=0.1, help="held-out tail")
    p.add_argument(
        "--tune-fraction", type=float, default=0.5,
        help="leading part of the held-out split used to tune k, T, lam",
    )  # fmt: skip
    p.add_argument(
        "--protocol", default="contiguous", choices=("contiguous", "interleaved"),
        help="tune/test split of the held-out part (see knnlm.heldout_partition)",
    )  # fmt: skip
    p.add_argument(
        "--key", default="final",
        help="key: final | prenorm | ffn_input | block<i> (residual after block i)",
    )  # fmt: skip
    p.add_argument("--metric", default="l2", choices=("l2", "ip"))
    p.add_argument("--index", default="flat", choices=("flat", "ivf"))
    p.add_argument("--k", type=int, default=4096, help="largest k tried")
    p.add_argument("--stride", type=int, default=None, help="default seq_len / 2")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    return p


def fail(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if not os.path.exists(args.data):
        fail(f"corpus not found: {args.data}")
    if not 0.0 < args.val_split < 1.0:
        fail(f"--val-split must be in (0, 1), got {args.val_split}")
    import faiss
    import torch

    from hmst.memory.knnlm import run_memory_training

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
        faiss.omp_set_num_threads(args.num_threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    try:
        r = run_memory_training(
            args.checkpoint,
            args.output,
            args.data,
            val_split=args.val_split,
            tune_fraction=args.tune_fraction,
            protocol=args.protocol,
            key_type=args.key,
            metric=args.metric,
            index_type=args.index,
            k_max=args.k,
            stride=args.stride,
            batch_size=args.batch_size,
            device=device,
        )
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    p = r["params"]
    print(
        f"datastore {r['datastore_size']:,} entries | tuned on {r['tune_ppl_lm']:.2f}"
        f" -> {r['tune_ppl_knn']:.2f}: k {p['k']}, T {p['temperature']:.4g},"
        f" lam {p['lam']}"
    )
    print(f"held-out test ppl without memory: {r['test_ppl_lm']:.3f}")
    print(
        f"held-out test ppl with memory:    {r['test_ppl_knn']:.3f} "
        f"({100 * r['test_gain']:.1f}% lower, {r['test_tokens']:,} tokens)"
    )
    print(
        f"wrote {args.output}/datastore and knn_params.json in {time.time() - t0:.0f}s"
    )
    return r


if __name__ == "__main__":
    main()
