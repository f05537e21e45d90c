"""`inference.py CHECKPOINT`: interactive REPL (default), `--prompt`, or batch files.

Batch input: `.txt` (one prompt per non-empty line) or `.jsonl` (objects with "prompt"
and optional "id"). Output: `.jsonl` records (id, prompt, params, text, token counts,
finish reason, timings) or `.txt` (one generation per block).

A prompt longer than the context loses its start (a warning says how many tokens) so
that min(--max-length, half the context) new tokens fit. Decoding uses the inference
path of `hmst.generation.fast_forward`; `--quantize int8` adds dynamic int8 weights.

A system directory (manifest.json: the model with its memories, critic and controller)
runs every query through `HMSTInferenceEngine` instead: see `hmst/cli/engine_cli.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from hmst.cli.args import restore_ctrl_c
from hmst.generation.sampling import SamplingParams

HELP = """commands:
  <text>                 generate a continuation (Ctrl-C stops it)
  set <param> <value>    change a parameter: max_length, temperature, top_p, top_k,
                         repetition_penalty, seed (none to unset), stop (text, or none)
  stats                  throughput and latency over this session
  help                   this text and the current settings
  quit | exit | Ctrl-D   leave"""

SET_ALIASES = {"max_length": "max_new_tokens", "max_new_tokens": "max_new_tokens"}
SETTABLE = {
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
}


def build_parser():
    p = argparse.ArgumentParser(
        prog="inference.py", description="Generate with an HMST checkpoint."
    )
    p.add_argument(
        "checkpoint", help="checkpoint directory (e.g. checkpoints/run/best)"
    )
    p.add_argument("--prompt", help="generate once for this prompt and exit")
    p.add_argument("--input", help="batch prompts: .txt (one per line) or .jsonl")
    p.add_argument("--output", help="batch results: .jsonl or .txt (default: stdout)")
    p.add_argument(
        "--max-length", type=int, default=50, help="max new tokens (default 50)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)"
    )
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--stop", action="append", default=[], help="stop string (repeatable)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: dynamic int8 weights on CPU (faster; logits drift a little)",
    )
    p.add_argument(
        "--trace", metavar="OUT.jsonl",
        help="append a JSONL trace of every generation (schema: hmst/observe/"
        "trace_schema.json): per-token logit summaries, experts per layer, events",
    )  # fmt: skip
    p.add_argument(
        "--observe", choices=["off", "summary", "diagnostic"], default="off",
        help="observation mode (diagnostic adds component timing and NaN/Inf "
        "checks); --trace implies at least summary",
    )  # fmt: skip
    p.add_argument(
        "--policy", choices=["controller", "fixed"],
        help="system directories only: the meta-controller (default when the system "
        "has one) or the system's fixed decisions",
    )  # fmt: skip
    p.add_argument(
        "--force", action="append", default=[], metavar="NAME=0|1",
        help="system directories only: force a decision (early_exit, episodic, "
        "semantic, verification); repeatable",
    )  # fmt: skip
    p.add_argument("--num-threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def unescape(s: str) -> str:
    """Let a stop string typed on a command line say \\n or \\t."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


def read_prompts(path: str) -> list[tuple[object, str]]:
    """[(id, prompt)]: a JSONL record's "id" as given (else its line number), a .txt
    line's number as a string. ValueError names the line of a malformed record."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: malformed JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                    raise ValueError(
                        f'{path}:{n}: expected an object with a "prompt" string'
                    )
                if not rec["prompt"].strip():
                    raise ValueError(f"{path}:{n}: empty prompt")
                out.append((rec.get("id", n), rec["prompt"]))  # id kept as given
            else:
                out.append((str(n), line.rstrip("\n")))
    if not out:
        raise ValueError(f"no prompts in {path}")
    return out


def _record(pid, r, params):
    return {
        "id": pid,
        "prompt": r.prompt,
        "params": dataclasses.asdict(params),
        "text": r.text,
        "prompt_tokens": r.prompt_tokens,
        "new_tokens": r.new_tokens,
        "finish_reason": r.finish_reason,
        "ttft_s": round(r.ttft_s, 4),
        "latency_s": round(r.latency_s, 4),
        "tokens_per_s": round(r.tokens_per_s, 2),
    }


def run_batch(gen, prompts, params, output, batch_size):
    records = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        results = gen.stream_batch([p for _, p in chunk], params)
        records += [_record(pid, r, params) for (pid, _), r in zip(chunk, results)]
    if output and output.endswith(".txt"):
        body = "".join(f"### {r['id']}\n{r['prompt']}{r['text']}\n\n" for r in records)
    else:
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if output:
        tmp = output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body)
        os.replace(tmp, output)
        total = sum(r["new_tokens"] for r in records)
        print(
            f"wrote {len(records)} generations ({total} tokens) to {output}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(body)


def _report(r) -> str:
    return (
        f"[{r.new_tokens} tokens, {r.tokens_per_s:.1f} tok/s, "
        f"ttft {r.ttft_s * 1000:.0f} ms, "
        f"latency {r.latency_s:.2f} s, {r.finish_reason}]"
    )


def run_one(gen, prompt, params):
    sys.stdout.write(prompt)
    r = gen.generate(
        prompt, params, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush())
    )
    print()
    print(_report(r), file=sys.stderr)


def apply_set(params: SamplingParams, name: str, value: str) -> SamplingParams:
    """SamplingParams with one field changed; ValueError on a bad name or value."""
    field = SET_ALIASES.get(name, name)
    if field not in SETTABLE:
        raise ValueError(
            f"unknown parameter {name!r}; settable: max_length, "
            + ", ".join(sorted(SETTABLE - {"max_new_tokens"}))
        )
    if field == "stop":
        # unescape, not "unicode_escape": that codec garbles non-ASCII stop strings
        new = [] if value.lower() == "none" else [unescape(value)]
    elif field == "seed" and value.lower() == "none":
        new = None
    else:
        kind = int if field in ("max_new_tokens", "top_k", "seed") else float
        try:
            new = kind(value)
        except ValueError:
            raise ValueError(
                f"{name} expects {'an integer' if kind is int else 'a number'}, "
                f"got {value!r}"
            ) from None
    return dataclasses.replace(params, **{field: new})


def repl(gen, params):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    restore_ctrl_c()
    history = []
    print("HMST interactive generation. Type 'help' for commands.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd.lstrip("/") in ("quit", "exit"):
            return
        if cmd.lstrip("/") == "help":
            print(HELP)
            print(
                "settings: "
                + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(params).items())
            )
            continue
        if cmd.lstrip("/") == "stats":
            if not history:
                print("no generations yet")
                continue
            toks = sum(r.new_tokens for r in history)
            dec = sum(r.latency_s - r.ttft_s for r in history)
            n = len(history)
            print(
                f"{n} generations, {toks} tokens | mean {toks / max(dec, 1e-9):.1f} "
                f"tok/s | mean ttft {1000 * sum(r.ttft_s for r in history) / n:.0f} ms"
                f" | mean latency {sum(r.latency_s for r in history) / n:.2f} s"
            )
            continue
        if cmd.split()[0] in ("set", "/set"):  # not "settle down" (a prompt)
            parts = cmd.lstrip("/").split(maxsplit=2)
            if len(parts) != 3:
                print("usage: set <param> <value>")
                continue
            try:
                params = apply_set(params, parts[1], parts[2])
                print(f"{parts[1]} = {parts[2]}")
            except ValueError as e:
                print(f"error: {e}")
            continue
        try:
            r = gen.generate(
                line,
                params,
                on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()),
            )
        except KeyboardInterrupt:  # a Ctrl-C outside the token loop (encode, flush)
            print("\n[interrupted]")
            continue
        print()
        if r.finish_reason == "interrupted":
            print("[interrupted]")
        print(_report(r))
        history.append(r)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from hmst.checkpoint import load_pretrained
    from hmst.generation.fast_forward import prepare_for_inference
    from hmst.generation.quantize import quantize_int8
    from hmst.generation.text import TextGenerator
    from hmst.observe.trace import JSONLFileSink, TraceRecorder, checkpoint_info

    try:
        if args.prompt is not None and args.input:
            raise ValueError("--prompt and --input are exclusive")
        if args.output and not args.input:
            raise ValueError("--output needs --input")
        if args.prompt is not None and not args.prompt.strip():
            raise ValueError("empty prompt")
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        params = SamplingParams(
            max_new_tokens=args.max_length,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=[unescape(s) for s in args.stop],
        )
        prompts = read_prompts(args.input) if args.input else None
        if os.path.isfile(os.path.join(args.checkpoint, "manifest.json")):
            from hmst.cli.engine_cli import run_engine

            run_engine(args, prompts)  # a saved system: the full engine
            return 0
        if args.policy or args.force:
            raise ValueError("--policy/--force need a system directory (manifest.json)")
        model, tokenizer, _ = load_pretrained(args.checkpoint, device=args.device)
        if args.quantize == "int8":
            model = quantize_int8(model, inplace=True)
        gen = TextGenerator(prepare_for_inference(model), tokenizer, args.observe)
        if args.trace:
            sink = JSONLFileSink(args.trace)
            info = checkpoint_info(args.checkpoint)
            gen.observers.register(TraceRecorder(sink, info, decode=tokenizer.decode))
        if prompts is not None:
            run_batch(gen, prompts, params, args.output, args.batch_size)
        elif args.prompt is not None:
            run_one(gen, args.prompt, params)
        else:
            repl(gen, params)
    except (ValueError, OSError) as e:
        print(f"inference.py: error: {e}", file=sys.stderr)
        return 2
    return 0
