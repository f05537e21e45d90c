"""Does the controller need a state feature? PPO with all of `hmst.inference.engine`'s
FEATURES against PPO without the named ones, on held-out *training* questions (the
system's cached train outcome table, a fixed share held out as `rl_train
--val-fraction` does; the test table is never looked at), over several PPO seeds.

    python bench/bench_controller_features.py [--system checkpoints/qa/system]
                                            [--drop prompt_nll] [--seeds 4]
"""

import argparse
import dataclasses
import sys

import torch

from hmst.inference.engine import FEATURES
from hmst.inference.env import QAEnv, load_table
from hmst.models.meta_controller import ControllerConfig
from hmst.training.rl_train import PPOConfig, train_ppo, validate


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", default="checkpoints/qa/system")
    p.add_argument("--drop", nargs="+", default=["prompt_nll"], choices=FEATURES)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--episodes", type=int, default=20_000)
    args = p.parse_args()
    print("command: python " + " ".join(sys.argv), flush=True)
    torch.set_num_threads(1)
    table = load_table(args.system, "train", per_category=None)
    n_experts = table.expert_target.shape[1]
    variants = {
        "all features": list(range(len(FEATURES))),
        "without "
        + ", ".join(args.drop): [
            i for i, f in enumerate(FEATURES) if f not in args.drop
        ],
    }
    summary = {}
    for name, keep in variants.items():
        rest, val = dataclasses.replace(table, features=table.features[:, keep]).split(
            args.val_fraction, seed=0
        )
        cfg = ControllerConfig(
            query_dim=table.qfeat.shape[1], num_features=len(keep), n_experts=n_experts
        )
        gains = []
        for seed in range(args.seeds):
            ppo = PPOConfig(episodes=args.episodes, seed=seed)
            enc, ctl, _ = train_ppo(QAEnv(rest), ppo, cfg, log=lambda s: None)
            tr, va = validate(rest, enc, ctl), validate(val, enc, ctl)
            gains.append(va["gain"])
            print(f"{name:<28} seed {seed}: train {tr['gain']:.1%} of the oracle's "
                  f"gain | held-out reward {va['reward']:.4f}, {va['gain']:.1%}",
                  flush=True)  # fmt: skip
        summary[name] = sum(gains) / len(gains)
    print(f"\n{len(val)} held-out questions; mean share of the oracle's gain over "
          "always-retrieve:")  # fmt: skip
    for name, g in summary.items():
        print(f"  {name:<28} {g:.1%}")


if __name__ == "__main__":
    main()
