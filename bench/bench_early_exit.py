"""Early exit vs the full model: test perplexity, block evaluations, decode time.

Needs heads from `python -m hmst.training.early_exit_train`. On the held-out test
slice the heads were saved with (`early_exit_train --tune-on`; tokenizer from the
checkpoint): teacher-forced
perplexity of the emitted distributions and exact block evaluations per token, for the
full model, the tuned threshold and a sweep. Then greedy decoding of --new-tokens at
batch 1 with the KV cache from --prompts prompts of the test slice: process CPU time
and wall time per token, 1 thread, configurations interleaved round by round,
medians. The full model runs the same code path (`decode_step` without heads).

    python bench/bench_early_exit.py --heads checkpoints/micro/early_exit \\
        [--checkpoint checkpoints/micro/best] [--rounds 5] [--sweep T1 T2 ...]

It also reports the oracle exit (`exit_oracle`): how far any confidence rule could go
with the same heads.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hmst.checkpoint import load_pretrained  # noqa: E402
from hmst.models.early_exit import forced_decode, greedy_decode  # noqa: E402
from hmst.training.early_exit_train import (  # noqa: E402
    CONFIG_FILE,
    TABLE_HEAD,
    evaluate_exit,
    exit_oracle,
    format_row,
    load_heads,
    prepare_splits,
    split_args,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_sweep(heads_dir: str, tuned: float, bonus: float) -> list[float]:
    """Thresholds of the tuning table (at the tuned depth bonus) nearest to
    10/20/30/40% saved, plus the tuned."""
    with open(os.path.join(heads_dir, CONFIG_FILE)) as f:
        rows = json.load(f)["meta"]["tune"]["rows"]
    rows = [r for r in rows if r.get("depth_bonus", 0.0) == bonus]
    picks = {tuned}
    for target in (0.1, 0.2, 0.3, 0.4):
        r = min(rows, key=lambda r: abs(r["saved_fraction"] - target))
        picks.add(r["threshold"])
    return sorted(picks, reverse=True)


def run_once(model, heads, text, mode, args, threshold, rule):
    """One decode of `args.new_tokens` tokens at batch 1: (cpu s, wall s, exit layers
    of the decode steps). greedy: from the prompt; forced: along the test text."""
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    if mode == "greedy":
        prompt = text[:, : args.prompt_len]
        _, exits = greedy_decode(model, heads, prompt, args.new_tokens, threshold, rule)
    else:
        _, exits = forced_decode(model, heads, text, args.prompt_len, threshold, rule)
    return time.process_time() - t_cpu, time.perf_counter() - t_wall, exits[1:]


def time_configs(model, configs, texts, mode, args, say) -> dict:
    """Interleaved rounds over the configurations; prints the table, returns the
    median CPU-time ratio to the full model per configuration."""
    cpu = {c[0]: [] for c in configs}
    wall = {c[0]: [] for c in configs}
    layers = {}
    for name, h, t, rule in configs:  # warm-up; the exit layers (deterministic)
        exits = []
        for text in texts:
            exits += run_once(model, h, text, mode, args, t, rule)[2]
        layers[name] = sum(e + 1 for e in exits) / len(exits)
    n = args.new_tokens * len(texts)
    for _ in range(args.rounds):
        for name, h, t, rule in configs:
            c = w = 0.0
            for text in texts:
                dc, dw, _ = run_once(model, h, text, mode, args, t, rule)
                c, w = c + dc, w + dw
            cpu[name].append(1e3 * c / n)
            wall[name].append(1e3 * w / n)
    what = {
        "greedy": "greedy decoding from the prompt",
        "forced": "decoding along the test text (same exits as teacher-forced)",
    }[mode]
    say(f"\n## {what}: batch 1, KV cache, {len(texts)} x ({args.prompt_len}-token "
        f"prompt + {args.new_tokens} tokens); ms per token (prefill included), "
        f"median of {args.rounds} interleaved rounds")  # fmt: skip
    say(f"{'threshold':<14} {'layers/tok':>10} {'cpu ms/tok':>11} {'x full':>7} "
        f"{'wall ms/tok':>12} {'x full':>7}")  # fmt: skip
    c0 = statistics.median(cpu["full model"])
    w0 = statistics.median(wall["full model"])
    ratios = {}
    for name, *_ in configs:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        ratios[name] = c / c0
        say(f"{name:<14} {layers[name]:>10.3f} {c:>11.3f} {c / c0:>7.3f} "
            f"{w:>12.3f} {w / w0:>7.3f}")  # fmt: skip
    return ratios


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=os.path.join(ROOT, "checkpoints/micro/best"))
    p.add_argument("--heads", required=True, help="early_exit_train --output DIR")
    p.add_argument("--data", default=os.path.join(ROOT, "data/tinyshakespeare.txt"))
    p.add_argument("--val-file", help="the heads' --val-file, if it moved")
    p.add_argument("--sweep", type=float, nargs="+", default=None)
    p.add_argument("--max-prob", type=float, nargs="*", default=[],
                   help="also the max-prob rule at these thresholds")  # fmt: skip
    p.add_argument("--test-windows", type=int, default=None, help="default: all")
    p.add_argument("--rounds", type=int, default=5, help="0: no decode timing")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "bench/results/early_exit.txt"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    model, tok, _ = load_pretrained(args.checkpoint)
    model.eval().requires_grad_(False)
    heads = load_heads(args.heads, model).eval()
    tuned = heads.threshold
    sweep = sorted(
        set(args.sweep or default_sweep(args.heads, tuned, heads.config.depth_bonus))
        | {tuned}
    )
    L = model.config.n_layers
    splits = split_args(args.heads)  # the heads' own test slice
    splits["val_file"] = args.val_file or splits["val_file"]
    _, _, windows = prepare_splits(tok, args.data, model.config.max_seq_len, **splits)
    windows = windows[: args.test_windows]
    say(f"# bench_early_exit: {args.checkpoint} + heads {args.heads}")
    say(f"# torch {torch.__version__}, {args.threads} thread(s), fp32, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    say(f"# exit layers {list(heads.config.exit_layers)} of {L} blocks, rule "
        f"{heads.config.rule}, depth bonus {heads.config.depth_bonus:g}, tuned "
        f"threshold {tuned:.6f}")  # fmt: skip

    say(
        f"\n## test slice: {len(windows)} windows x {model.config.max_seq_len} tokens"
        f" (teacher-forced; layers = block evaluations per token); split {splits}"
    )
    say(TABLE_HEAD + "   kv_fills/token")
    full = evaluate_exit(model, None, windows, None)
    base = full["ppl"]
    say(format_row("full model", full, base) + f"   {0.0:.3f}")
    rows = {}
    for tau in sorted(sweep, reverse=True):
        r = evaluate_exit(model, heads, windows, tau)
        rows[tau] = r
        name = f"{'*' if tau == tuned else ' '}{tau:.6f}"
        say(format_row(name, r, base) + f"   {r['kv_fills'] / r['tokens']:.3f}")
    for tau in args.max_prob:
        r = evaluate_exit(model, heads, windows, tau, rule="max_prob")
        say(format_row(f"maxprob {tau:g}", r, base)
            + f"   {r['kv_fills'] / r['tokens']:.3f}")  # fmt: skip
    say("(* = tuned on the tuning slice; exits = tokens exiting after block 0..L-1;"
        " maxprob = exit on the head's max softmax prob instead of c_l)")  # fmt: skip

    say("\n## oracle exit: per token, the block minimising KL(p_L || p_l) - lam * "
        "blocks saved, knowing the KL (a ceiling for any confidence rule with these "
        "heads; K/V fill not modelled)")  # fmt: skip
    say(f"{'lam':>6} {'saved':>7} {'ppl':>9} {'d_ppl':>8}")
    for o in exit_oracle(model, heads, windows):
        say(f"{o['lam']:>6.3f} {100 * o['saved_fraction']:>6.1f}% {o['ppl']:>9.3f} "
            f"{100 * o['d_ppl']:>+7.2f}%")  # fmt: skip
    if args.rounds == 0:
        r = rows[tuned]
        say(f"\nverdict (tuned {tuned:.6f}): {100 * r['saved_fraction']:.1f}% fewer "
            f"block evaluations (target >= 25%), test ppl {r['ppl']:.3f} vs "
            f"{base:.3f} ({100 * (r['ppl'] / base - 1):+.2f}%, target <= +1%); "
            "decode not timed (--rounds 0)")  # fmt: skip
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
        return

    texts = [
        torch.from_numpy(
            windows[i * len(windows) // args.prompts].astype("int64")
        ).unsqueeze(0)[:, : args.prompt_len + args.new_tokens]
        for i in range(args.prompts)
    ]
    tuned_name = f"*{tuned:.6f}"
    configs = [("full model", None, None, None)]
    configs += [
        (f"{'*' if t == tuned else ' '}{t:.6f}", heads, t, "learned")
        for t in sorted(sweep, reverse=True)
    ]
    configs += [(f"maxprob {t:g}", heads, t, "max_prob") for t in args.max_prob]
    ratios = {}
    for mode in ("greedy", "forced"):
        ratios[mode] = time_configs(model, configs, texts, mode, args, say)
    r = rows[tuned]
    say(f"\nverdict (tuned {tuned:.6f}): {100 * r['saved_fraction']:.1f}% fewer "
        f"block evaluations (target >= 25%), test ppl {r['ppl']:.3f} vs {base:.3f} "
        f"({100 * (r['ppl'] / base - 1):+.2f}%, target <= +1%); decode CPU time "
        f"x{ratios['forced'][tuned_name]:.3f} (along test text), "
        f"x{ratios['greedy'][tuned_name]:.3f} (greedy) of the full model")  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
