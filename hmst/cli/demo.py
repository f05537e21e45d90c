"""The tour of a trained checkpoint: model summary, greedy and sampled generations, and
which experts each layer used for the text."""

from __future__ import annotations

import argparse
import sys

import torch

from hmst.generation.sampling import SamplingParams


def expert_usage(model, ids: list[int]) -> torch.Tensor:
    """Share of token-expert assignments per (layer, expert) for one sequence."""
    with torch.no_grad():
        counts = model(torch.tensor([ids]))["expert_counts"].float()
    return counts / counts.sum(dim=1, keepdim=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/micro/best")
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--max-length", type=int, default=80)
    args = p.parse_args(argv)
    from hmst.checkpoint import load_pretrained
    from hmst.generation.text import TextGenerator

    try:
        model, tokenizer, cfg = load_pretrained(args.checkpoint)
    except (ValueError, OSError) as e:
        print(
            f"demo.py: error: {e} (train one first: bash scripts/quickstart.sh)",
            file=sys.stderr,
        )
        return 2
    m = cfg.model
    print(
        f"{args.checkpoint}: {m.num_params() / 1e6:.1f}M params, "
        f"{m.num_params(active=True) / 1e6:.1f}M active per token | "
        f"{m.n_layers} layers x "
        f"{m.n_experts} experts (top-{m.num_experts_per_tok}) | vocab {m.vocab_size} | "
        f"context {m.max_seq_len}"
    )
    gen = TextGenerator(model, tokenizer)
    for title, temp in (("greedy", 0.0), ("sampled (T=0.8, top-p 0.9)", 0.8)):
        params = SamplingParams(
            max_new_tokens=args.max_length, temperature=temp, seed=0
        )
        r = gen.generate(args.prompt, params)
        print(f"\n--- {title}: {r.new_tokens} tokens, {r.tokens_per_s:.0f} tok/s ---")
        print(args.prompt + r.text)
    usage = expert_usage(model, tokenizer.encode(args.prompt + r.text, bos=True))
    print("\nexpert share per layer (of this text's token-expert assignments):")
    print("layer " + " ".join(f"  e{e:<3d}" for e in range(m.n_experts)))
    for i, row in enumerate(usage.tolist()):
        print(f"{i:5d} " + " ".join(f"{100 * v:5.1f}%" for v in row))
    return 0
