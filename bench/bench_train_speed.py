"""Training throughput (forward + backward + AdamW) of hmst vs HF Mixtral vs dense.

Micro MoE config: d_model 256, 4 layers, 8 heads, 8 experts top-2, expert width 1024,
vocab 8192, seq 256, batch 8; fp32, 1 thread, process CPU time. Peers are timed in
interleaved rounds in the same process; medians, ratios, and model-FLOP utilisation
against this machine's measured fp32 matmul peak.

    python bench/bench_train_speed.py [--rounds 8] [--quick]
"""

import argparse
import statistics
import sys
import time

import torch

from common import (
    HF_IMPLS,
    build_dense,
    build_mixtral,
    hmst_loss,
    measure_peak_flops,
    mixtral_loss,
)
from hmst.configs.model_config import ModelConfig
from hmst.models.base_moe import BaseMoEModel
from hmst.training.optim import build_optimizer


def train_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """6 x (active matmul params, head included, embedding lookup excluded) + causal
    attention (QK^T and AV: 2 x 2 x seq/2 x d per layer, x3 for fwd+bwd)."""
    active = cfg.num_params(active=True) - cfg.d_model * (2 * cfg.n_layers + 1)
    attn = cfg.n_layers * 2 * 2 * (seq / 2) * cfg.d_model
    return 6 * active + 3 * attn


class Peer:
    def __init__(self, name, model, loss_fn):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
        self.times = []

    def step(self, x, y):
        t = time.process_time()
        _, loss, *_ = self.loss_fn(self.model, x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.process_time() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 rounds, 1 warmup")
    # batched_mm gathers a copy of the expert weights per token (tens of GB at 2048
    # tokens x 4 layers): it is meant for small-batch decoding, so it is left out here.
    p.add_argument("--hf-impls", nargs="+", default=["eager", "grouped_mm"],
                   choices=HF_IMPLS)  # fmt: skip
    args = p.parse_args()
    if args.quick:
        args.rounds, args.warmup = 2, 1
    print("command: python " + " ".join(sys.argv))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, max_seq_len=args.seq)
    cfg64 = ModelConfig(vocab_size=8192, max_seq_len=args.seq, n_experts=64)
    peers = [
        Peer("hmst", BaseMoEModel(config=cfg), hmst_loss),
        Peer("dense (same active)", build_dense(cfg), hmst_loss),
        Peer("hmst 64 experts", BaseMoEModel(config=cfg64), hmst_loss),
    ]
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    x, y = x[:, :-1], x[:, 1:]
    for impl in args.hf_impls:
        try:
            peer = Peer(f"hf-mixtral {impl}", build_mixtral(cfg, impl), mixtral_loss)
            peer.step(x, y)
            peers.append(peer)
        except Exception as e:  # an implementation this device cannot run
            print(f"skip hf-mixtral {impl}: {type(e).__name__}: {str(e)[:120]}")
    for peer in peers:
        for _ in range(args.warmup):
            peer.step(x, y)
    for r in range(args.rounds):
        order = peers[r % len(peers) :] + peers[: r % len(peers)]
        for peer in order:
            peer.times.append(peer.step(x, y))
    peak = measure_peak_flops()
    tokens = args.batch * args.seq
    fpt = train_flops_per_token(cfg, args.seq)
    print(f"\nthreads {args.threads} | batch {args.batch} x seq {args.seq} | fp32 | "
          f"measured matmul peak {peak / 1e9:.1f} GFLOP/s")  # fmt: skip
    print(f"{'peer':<26}{'s/step':>9}{'tokens/s':>10}{'MFU':>7}")
    tps = {}
    for peer in peers:
        t = statistics.median(peer.times)
        tps[peer.name] = tokens / t
        f = train_flops_per_token(cfg64 if "64" in peer.name else cfg, args.seq)
        print(
            f"{peer.name:<26}{t:>9.3f}{tokens / t:>10.0f}{f * tokens / t / peak:>7.1%}"
        )
    hf = {k: v for k, v in tps.items() if k.startswith("hf")}
    best_hf = max(hf, key=hf.get)
    checks = [
        (f"hmst / {best_hf}", tps["hmst"] / hf[best_hf], 1.05),
        ("hmst / dense", tps["hmst"] / tps["dense (same active)"], 0.95),
        ("hmst 64 experts / hmst 8", tps["hmst 64 experts"] / tps["hmst"], 0.5),
    ]
    print()
    for name, ratio, target in checks:
        verdict = "PASS" if ratio >= target else "FAIL"
        print(f"{name:<36} {ratio:5.2f}x  (target >= {target}x) {verdict}")
    print(f"(flops/token at 8 experts: {fpt / 1e6:.1f} MFLOP)")


if __name__ == "__main__":
    main()
