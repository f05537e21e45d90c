"""What observation costs: decode tokens/s and training step time, per observe mode.

Decode (micro config, random weights, prompt 32, 128 new tokens, sampled with a seed):
  bare        the same op sequence written out by hand (fast_logits + sample_next),
              no generator, no emission checks: the "no instrumentation" build
  off         generate_stream(observe=None): the shipped default
  summary     + per-token logit summaries and per-layer routing events (no sink)
  trace       summary + TraceRecorder into memory (the artifact of --trace)
  diagnostic  + per-component timing and NaN/Inf checks
Training (micro config, batch 8 x 256, forward + backward + AdamW):
  plain       the step without the audit
  audit       + RoutingStats.update (what train.py does every step)

Peers run interleaved in rounds in one process (1 thread, process CPU time, medians).
Targets (issue #6): off within 1% of bare; summary within 5% on decode and the audit
within 1% on a training step.

    python bench/bench_observe.py [--rounds 7] [--quick]
"""

import argparse
import statistics
import sys
import time

import torch

from hmst.configs.model_config import ModelConfig
from hmst.generation import generate_stream
from hmst.generation.fast_forward import fast_logits, prepare_for_inference
from hmst.generation.sampling import SamplingParams, sample_next
from hmst.models.base_moe import BaseMoEModel
from hmst.models.moe import load_balance_loss
from hmst.observe.audit import RoutingStats
from hmst.observe.hooks import Emitter
from hmst.observe.trace import MemorySink, TraceRecorder
from hmst.training.optim import build_optimizer


def bare_decode(model, prompt, params):
    gen = torch.Generator().manual_seed(params.seed)
    caches = model.allocate_kv_cache(1, prompt.shape[1] + params.max_new_tokens)
    logits = fast_logits(model, prompt, caches, 0)
    out = []
    for step in range(params.max_new_tokens):
        nxt = sample_next(logits, params, gen, prompt)
        out.append(nxt)
        if step < params.max_new_tokens - 1:
            logits = fast_logits(model, nxt[:, None], caches, prompt.shape[1] + step)
    return torch.stack(out, 1)


def stream_decode(model, prompt, params, mode):
    emitter = None
    if mode == "trace":
        emitter = Emitter([TraceRecorder(MemorySink())], "summary")
    elif mode is not None:
        emitter = Emitter([], mode)
    steps = generate_stream(model, prompt.tolist(), params, observe=emitter)
    return torch.stack(list(steps), 1)


def timed(fn):
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def train_step(model, opt, x, y, routing):
    out = model(x, targets=y, return_logits=False)
    lb = torch.stack(
        [
            load_balance_loss(c, p)
            for c, p in zip(out["expert_counts"], out["router_probs"])
        ]
    ).mean()
    loss = out["loss"] + 0.01 * lb + 1e-3 * out["router_z_loss"]
    if routing is not None:
        routing.update(
            out["expert_counts"], out["router_entropy"], lb, out["router_z_loss"]
        )
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--train-rounds", type=int, default=6)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.train_rounds = 2, 2
    print("command: python " + " ".join(sys.argv), flush=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, max_seq_len=256)
    model = prepare_for_inference(BaseMoEModel(config=cfg))
    prompt = torch.randint(0, cfg.vocab_size, (1, 32))
    params = SamplingParams(max_new_tokens=128, temperature=0.8, top_k=50, seed=0)
    peers = {
        "bare": lambda: bare_decode(model, prompt, params),
        "off": lambda: stream_decode(model, prompt, params, None),
        "summary": lambda: stream_decode(model, prompt, params, "summary"),
        "trace": lambda: stream_decode(model, prompt, params, "trace"),
        "diagnostic": lambda: stream_decode(model, prompt, params, "diagnostic"),
    }
    times = {k: [] for k in peers}
    ref = None
    for r in range(args.rounds + 1):  # round 0 warms up
        names = list(peers)[r % len(peers) :] + list(peers)[: r % len(peers)]
        for name in names:
            t, toks = timed(peers[name])
            ref = toks if ref is None else ref
            assert torch.equal(toks, ref), f"{name} changed the tokens"
            if r:
                times[name].append(t)
    base = statistics.median(times["bare"])
    print(f"\ndecode: 1 thread, prompt 32, {params.max_new_tokens} new tokens, "
          f"{args.rounds} rounds (tokens identical in every mode)")  # fmt: skip
    print(f"{'mode':<12}{'tok/s':>9}{'vs bare':>9}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<12}{params.max_new_tokens / t:>9.1f}{t / base - 1:>+9.1%}")

    tmodel = BaseMoEModel(config=cfg)
    opt = build_optimizer(tmodel, 1e-4, 0.1, (0.9, 0.95))
    x = torch.randint(0, cfg.vocab_size, (8, 257))
    x, y = x[:, :-1], x[:, 1:]
    routing = RoutingStats(cfg.n_layers, cfg.n_experts, "cpu")
    tt = {"plain": [], "audit": []}
    for r in range(args.train_rounds + 1):
        for name in (["plain", "audit"] if r % 2 else ["audit", "plain"]):
            t, _ = timed(
                lambda: train_step(
                    tmodel, opt, x, y, routing if name == "audit" else None
                )
            )
            if r:
                tt[name].append(t)
    routing.summary()
    tp, ta = statistics.median(tt["plain"]), statistics.median(tt["audit"])
    print(f"\ntraining step (batch 8 x 256, fwd + bwd + AdamW): plain {tp:.3f} s, "
          f"audit {ta:.3f} s ({ta / tp - 1:+.2%})")  # fmt: skip
    off = statistics.median(times["off"]) / base - 1
    summ = statistics.median(times["summary"]) / base - 1
    print(f"\noff vs bare {off:+.1%} (target within 1%) "
          f"{'PASS' if off <= 0.01 else 'FAIL'}")  # fmt: skip
    print(f"summary vs bare {summ:+.1%} (target within 5%) "
          f"{'PASS' if summ <= 0.05 else 'FAIL'}")  # fmt: skip
    print(f"audit vs plain training step {ta / tp - 1:+.2%} (target within 1%) "
          f"{'PASS' if ta / tp - 1 <= 0.01 else 'FAIL'}")  # fmt: skip


if __name__ == "__main__":
    main()
