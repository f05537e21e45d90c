"""Does the PPO meta-controller make better decisions than fixed rules?

Evaluates on the held-out test questions (`hmst.inference.env` outcome table: the
real engine's measured outcome of every decision combination) the deterministic
policy of the controller trained by

    python -m hmst.training.rl_train --checkpoint checkpoints/qa/system --episodes N

against, in the same run and on the same questions:
    never-retrieve     no memory, no critic, no early exit
    always-retrieve    both memories on every query, no critic
    do-everything      both memories + critic on every query
    threshold rule     if the LM's first-token probability < t: one fixed action set,
                       else another; t and both sets tuned on the train questions
    oracle             the best of the 16 action sets for each question (knows the
                       outcome; an upper bound)

Target (issue #5): PPO reaches >= 90% of the oracle's reward gain over
always-retrieve, and beats always-retrieve, never-retrieve and the threshold rule.
Writes the learning curve (bench/results/controller_curve.png).

    python bench/bench_controller.py --system checkpoints/qa/system
"""

import argparse
import json
import os
import sys

import torch

from hmst.inference.env import ALL_ACTIONS, ALWAYS_RETRIEVE, load_table
from hmst.inference.engine import FEATURES
from hmst.models.meta_controller import DECISIONS, load_controller
from hmst.qa import CATEGORIES

HERE = os.path.dirname(os.path.abspath(__file__))


def fixed(bits) -> torch.Tensor:
    return torch.tensor([float(b) for b in bits])


@torch.no_grad()
def controller_actions(table, encoder, controller) -> torch.Tensor:
    """The deterministic policy (act when p > 0.5), as rl_train validates it."""
    return controller.act(table.qfeat, encoder(table.features), True)[0]


def mean_terms(table, actions_N4) -> dict:
    o = table.outcome(torch.arange(len(table)), actions_N4)
    return {k: float(v.mean()) for k, v in o.items()}


def tune_threshold_rule(table):
    """(t, low action index, high action index) maximising mean train reward."""
    R = table.all_outcomes()  # (N, 16)
    conf = table.features[:, FEATURES.index("max_prob")]
    best = (-1e9, None)
    for t in torch.quantile(conf, torch.linspace(0, 1, 41)).tolist() + [1.01]:
        low = conf < t
        r_low = R[low].sum(0)  # best action for the low-confidence rows
        r_high = R[~low].sum(0)
        total = float(r_low.max() + r_high.max()) / len(table)
        if total > best[0]:
            best = (total, (t, int(r_low.argmax()), int(r_high.argmax())))
    return best[1]


def threshold_actions(table, rule) -> torch.Tensor:
    t, lo, hi = rule
    conf = table.features[:, FEATURES.index("max_prob")]
    return torch.where((conf < t)[:, None], ALL_ACTIONS[lo], ALL_ACTIONS[hi])


def plot_curve(history, baselines, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = [h["episodes"] for h in history]
    ax.plot(x, [h["mean_reward"] for h in history], label="PPO (training rollouts)")
    for (name, v), style in zip(baselines.items(), ["--", ":", "-.", "--", ":"]):
        ax.axhline(v, linestyle=style, color="grey" if name != "oracle" else "k")
        ax.text(x[-1], v, f" {name}", va="center", fontsize=8)
    ax.set_xlabel("episodes")
    ax.set_ylabel("mean reward per turn (train questions)")
    ax.set_title("Meta-controller PPO learning curve")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", default="checkpoints/qa/system")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--plot", default=os.path.join(HERE, "results", "controller_curve.png")
    )
    args = p.parse_args()
    print("command: python " + " ".join(sys.argv), flush=True)
    torch.set_num_threads(args.threads)
    ctl_dir = os.path.join(args.system, "controller")
    if not os.path.isdir(ctl_dir):
        sys.exit(
            f"bench_controller: error: no controller in {args.system}: run "
            f"python -m hmst.training.rl_train --checkpoint {args.system} --episodes N"
        )
    encoder, controller, _, extra = load_controller(ctl_dir)
    # the train table PPO used (any size), the 150-per-category test table
    train = load_table(args.system, "train", per_category=None)
    test = load_table(args.system, "test")
    rule = tune_threshold_rule(train)
    policies = {
        "never-retrieve": lambda t: fixed([0, 0, 0, 0]).expand(len(t), 4),
        "always-retrieve": lambda t: ALWAYS_RETRIEVE.expand(len(t), 4),
        "do-everything": lambda t: fixed([0, 1, 1, 1]).expand(len(t), 4),
        "threshold rule": lambda t: threshold_actions(t, rule),
        "PPO controller": lambda t: controller_actions(t, encoder, controller),
    }
    print(f"threshold rule (tuned on {len(train)} train questions): max_prob < "
          f"{rule[0]:.3f} -> {ALL_ACTIONS[rule[1]].int().tolist()}, else "
          f"{ALL_ACTIONS[rule[2]].int().tolist()} (order: {DECISIONS})")  # fmt: skip
    rows = {}
    for name, fn in policies.items():
        rows[name] = mean_terms(test, fn(test))
    rows["oracle"] = {"reward": float(test.all_outcomes().max(1).values.mean())}
    print(f"\n{len(test)} test questions; mean per-turn reward and its terms:")
    print(f"{'policy':<17}{'reward':>8}{'accuracy':>10}{'latency':>9}{'compute':>9}"
          f"{'calib':>8}{'right':>8}{'abstain':>9}")  # fmt: skip
    for name, r in rows.items():
        cells = [r.get(k) for k in ("accuracy", "latency", "compute", "calibration")]
        cells += [r.get("right"), r.get("abstain")]
        fmt = "".join(f"{v:>9.3f}" if v is not None else f"{'':>9}" for v in cells)
        print(f"{name:<17}{r['reward']:>8.3f}{fmt}")
    acts = controller_actions(test, encoder, controller)
    ppo_r = test.outcome(torch.arange(len(test)), acts)["reward"]
    best = test.all_outcomes().max(1)
    print("\nPPO decision rates per category, mean reward vs the oracle's, and the "
          "oracle's early-exit rate:")  # fmt: skip
    print(f"{'category':<14}" + "".join(f"{d:>14}" for d in DECISIONS)
          + f"{'PPO':>8}{'oracle':>8}{'oracle ee':>11}")  # fmt: skip
    for i, c in enumerate(CATEGORIES):
        m = test.category == i
        ee = ALL_ACTIONS[best.indices[m]][:, 0].float().mean()
        print(
            f"{c:<14}"
            + "".join(f"{100 * float(v):>13.1f}%" for v in acts[m].mean(0))
            + f"{float(ppo_r[m].mean()):>8.3f}{float(best.values[m].mean()):>8.3f}"
            + f"{100 * float(ee):>10.1f}%"
        )
    summary = test.policy_summary(acts)  # the gain, as rl_train --val-fraction
    ppo, always, oracle = (summary[k] for k in ("reward", "always_retrieve", "oracle"))
    gain = summary["gain"] if summary["gain"] is not None else float("nan")
    everything = rows["do-everything"]["reward"]
    gain_all = (ppo - everything) / (oracle - everything)
    print(f"\nPPO gain over always-retrieve: {100 * gain:.1f}% of the oracle's "
          f"(over do-everything: {100 * gain_all:.1f}%)")  # fmt: skip
    checks = {
        ">= 90% of the oracle's gain over always-retrieve": gain >= 0.9,
        "beats always-retrieve": ppo > always,
        "beats never-retrieve": ppo > rows["never-retrieve"]["reward"],
        "beats the tuned threshold rule": ppo > rows["threshold rule"]["reward"],
    }
    for k, ok in checks.items():
        print(f"  [{'met' if ok else 'NOT met'}] {k}")
    metrics = os.path.join(args.system, extra.get("metrics", "rl_metrics.jsonl"))
    if os.path.isfile(metrics) and args.plot:
        history = [json.loads(line) for line in open(metrics)]
        base = {k: mean_terms(train, fn(train))["reward"] for k, fn in policies.items()}
        base.pop("PPO controller")
        base["oracle"] = float(train.all_outcomes().max(1).values.mean())
        os.makedirs(os.path.dirname(args.plot), exist_ok=True)
        plot_curve(history, base, args.plot)
        print(f"learning curve: {args.plot}")
    print("\nRESULT " + json.dumps(dict(rewards=rows, gain=gain, checks=checks)))


if __name__ == "__main__":
    main()
