"""Decode speed: hmst's KV-cached generation vs HF transformers Mixtral `generate()`.

Matched micro config (d_model 256, 4 layers, 8 heads, 8 experts top-2, ff 1024,
vocab 8192), fp32, random weights (speed does not depend on them), greedy, prompt 32
tokens, 128 new (HF forced to full length by min_new_tokens), batch 1 and 8.
Time-to-first-token and decode tokens/s per peer, interleaved rounds, medians, ratios.

    python bench/bench_decode.py [--threads 1] [--rounds 5] [--quick]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hmst.configs.model_config import ModelConfig  # noqa: E402
from hmst.generation.generate import generate_stream  # noqa: E402
from hmst.generation.sampling import SamplingParams  # noqa: E402
from hmst.models.base_moe import BaseMoEModel  # noqa: E402

HF_IMPLS = ("eager", "batched_mm", "grouped_mm")


def build_hf(cfg: ModelConfig, impl: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    hf_cfg = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=True,
        rope_theta=cfg.rope_theta,
    )
    model = MixtralForCausalLM._from_config(
        hf_cfg, attn_implementation="sdpa", experts_implementation=impl
    )
    return model.eval()


def time_hmst(model, prompt, new_tokens):
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    t0 = time.perf_counter()
    stream = generate_stream(model, prompt.tolist(), params)
    next(stream)
    ttft = time.perf_counter() - t0
    n = 1 + sum(1 for _ in stream)
    return ttft, time.perf_counter() - t0, n


@torch.no_grad()
def time_hf(model, prompt, new_tokens):
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw
    )
    return ttft, time.perf_counter() - t0, out.shape[1] - prompt.shape[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--quick", action="store_true", help="2 rounds, 32 new tokens")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.new_tokens = 2, 32
    print("command: python " + " ".join(sys.argv))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, max_seq_len=args.prompt_len + args.new_tokens)
    hmst = BaseMoEModel(config=cfg).eval()
    peers = {"hmst": hmst}
    for impl in HF_IMPLS:
        try:
            m = build_hf(cfg, impl)
            time_hf(m, torch.randint(0, 8192, (1, 8)), 2)
            peers[f"hf-{impl}"] = m
        except Exception as e:  # an implementation unavailable on this device
            print(f"skip hf-{impl}: {type(e).__name__}: {str(e)[:100]}")
    print(f"threads {args.threads}, prompt {args.prompt_len}, new {args.new_tokens}")
    summary = []
    for bs in args.batch:
        prompt = torch.randint(3, 8192, (bs, args.prompt_len))
        res = {k: [] for k in peers}
        for r in range(args.rounds + 1):
            for name, m in peers.items():
                fn = time_hmst if name == "hmst" else time_hf
                ttft, total, n = fn(m, prompt, args.new_tokens)
                if r:  # round 0 warms up
                    res[name].append((ttft, bs * n / total))
        print(f"\nbatch {bs}:  {'peer':<16}{'ttft ms':>9}{'decode tok/s':>14}")
        med = {}
        for name, rows in res.items():
            ttft = statistics.median(t for t, _ in rows)
            tps = statistics.median(s for _, s in rows)
            med[name] = tps
            print(f"{'':10}{name:<16}{1000 * ttft:>9.1f}{tps:>14.1f}")
        best_hf = max((k for k in med if k != "hmst"), key=med.get)
        ratio = med["hmst"] / med[best_hf]
        target = 2.0 if bs == 1 else 1.5
        verdict = "PASS" if ratio >= target else "FAIL"
        print(f"  hmst / {best_hf} = {ratio:.2f}x (target >= {target}x) {verdict}")
        summary.append((bs, ratio, verdict))
    print("\nsummary: " + ", ".join(f"batch {b}: {r:.2f}x {v}" for b, r, v in summary))


if __name__ == "__main__":
    main()
