"""Quality at equal compute: hmst vs HF transformers Mixtral at the same config, trained
by the same loop (bench/common.py `Trainee`) for the same process-CPU-time budget.

The micro config, the bundled corpus (tokenizer trained on the first 90%), validation
bits-per-byte on the held-out last 10%. The default budget, 1200 CPU-seconds at 1
thread, is the compute of the README's main job (10 minutes on 2 cores); the two peers
are trained step by step in turn so that machine noise hits both alike, and each plans
its cosine schedule from its own measured step cost.

    python bench/bench_quality.py [--cpu-seconds 1200] [--threads 1]
"""

import argparse
import json
import sys

import torch

from common import (
    Trainee,
    build_mixtral,
    evaluate_bpb,
    hmst_loss,
    mixtral_logits,
    mixtral_loss,
    prepare_corpus,
    train_interleaved,
)
from hmst.configs.model_config import get_micro_config
from hmst.models.base_moe import BaseMoEModel


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-seconds", type=float, default=1200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--hf-impl", default="grouped_mm")
    args = p.parse_args()
    print("command: python " + " ".join(sys.argv), flush=True)
    torch.set_num_threads(args.threads)
    cfg = get_micro_config().model
    tok, train, val = prepare_corpus(cfg.vocab_size)
    torch.manual_seed(0)
    hmst = BaseMoEModel(config=cfg)
    torch.manual_seed(0)
    hf = build_mixtral(cfg, args.hf_impl)
    kw = dict(batch=args.batch, lr=args.lr, warmup=args.warmup)
    peers = [
        Trainee("hmst", hmst, hmst_loss, train, cfg, **kw),
        Trainee(f"hf-mixtral {args.hf_impl}", hf, mixtral_loss, train, cfg, **kw),
    ]
    runs = train_interleaved(peers, cpu_seconds=args.cpu_seconds)
    res = {}
    for tr, fn in zip(
        peers, (lambda x: hmst(x)["logits"], lambda x: mixtral_logits(hf, x))
    ):
        ev, _ = evaluate_bpb(fn, tok, val, cfg.max_seq_len)
        res[tr.name] = {**runs[tr.name], **ev}
    print(f"\nbudget {args.cpu_seconds:.0f} CPU-s each, {args.threads} thread(s), "
          f"batch {args.batch} x {cfg.max_seq_len}, lr {args.lr}")  # fmt: skip
    print(f"{'peer':<24}{'steps':>7}{'cpu s':>8}{'val loss':>10}{'val ppl':>9}"
          f"{'val bpb':>9}")  # fmt: skip
    for name, r in res.items():
        print(f"{name:<24}{r['steps']:>7}{r['cpu_s']:>8.0f}{r['val_loss']:>10.4f}"
              f"{r['val_ppl']:>9.2f}{r['val_bpb']:>9.4f}")  # fmt: skip
    a, b = res["hmst"], res[peers[1].name]
    print(f"\nhmst bpb {a['val_bpb']:.4f} vs {peers[1].name} {b['val_bpb']:.4f}: "
          f"ratio {a['val_bpb'] / b['val_bpb']:.3f} (<= 1 is better) "
          f"{'PASS' if a['val_bpb'] <= b['val_bpb'] else 'FAIL'}; "
          f"target bpb <= 2.4 {'PASS' if a['val_bpb'] <= 2.4 else 'FAIL'}")  # fmt: skip
    print(json.dumps(res))


if __name__ == "__main__":
    main()
