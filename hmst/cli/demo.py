"""The tour of a trained checkpoint: model summary, greedy and sampled generations, and
which experts each layer used for the text; then, if a full system exists (built by
scripts/qa_system.sh), the inference engine answering a scripted conversation with
every decision shown: controller choices, memory hits, critic verdict, layers used."""

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


def engine_tour(path: str) -> None:
    """A scripted conversation through HMSTInferenceEngine on a saved system."""
    from hmst.inference.engine import HMSTInferenceEngine, read_manifest
    from hmst.qa import make_world

    has_controller = "controller" in read_manifest(path, verify=False)["components"]
    engine = HMSTInferenceEngine.from_pretrained(
        path, policy="controller" if has_controller else "fixed"
    )
    print(f"\n=== the HMST engine: {path} (policy: {engine.policy}) ===")
    w = engine.manifest_extra.get("world")
    if not w:
        print("(not a fact-QA system: no scripted conversation)")
        return
    world = make_world(w["num_subjects"], w["seed"])
    told = world.part("episodic", "test")[0]
    script = [
        ("known: in the LM's weights", world["known"][0]),
        ("semantic: only in semantic memory", world.part("semantic", "test")[0]),
        ("episodic: told earlier in this conversation", told),
        ("unanswerable: in no source", world.part("unanswerable", "test")[0]),
    ]
    engine.clear_episodic()
    engine.remember(told.statement)
    print(f"user says: {told.statement!r}  (stored in episodic memory)")
    for title, fact in script:
        r = engine.answer(fact.question)
        probs = ", ".join(f"{k} {v:.2f}" for k, v in r.decision_probs.items())
        on = [k for k, v in r.decisions.items() if v] or ["nothing"]
        print(f"\n[{title}]\nQ: {fact.question}")
        print(f"A: {r.answer}   (gold: {fact.answer})")
        print(f"   decided: {', '.join(on)} ({r.decision_source}: {probs})")
        for h in r.hits:
            mark = (
                "used"
                if h.used
                else "valid, not used" if h.valid else "below the floor"
            )
            print(f"   hit {h.source}#{h.id} score {h.score:.3f} ({mark}): {h.text}")
        if r.critic:
            c = r.critic
            print(f"   critic {c['score']:.3f} vs {c['threshold']} -> {c['action']}")
        ms = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in r.timings.items())
        print(f"   blocks/token {r.blocks_per_token:.2f} | {1e3 * r.latency_s:.0f} ms "
              f"({ms} ms)")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/micro/best")
    p.add_argument(
        "--system",
        default="checkpoints/qa/system",
        help="a saved HMST system (built by scripts/qa_system.sh)",
    )
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--max-length", type=int, default=80)
    args = p.parse_args(argv)
    import os

    have_lm, have_system = os.path.isdir(args.checkpoint), os.path.isdir(args.system)
    if not have_lm and not have_system:
        print(
            f"demo.py: error: neither {args.checkpoint} nor {args.system} exists "
            "(train one first: bash scripts/quickstart.sh)",
            file=sys.stderr,
        )
        return 2
    try:
        if have_lm:
            lm_tour(args)
        else:
            print(f"({args.checkpoint} not found: skipping the LM tour)")
        if have_system:
            engine_tour(args.system)
        else:
            print(f"\n({args.system} not found: build the full system with "
                  "bash scripts/qa_system.sh)")  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def lm_tour(args) -> None:
    from hmst.checkpoint import load_pretrained
    from hmst.generation.text import TextGenerator

    model, tokenizer, cfg = load_pretrained(args.checkpoint)
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
