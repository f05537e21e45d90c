"""Choose the micro preset's vocabulary size by measurement.

For each vocab size: train the micro MoE with `train.py` for the same wall-clock budget
(steps = budget / measured step time, so the cosine schedule completes) on the bundled
corpus and report validation bits-per-byte on its held-out last 10%.

    python bench/bench_vocab.py --vocab 2048 4096 8192 --seconds 150
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(vocab, steps, out, threads, extra=()):
    cmd = [
        sys.executable, "train.py", "data/tinyshakespeare.txt", "--val-split", "0.1",
        "--vocab-size", str(vocab), "--max-steps", str(steps), "--eval-every",
        str(max(steps, 1)), "--output-dir", out, "--num-threads", str(threads),
        "--warmup-steps", str(min(50, max(1, steps // 10))), *extra,
    ]  # fmt: skip
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    evals = [
        json.loads(line)
        for line in open(os.path.join(out, "metrics.jsonl"))
        if '"kind": "eval"' in line
    ]
    return evals[-1], time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--seconds", type=float, default=150, help="training budget per run")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print("command: python " + " ".join(sys.argv))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.vocab:
            # probe: 6 steps (the first 3 warm up), then the budget in steps
            probe = os.path.join(tmp, f"probe{v}")
            _, t_probe = train(v, 3, probe + "a", args.threads)
            _, t_probe6 = train(v, 9, probe + "b", args.threads)
            step_s = max((t_probe6 - t_probe) / 6, 1e-3)
            steps = max(10, int(args.seconds / step_s))
            ev, wall = train(v, steps, os.path.join(tmp, f"v{v}"), args.threads)
            rows.append((v, steps, step_s, wall, ev["val_loss"], ev["val_bpb"]))
            print(
                f"vocab {v}: {steps} steps ({step_s:.2f} s/step), "
                f"bpb {ev['val_bpb']:.4f}"
            )
    head = ("vocab", "steps", "s/step", "wall s", "val loss", "val bpb")
    print("\n" + " ".join(f"{h:>8}" for h in head))
    for r in rows:
        print(
            f"{r[0]:>6} {r[1]:>6} {r[2]:>7.2f} {r[3]:>7.0f} {r[4]:>9.4f} {r[5]:>8.4f}"
        )
    best = min(rows, key=lambda r: r[5])
    print(f"best: vocab {best[0]} (val bpb {best[5]:.4f})")


if __name__ == "__main__":
    main()
