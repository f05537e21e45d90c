"""`inference.py SYSTEM_DIR`: the same CLI over a saved HMST system (a directory with
a manifest.json, written by `HMSTInferenceEngine.save_pretrained`): every query goes
through the meta-controller, the memories and the critic.

    --prompt Q          answer once: the answer on stdout, the decision record on stderr
    --input F --output O   batch: JSONL records (id, query, the full QueryResult)
    (neither)           REPL: a line is a query; `remember <text>` stores a sentence in
                        episodic memory; `quit` leaves
    --policy fixed      use the system's fixed decisions instead of its controller
    --force NAME=0|1    force a decision (early_exit, episodic, semantic, verification)
"""

from __future__ import annotations

import json
import sys

from hmst.cli.args import restore_ctrl_c
from hmst.models.meta_controller import DECISIONS


def parse_force(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in DECISIONS or value not in ("0", "1"):
            raise ValueError(
                f"--force {item!r}: expected NAME=0|1 with NAME one of "
                f"{', '.join(DECISIONS)}"
            )
        out[name] = value == "1"
    return out


def describe(r) -> str:
    on = [k for k, v in r.decisions.items() if v] or ["nothing"]
    hits = sum(h.used for h in r.hits)
    critic = (
        f" | critic {r.critic['score']:.3f} {r.critic['action']}" if r.critic else ""
    )
    return (
        f"[{r.decision_source}: {', '.join(on)} | {hits}/{len(r.hits)} hits used"
        f"{critic} | {r.blocks_per_token:.2f} blocks/token | "
        f"{1e3 * r.latency_s:.0f} ms]"
    )


def run_engine(args, prompts) -> None:
    from hmst.inference.engine import HMSTInferenceEngine
    from hmst.observe.trace import JSONLFileSink, TraceRecorder

    if args.quantize != "none":
        raise ValueError("--quantize applies to a bare model checkpoint, not a system")
    forced = parse_force(args.force)
    engine = HMSTInferenceEngine.from_pretrained(
        args.checkpoint, device=args.device, policy=args.policy, observe=args.observe
    )
    if args.trace:
        engine.observers.register(
            TraceRecorder(JSONLFileSink(args.trace), decode=engine.tokenizer.decode)
        )
    if prompts is not None:
        out = open(args.output, "w") if args.output else sys.stdout
        try:
            for pid, query in prompts:
                r = engine.answer(query, forced or None)
                out.write(json.dumps({"id": pid, **r.to_dict()}) + "\n")
                out.flush()
        finally:
            if out is not sys.stdout:
                out.close()
        return
    if args.prompt is not None:
        r = engine.answer(args.prompt, forced or None)
        print(r.answer)
        print(describe(r), file=sys.stderr)
        return
    print("HMST engine: a query per line; `remember <text>`; `quit`.")
    restore_ctrl_c()
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("quit", "exit"):
            return
        if not line:
            continue
        try:
            if line.startswith("remember "):
                i = engine.remember(line[len("remember ") :])
                print(f"stored in episodic memory (#{i})")
                continue
            r = engine.answer(line, forced or None)
            print(r.answer)
            print(describe(r))
        except ValueError as e:
            print(f"error: {e}")
