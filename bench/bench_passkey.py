"""Episodic memory past the attention window: passkey recall at distance 4 x window.

Task: a sequence of random filler tokens holds one KEY marker followed by the passkey
(one of 16 value tokens); a QUERY marker follows the passkey `distance` tokens later,
and the model must predict the passkey there (loss only there). Chance = 1/16.

Two models, same everything (MoE transformer whose attention sees only the last
`window` tokens, seed, init of the shared parts, batch stream, steps, optimiser):
`HMSTLM` with the episodic SSM feeding the token stream, and the same model without
it. With n_layers layers of window W attention reaches n_layers * (W - 1) tokens back
(< 4 W, asserted), so at distance 4 W the passkey can reach the QUERY only through the
SSM state. Training distances are uniform in [1, 4 W]; held-out sets (own seeds,
checked disjoint from training) sit at fixed distances, 4 W being the acceptance one.

    python bench/bench_passkey.py [--window 16] [--steps 1200] [--out ...]
"""

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hmst.configs.model_config import ModelConfig, SSMConfig  # noqa: E402
from hmst.models.hmst_lm import HMSTLM  # noqa: E402


class PasskeyTask:
    """Token ids: passkey values 0..V-1, filler V..V+F-1, then KEY and QUERY.

    Filler is random (not one repeated token), drawn from its own symbols as in the
    classic passkey test (digits hidden in unrelated text), so the SSM must learn
    which inputs to write into its state and which to let pass."""

    def __init__(self, window: int, num_values: int = 16, num_filler: int = 16):
        self.num_values, self.num_filler = num_values, num_filler
        self.key = num_values + num_filler
        self.query = self.key + 1
        self.vocab_size = self.key + 2
        self.distance = 4 * window  # passkey position -> QUERY position (evaluation)
        self.max_offset = window
        # KEY at p, passkey at p + 1, QUERY at p + 1 + distance, filler after it.
        self.seq_len = self.max_offset + self.distance + 4

    def batch(self, gen: torch.Generator, n: int, distance: int | tuple[int, int]):
        """ids (n, seq_len), targets (n, seq_len) (-100 except at QUERY), passkeys.
        `distance`: exact, or (lo, hi) for a uniform draw per sequence."""
        shape = (n, self.seq_len)
        ids = self.num_values + torch.randint(0, self.num_filler, shape, generator=gen)
        p = torch.randint(0, self.max_offset, (n,), generator=gen)
        passkey = torch.randint(0, self.num_values, (n,), generator=gen)
        if isinstance(distance, tuple):
            dist = torch.randint(distance[0], distance[1] + 1, (n,), generator=gen)
        else:
            dist = torch.full((n,), distance)
        if dist.max() > self.distance:
            raise ValueError(f"distance above {self.distance} does not fit seq_len")
        rows, q = torch.arange(n), p + 1 + dist
        ids[rows, p] = self.key
        ids[rows, p + 1] = passkey
        ids[rows, q] = self.query
        targets = torch.full_like(ids, -100)
        targets[rows, q] = passkey
        return ids, targets, passkey


def build(task, window, use_ssm, args, seed):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=task.vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=4,
        d_ff=2 * args.d_model,
        n_experts=8,
        num_experts_per_tok=2,
        max_seq_len=task.seq_len,
    )
    ssm = SSMConfig(d_state=args.d_state, n_blocks=args.ssm_blocks, max_seq_len=4096)
    return HMSTLM(cfg, ssm if use_ssm else None, window=window)


@torch.no_grad()
def accuracy(model, ids, targets, passkey):
    model.eval()
    correct = 0
    for i in range(0, len(ids), 250):
        logits = model(ids[i : i + 250])["logits"]
        rows = (targets[i : i + 250] != -100).nonzero()
        pred = logits[rows[:, 0], rows[:, 1]].argmax(-1)
        correct += (pred == passkey[i : i + 250]).sum().item()
    model.train()
    return correct / len(ids)


def train(name, model, task, args, held_out, out):
    """AdamW + warmup/cosine; the same batch stream for every model (own generator).
    Training distances are uniform in [1, 4W]: the short ones teach the SSM to write
    and read (at 4W alone the loss stays flat for hundreds of steps), and the
    windowed transformer learns them too. Returns (held-out accuracy, CPU s, the
    training sequences seen)."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def lr_at(s):
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / (args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    t0, losses, seen = time.process_time(), [], set()
    for step in range(1, args.steps + 1):
        ids, targets, _ = task.batch(gen, args.batch, (1, task.distance))
        seen.update(row.numpy().tobytes() for row in ids)
        out_ = model(ids, targets)
        loss = out_["loss"] + out_["aux_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out_["loss"].item())
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(model, *held_out[task.distance])
            out(
                f"{name:9s} step {step:5d}  train loss {sum(losses) / len(losses):.3f}"
                f"  held-out acc at {task.distance}: {acc:.3f}  "
                f"cpu {time.process_time() - t0:6.1f}s"
            )
            losses = []
    secs = time.process_time() - t0
    return {d: accuracy(model, *batch) for d, batch in held_out.items()}, secs, seen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--ssm-blocks", type=int, default=1)
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/passkey.txt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    W = args.window
    task = PasskeyTask(W)
    reach = args.n_layers * (W - 1)
    assert reach < task.distance, "attention alone could reach the passkey"
    out(
        f"# passkey at distance {task.distance} = 4 x window {W}; attention reach "
        f"{args.n_layers} layers x {W - 1} = {reach}; seq {task.seq_len}; "
        f"chance {1 / task.num_values:.4f}"
    )
    out(
        f"d_model {args.d_model}, {args.n_layers} layers, 8 experts top-2; SSM "
        f"{args.ssm_blocks} block(s), d_state {args.d_state}; {args.steps} steps x "
        f"batch {args.batch}, distances uniform in [1, {task.distance}], AdamW lr "
        f"{args.lr}, {args.threads} thread(s), process CPU time"
    )
    # Held-out sets from their own seeds, at fixed distances; 4W is the acceptance one.
    distances = sorted({W // 2, reach, reach + 2, 2 * W, 3 * W, task.distance})
    held_out = {
        d: task.batch(torch.Generator().manual_seed(10_000 + d), args.held_out, d)
        for d in distances
    }
    results = {}
    for name, use_ssm in (("with SSM", True), ("no SSM", False)):
        model = build(task, W, use_ssm, args, args.seed)
        n = sum(p.numel() for p in model.parameters())
        out(f"\n## {name}: {n:,} parameters")
        results[name] = train(name, model, task, args, held_out, out)
    seen = results["with SSM"][2]
    dup = sum(row.numpy().tobytes() in seen for b in held_out.values() for row in b[0])
    out(
        f"\nheld-out: {len(distances)} x {args.held_out} sequences, own seeds; {dup} "
        f"of them among the {len(seen):,} training sequences"
    )
    out("\nheld-out accuracy by passkey distance (reach = farthest attention sees):")
    out("| model | " + " | ".join(f"d={d}" for d in distances) + " | train CPU s |")
    out("|---" * (len(distances) + 2) + "|")
    for name, (accs, secs, _) in results.items():
        cells = " | ".join(f"{accs[d]:.3f}" for d in distances)
        out(f"| {name} | {cells} | {secs:.0f} |")
    chance = f"{1 / task.num_values:.3f}"
    out("| chance | " + " | ".join(chance for _ in distances) + " | |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("$ python bench/bench_passkey.py " + " ".join(sys.argv[1:]) + "\n")
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
