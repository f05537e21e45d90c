"""Fact QA on held-out facts: does each memory and the critic change the outcome?

Runs the real engine (`hmst.inference.env.build_table`: every test question under
each memory configuration, the critic scoring every answer) on the test half of the
QA world's held-out groups, and reports exact match per question category:

    known         answerable from the LM's weights
    semantic      answerable only from semantic memory (FAISS)
    episodic      answerable only from the recent-interaction buffer
    unanswerable  answerable from nothing: the right output is an abstention

Targets (issue #5): semantic-only questions >= 90% EM with semantic memory vs <= 10%
without; no loss on the other categories; critic-gated abstention at least halves the
wrong answers on the unanswerable ones. The peer in every row is the same engine with
the component switched off, measured in the same run.

    python bench/bench_fact_qa.py --system checkpoints/qa/system [--per-category 150]
"""

import argparse
import json
import sys

import torch

from hmst.inference.env import config_index, load_table
from hmst.qa import CATEGORIES


def em(table, rows, ee=0, epi=0, sem=0) -> float:
    c = int(config_index(torch.tensor([[ee, epi, sem, 0]]))[0])
    return float(table.correct[rows, c].float().mean())


def controller_outcomes(system, t, rows) -> dict | None:
    """Right / abstained / wrong outputs per category when the system's PPO controller
    makes every decision (what `engine.answer` does by default)."""
    import os

    from hmst.models.meta_controller import DECISIONS, load_controller

    path = os.path.join(system, "controller")
    if not os.path.isdir(path):
        return None
    enc, ctl, _, _ = load_controller(path)
    with torch.no_grad():
        out = ctl(t.qfeat, enc(t.features))
    acts = torch.stack([(out[k] > 0.5).float() for k in DECISIONS], 1)
    o = t.outcome(torch.arange(len(t)), acts)
    print("\nwith the PPO controller deciding (right = the correct answer, or an "
          "abstention on an unanswerable question):")  # fmt: skip
    print(f"{'category':<14}{'right':>8}{'abstained':>11}{'wrong':>8}")
    res = {}
    for c in CATEGORIES:
        r = rows[c]
        right, abst = float(o["right"][r].mean()), float(o["abstain"][r].mean())
        wrong = float((o["accuracy"][r] < 0).float().mean())
        res[c] = dict(right=right, abstained=abst, wrong=wrong)
        print(f"{c:<14}{100 * right:>7.1f}%{100 * abst:>10.1f}%{100 * wrong:>7.1f}%")
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", default="checkpoints/qa/system")
    p.add_argument("--per-category", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    print("command: python " + " ".join(sys.argv), flush=True)
    torch.set_num_threads(args.threads)
    t = load_table(args.system, "test", per_category=args.per_category)
    rows = {c: (t.category == i).nonzero().squeeze(1) for i, c in enumerate(CATEGORIES)}
    print(f"\n{len(t)} test questions ({args.per_category} per category), exact match:")
    head = (
        f"{'category':<14}{'no memory':>11}{'episodic':>10}{'semantic':>10}{'both':>8}"
    )
    print(head)
    res = {}
    for c in CATEGORIES:
        r = rows[c]
        vals = [em(t, r), em(t, r, epi=1), em(t, r, sem=1), em(t, r, epi=1, sem=1)]
        res[c] = dict(zip(("none", "episodic", "semantic", "both"), vals))
        print(f"{c:<14}" + "".join(f"{100 * v:>9.1f}% " for v in vals))
    # critic-gated abstention (both memories read, the critic on every answer)
    both = int(config_index(torch.tensor([[0, 1, 1, 0]]))[0])
    thr = t.critic_threshold
    abst = (t.critic[:, both] < thr) | t.empty[:, both]
    print(f"\ncritic-gated abstention (both memories, critic threshold {thr}):")
    print(f"{'category':<14}{'wrong, no critic':>18}{'wrong, critic':>15}"
          f"{'abstained':>11}{'right, critic':>15}")  # fmt: skip
    gate = {}
    for c in CATEGORIES:
        r = rows[c]
        correct = t.correct[r, both]
        if c == "unanswerable":
            wrong0 = 1.0  # every answer to an unanswerable question is wrong
            wrong1 = float((~abst[r]).float().mean())
            right1 = float(abst[r].float().mean())
        else:
            wrong0 = float((~correct).float().mean())
            wrong1 = float((~correct & ~abst[r]).float().mean())
            right1 = float((correct & ~abst[r]).float().mean())
        gate[c] = dict(
            wrong_no_critic=wrong0,
            wrong_critic=wrong1,
            abstained=float(abst[r].float().mean()),
            right_critic=right1,
        )
        print(f"{c:<14}{100 * wrong0:>17.1f}%{100 * wrong1:>14.1f}%"
              f"{100 * gate[c]['abstained']:>10.1f}%"
              f"{100 * right1:>14.1f}%")  # fmt: skip
    ctl = controller_outcomes(args.system, t, rows)
    sem = res["semantic"]
    checks = {
        "semantic EM with semantic memory >= 90%": sem["semantic"] >= 0.9,
        "semantic EM without memory <= 10%": sem["none"] <= 0.1,
        "known: no loss with semantic memory": res["known"]["semantic"]
        >= res["known"]["none"],
        "episodic: no loss with semantic memory": res["episodic"]["both"]
        >= res["episodic"]["episodic"],
        "unanswerable wrong answers at least halved by the critic": gate[
            "unanswerable"
        ]["wrong_critic"]
        <= 0.5 * gate["unanswerable"]["wrong_no_critic"],
    }
    print()
    for k, ok in checks.items():
        print(f"  [{'met' if ok else 'NOT met'}] {k}")
    print("\nRESULT " + json.dumps(dict(em=res, critic_gate=gate, controller=ctl,
                                        checks=checks)))  # fmt: skip


if __name__ == "__main__":
    main()
