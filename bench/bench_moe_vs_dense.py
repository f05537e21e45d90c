"""Do the experts pay for themselves? The micro MoE (8 experts, top-2) vs a dense model
of equal active size (one SwiGLU of width top_k * d_ff per block: the same active
parameters and FLOPs per token), trained by the same loop on the same batches for the
same number of tokens. Reports held-out perplexity and the MoE's expert load on the
validation text (per layer: max/mean load, smallest expert share).

Targets (issue #2): MoE val perplexity >= 5% lower; max/mean <= 1.5 and no expert under
2% of tokens in every layer.

    python bench/bench_moe_vs_dense.py [--steps 200] [--threads 1] [--balance-bias RATE]
                                     [--seed 0] [--dropout P] [--corpus FILE]
                                     [--gate-scale S] [--only moe|dense]
                                     [--set model.FIELD=VALUE ...]
"""

import argparse
import dataclasses
import json
import sys

import torch

from common import (
    Trainee,
    build_dense,
    evaluate_bpb,
    expert_counts_fn,
    hmst_loss,
    load_stats,
    prepare_corpus,
    train_interleaved,
)
from hmst.configs.model_config import apply_overrides, get_micro_config
from hmst.models.base_moe import BaseMoEModel


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="weight init seed (the batches' is 1337 + seed); both models share both",
    )
    p.add_argument(
        "--balance-bias",
        type=float,
        metavar="RATE",
        help="the MoE's balance_bias_rate (auxiliary-loss-free balancing; default: "
        "the micro preset's)",
    )
    p.add_argument("--corpus", help="text file to train and validate on (last 10%%: "
                   "validation; default: the bundled tinyshakespeare)")  # fmt: skip
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout of both models (ModelConfig.dropout)")  # fmt: skip
    p.add_argument(
        "--gate-scale",
        type=float,
        help="the MoE's gate_scale (default: the micro preset's)",
    )
    p.add_argument(
        "--only",
        choices=("moe", "dense"),
        help="train one model only (to explore; the claim needs both)",
    )
    p.add_argument("--set", action="append", default=[], metavar="model.FIELD=VALUE",
                   help="override a field of the micro config (repeatable), e.g. "
                   "--set model.d_model=64 for a smaller pair")  # fmt: skip
    args = p.parse_args()
    if any("=" not in item for item in args.set):
        p.error("--set expects model.FIELD=VALUE")
    try:
        hcfg = apply_overrides(
            get_micro_config(), dict(i.split("=", 1) for i in args.set)
        )
    except ValueError as e:
        p.error(str(e))
    print("command: python " + " ".join(sys.argv), flush=True)
    torch.set_num_threads(args.threads)
    cfg = hcfg.model
    if args.balance_bias is not None:
        cfg = dataclasses.replace(cfg, balance_bias_rate=args.balance_bias)
    if args.gate_scale is not None:
        cfg = dataclasses.replace(cfg, gate_scale=args.gate_scale)
    cfg = dataclasses.replace(cfg, dropout=args.dropout)
    print(f"MoE balance_bias_rate {cfg.balance_bias_rate}, gate_scale {cfg.gate_scale}",
          flush=True)  # fmt: skip
    tok, train, val = prepare_corpus(cfg.vocab_size, corpus=args.corpus)
    torch.manual_seed(args.seed)
    moe = BaseMoEModel(config=cfg)
    torch.manual_seed(args.seed)
    dense = build_dense(dataclasses.replace(cfg, balance_bias_rate=0.0))
    n_moe = sum(p.numel() for p in moe.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    kw = dict(batch=args.batch, lr=args.lr, warmup=args.warmup, seed=1337 + args.seed)
    models = {"moe": moe, "dense": dense}
    if args.only:
        models = {args.only: models[args.only]}
    peers = [Trainee(n, m, hmst_loss, train, cfg, **kw) for n, m in models.items()]
    runs = train_interleaved(peers, steps=args.steps)
    evals, counts = {}, None
    for name, m in models.items():
        fn = expert_counts_fn(m) if name == "moe" else None
        evals[name], c = evaluate_bpb(
            lambda x: m(x)["logits"], tok, val, cfg.max_seq_len, counts_fn=fn
        )
        counts = c if name == "moe" else counts
    tokens = args.steps * args.batch * cfg.max_seq_len
    print(f"\n{args.steps} steps x {args.batch} x {cfg.max_seq_len} = {tokens:,} "
          f"training tokens each ({tokens / train.num_tokens:.2f} epochs of "
          f"{train.num_tokens:,}); {args.threads} thread(s)")  # fmt: skip
    print(f"active params: moe {cfg.num_params(active=True) / 1e6:.2f}M of "
          f"{n_moe / 1e6:.2f}M total; dense {n_dense / 1e6:.2f}M")  # fmt: skip
    print(f"{'model':<8}{'cpu s':>8}{'val loss':>10}{'val ppl':>9}{'val bpb':>9}")
    for name, ev in evals.items():
        print(f"{name:<8}{runs[name]['cpu_s']:>8.0f}{ev['val_loss']:>10.4f}"
              f"{ev['val_ppl']:>9.2f}{ev['val_bpb']:>9.4f}")  # fmt: skip
    result = {name: {**runs[name], **ev} for name, ev in evals.items()}
    if len(evals) == 2:
        gain = 1 - evals["moe"]["val_ppl"] / evals["dense"]["val_ppl"]
        print(f"\nMoE perplexity {gain:.1%} lower than dense (target >= 5%) "
              f"{'PASS' if gain >= 0.05 else 'FAIL'}")  # fmt: skip
    if counts is not None:
        loads = load_stats(counts)
        worst_ratio = max(loads["max_over_mean_per_layer"])
        worst_share = min(loads["min_share_per_layer"])
        ratio_ok = "PASS" if worst_ratio <= 1.5 else "FAIL"
        share_ok = "PASS" if worst_share >= 0.02 else "FAIL"
        print("expert load max/mean per layer: "
              + ", ".join(f"{r:.2f}" for r in loads["max_over_mean_per_layer"])
              + f" (target <= 1.5) {ratio_ok}")  # fmt: skip
        print("smallest expert share per layer: "
              + ", ".join(f"{s:.1%}" for s in loads["min_share_per_layer"])
              + f" (target >= 2%) {share_ok}")  # fmt: skip
        result["load"] = loads
    print(json.dumps(result))


if __name__ == "__main__":
    main()
