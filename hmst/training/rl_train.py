"""Train the meta-controller with PPO (single file, in the shape of cleanrl's ppo.py).

    python -m hmst.training.rl_train --checkpoint CKPT --episodes N [--out DIR]

Each iteration: reset `episodes_per_rollout` parallel episodes, run them for
`env.episode_len` turns with the current stochastic policy, compute GAE advantages,
run `update_epochs` epochs of shuffled minibatches of the clipped PPO objective (+ value
loss, entropy bonus, optional supervised expert / uncertainty losses), discard the
rollout. The env (`hmst.inference.env.load_env`) follows this protocol:

    env.episode_len, env.query_dim, env.num_features, env.n_experts: int
    env.reset(n, seed) -> Obs                       n parallel episodes
    env.step(actions (n, 4) 0/1 float, DECISIONS order)
        -> (Obs, reward (n,), done (n,) bool, info {term: (n,)})

Every episode lasts exactly `episode_len` turns (done only after the last one). The
next `Obs` returned with done=True is never looked at.

Legend: T turns per episode, N parallel episodes, b_ flattened T*N rollout, mb_
minibatch, Dq query dim, F features, E experts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from hmst.cli.args import OneLineParser, field_value, run_main
from hmst.cli.args import fail as _fail
from hmst.models.meta_controller import (
    DECISIONS,
    ControllerConfig,
    MetaController,
    Obs,
    StateSummaryEncoder,
    build_controller,
    save_controller,
)

PROG = "rl_train"
METRICS_FILE = "rl_metrics.jsonl"


@dataclass
class PPOConfig:
    """PPO hyperparameters (cleanrl's defaults where they apply)."""

    episodes: int = 20_000
    """Total episodes over the whole run."""
    episodes_per_rollout: int = 256
    """Parallel episodes per iteration (the rollout is T * this many turns)."""
    update_epochs: int = 4
    """Passes over each rollout."""
    minibatch_size: int = 512
    """Turns per gradient step (capped at the rollout size)."""
    lr: float = 3e-4
    """Adam learning rate (annealed linearly to 0 when anneal_lr)."""
    gamma: float = 0.0
    """Discount. 0 because in our env a turn's actions do not change later turns (each
    query's outcome depends only on that query's decisions), so a turn's advantage is
    its own reward minus the value; gamma > 0 only adds other turns' noise."""
    gae_lambda: float = 0.95
    """GAE lambda (no effect when gamma = 0)."""
    clip_coef: float = 0.2
    """PPO ratio clip."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus."""
    expert_coef: float = 0.1
    """Weight of KL(expert_target || expert_weights), when the env gives targets."""
    unc_coef: float = 0.1
    """Weight of BCE(uncertainty, answer wrong), when the env gives
    correct_if_answered (which is a label here, never a policy input)."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    target_kl: float | None = None
    """Stop an iteration's epochs once approx_kl exceeds this (None: never)."""
    seed: int = 0
    """Seeds init, action sampling, shuffling and env resets."""
    norm_adv: bool = True
    """Standardise advantages per minibatch."""
    anneal_lr: bool = True
    """Linear LR decay to 0 over the run."""

    def __post_init__(self):
        for name in ("episodes", "episodes_per_rollout", "update_epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.minibatch_size <= 0 or self.lr <= 0 or self.clip_coef <= 0:
            raise ValueError("minibatch_size, lr and clip_coef must be positive")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ValueError("gamma and gae_lambda must be in [0, 1]")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be positive, got {self.target_kl}")

    @property
    def num_iterations(self) -> int:
        return math.ceil(self.episodes / self.episodes_per_rollout)


# -- the PPO pieces ----------------------------------------------------------------


def compute_gae(rewards_TN, values_TN, dones_TN, last_value_N, gamma, lam):
    """(advantages_TN, returns_TN). dones_TN[t] = 1: the episode ended after step t, so
    step t does not bootstrap from step t + 1 (nor from last_value_N at t = T - 1)."""
    T = rewards_TN.shape[0]
    adv_TN = torch.zeros_like(rewards_TN)
    last_gae_N = torch.zeros_like(last_value_N)
    for t in reversed(range(T)):
        next_value_N = last_value_N if t == T - 1 else values_TN[t + 1]
        nonterminal_N = 1.0 - dones_TN[t].to(rewards_TN.dtype)
        delta_N = rewards_TN[t] + gamma * next_value_N * nonterminal_N - values_TN[t]
        last_gae_N = delta_N + gamma * lam * nonterminal_N * last_gae_N
        adv_TN[t] = last_gae_N
    return adv_TN, adv_TN + values_TN


def ppo_loss(
    new_logp, old_logp, advantages, new_value, returns, entropy,
    clip_coef, vf_coef, ent_coef,
) -> dict:  # fmt: skip
    """Clipped surrogate + value loss - entropy bonus (advantages already normalised
    by the caller if wanted). The value loss is unclipped, 0.5 * (v - R)^2: value
    clipping did not help in Andrychowicz et al. 2021's ablations, and with gamma = 0
    the return is one turn's reward, so there is no bootstrapped target to stabilise.
    approx_kl is the (ratio - 1) - log ratio estimator (Schulman's k3)."""
    logratio = new_logp - old_logp
    ratio = logratio.exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg1, pg2).mean()
    v_loss = 0.5 * ((new_value - returns) ** 2).mean()
    ent = entropy.mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return dict(
        loss=pg_loss - ent_coef * ent + vf_coef * v_loss,
        pg_loss=pg_loss,
        v_loss=v_loss,
        entropy=ent,
        approx_kl=approx_kl,
        clipfrac=clipfrac,
    )


def explained_variance(pred, target) -> float | None:
    var = target.var(unbiased=False)
    if var == 0:
        return None
    return float(1 - (target - pred).var(unbiased=False) / var)


# -- rollouts ----------------------------------------------------------------------


@dataclass
class Rollout:
    """One batch of episodes, (T, N, ...) each; the optional targets may be None."""

    query_emb: torch.Tensor
    features: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    info: dict
    expert_target: torch.Tensor | None
    correct: torch.Tensor | None


def _stack(obs_list: list[Obs], name: str):
    xs = [getattr(o, name) for o in obs_list]
    if all(x is None for x in xs):
        return None
    if any(x is None for x in xs):
        raise ValueError(f"env gave Obs.{name} on some turns but not on others")
    return torch.stack(xs)


@torch.no_grad()
def rollout(
    env,
    encoder: StateSummaryEncoder,
    controller: MetaController,
    n: int,
    seed: int,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
    first_obs_hook=None,
) -> Rollout:
    """Run n episodes for env.episode_len turns. `first_obs_hook(obs)` sees the reset
    observation before any action (the trainer seeds feature statistics with it)."""
    encoder.eval()
    controller.eval()
    obs = env.reset(n, seed)
    if first_obs_hook is not None:
        first_obs_hook(obs)
    T = env.episode_len
    steps = []  # (obs, actions, logp, value, reward, done, info) per turn
    for t in range(T):
        state = encoder(obs.features)
        a, logp, v, _ = controller.act(obs.query_emb, state, deterministic, generator)
        next_obs, r, d, info = env.step(a)
        if r.shape != (n,) or d.shape != (n,):
            raise ValueError(
                f"env.step gave reward {tuple(r.shape)}, done {tuple(d.shape)}; "
                f"expected ({n},)"
            )
        if bool(d.any()) != (t == T - 1) or (t == T - 1 and not bool(d.all())):
            raise ValueError(
                f"env episodes must all end after exactly episode_len={T} turns "
                f"(turn {t}: {int(d.sum())} of {n} done)"
            )
        steps.append((obs, a, logp, v, r.float(), d.bool(), info))
        obs = next_obs
    seen, acts, logps, vals, rews, dones, infos = zip(*steps)
    return Rollout(
        query_emb=_stack(seen, "query_emb"),
        features=_stack(seen, "features"),
        actions=torch.stack(acts),
        logp=torch.stack(logps),
        values=torch.stack(vals),
        rewards=torch.stack(rews),
        dones=torch.stack(dones),
        info={k: torch.stack([i[k].float() for i in infos]) for k in infos[0]},
        expert_target=_stack(seen, "expert_target"),
        correct=_stack(seen, "correct_if_answered"),
    )


def rollout_stats(ro: Rollout) -> dict:
    """mean_reward per turn, each reward term's mean and each decision's rate."""
    stats = {"mean_reward": float(ro.rewards.mean())}
    stats.update({k: float(v.mean()) for k, v in ro.info.items()})
    rates = ro.actions.reshape(-1, len(DECISIONS)).mean(0)
    stats.update({f"rate_{d}": float(rates[i]) for i, d in enumerate(DECISIONS)})
    return stats


def evaluate_policy(env, encoder, controller, n: int = 256, seed: int = 0) -> dict:
    """Stats (`rollout_stats`) of the deterministic policy (act when p > 0.5) on n
    fresh episodes."""
    return rollout_stats(rollout(env, encoder, controller, n, seed, deterministic=True))


# -- training ----------------------------------------------------------------------


def _check_dims(env, cfg: ControllerConfig) -> None:
    for name in ("query_dim", "num_features", "n_experts"):
        if getattr(env, name) != getattr(cfg, name):
            raise ValueError(
                f"controller {name} {getattr(cfg, name)} != env {name} "
                f"{getattr(env, name)}"
            )
    if cfg.dropout:
        raise ValueError("PPO needs a deterministic forward: set controller dropout=0")


def _aux_losses(out: dict, mb_expert, mb_correct) -> dict:
    """Supervised side losses: expert KL and uncertainty BCE (present targets only)."""
    aux = {}
    if mb_expert is not None:
        log_q = F.log_softmax(out["logits"]["expert"], dim=-1)
        aux["expert_kl"] = F.kl_div(log_q, mb_expert, reduction="batchmean")
    if mb_correct is not None:
        wrong = 1.0 - mb_correct.float()
        aux["uncertainty_bce"] = F.binary_cross_entropy_with_logits(
            out["logits"]["uncertainty"], wrong
        )
    return aux


def ppo_update(ro, encoder, controller, opt, cfg: PPOConfig, gen) -> dict:
    """`update_epochs` epochs of shuffled minibatches on one rollout (stopping early
    once approx_kl > target_kl); the last minibatch's losses, the epochs run and the
    value head's explained variance."""
    # every episode ends after the rollout's last turn: nothing to bootstrap from
    adv_TN, ret_TN = compute_gae(
        ro.rewards, ro.values, ro.dones, torch.zeros_like(ro.values[0]),
        cfg.gamma, cfg.gae_lambda,
    )  # fmt: skip

    def flat(x):  # (T, N, ...) -> (T * N, ...)
        return None if x is None else x.reshape(-1, *x.shape[2:])

    b_q, b_f, b_a = flat(ro.query_emb), flat(ro.features), flat(ro.actions)
    b_logp, b_adv, b_ret = flat(ro.logp), flat(adv_TN), flat(ret_TN)
    b_exp, b_cor = flat(ro.expert_target), flat(ro.correct)
    params = [*encoder.parameters(), *controller.parameters()]
    B = b_a.shape[0]
    mb_size = min(cfg.minibatch_size, B)
    encoder.train()
    controller.train()
    for epoch in range(1, cfg.update_epochs + 1):
        perm = torch.randperm(B, generator=gen)
        for start in range(0, B, mb_size):
            mb = perm[start : start + mb_size]
            out = controller(b_q[mb], encoder(b_f[mb]))
            dist = MetaController.distribution(out)
            new_logp = dist.log_prob(b_a[mb]).sum(-1)
            mb_adv = b_adv[mb]
            if cfg.norm_adv and len(mb) > 1:
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            losses = ppo_loss(
                new_logp, b_logp[mb], mb_adv, out["value"], b_ret[mb],
                dist.entropy().sum(-1), cfg.clip_coef, cfg.vf_coef, cfg.ent_coef,
            )  # fmt: skip
            aux = _aux_losses(
                out,
                None if b_exp is None else b_exp[mb],
                None if b_cor is None else b_cor[mb],
            )
            loss = losses["loss"]
            if "expert_kl" in aux:
                loss = loss + cfg.expert_coef * aux["expert_kl"]
            if "uncertainty_bce" in aux:
                loss = loss + cfg.unc_coef * aux["uncertainty_bce"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
        if cfg.target_kl is not None and losses["approx_kl"] > cfg.target_kl:
            break
    stats = {k: float(v.detach()) for k, v in losses.items() if k != "loss"}
    stats["epochs"] = epoch  # fewer than update_epochs after a target-KL stop
    stats.update({k: float(v.detach()) for k, v in aux.items()})
    stats.setdefault("expert_kl", None)  # None: the env gave no such target
    stats.setdefault("uncertainty_bce", None)
    stats["explained_variance"] = explained_variance(flat(ro.values), b_ret)
    return stats


def train_ppo(
    env,
    cfg: PPOConfig,
    controller_cfg: ControllerConfig,
    log=print,
    metrics_path: str | None = None,
):
    """(encoder, controller, history). Deterministic given cfg.seed and the env: init
    runs under a forked, seeded global RNG; sampling, shuffling and reset seeds come
    from one torch.Generator."""
    _check_dims(env, controller_cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder, controller = build_controller(controller_cfg)
    params = [*encoder.parameters(), *controller.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5)
    history, done_eps, t0 = [], 0, time.time()
    metrics = open(metrics_path, "w") if metrics_path else None
    try:
        for it in range(cfg.num_iterations):
            if cfg.anneal_lr:
                opt.param_groups[0]["lr"] = cfg.lr * (1 - it / cfg.num_iterations)
            n = min(cfg.episodes_per_rollout, cfg.episodes - done_eps)
            seed = int(torch.randint(2**31 - 1, (), generator=gen))
            # feature statistics stay fixed within an iteration (so the rollout's logp
            # and the update's agree); the very first rollout is normalised with its
            # own reset observation rather than with the identity
            hook = (lambda o: encoder.update_stats(o.features)) if it == 0 else None
            ro = rollout(env, encoder, controller, n, seed, False, gen, hook)
            stats = ppo_update(ro, encoder, controller, opt, cfg, gen)
            encoder.update_stats(ro.features[1:] if it == 0 else ro.features)
            done_eps += n
            rec = {"iteration": it + 1, "episodes": done_eps, **rollout_stats(ro)}
            rec.update(stats, lr=opt.param_groups[0]["lr"], time_s=time.time() - t0)
            history.append(rec)
            if metrics is not None:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
            log(_format(rec))
    finally:
        if metrics is not None:
            metrics.close()
    encoder.eval()
    controller.eval()
    return encoder, controller, history


def _format(rec: dict) -> str:
    keys = ("mean_reward", "approx_kl", "clipfrac", "entropy", "explained_variance")
    parts = [f"iter {rec['iteration']} episodes {rec['episodes']}"]
    parts += [f"{k} {rec[k]:.4f}" for k in keys if rec.get(k) is not None]
    parts += [f"{d} {rec['rate_' + d]:.2f}" for d in DECISIONS]
    return " ".join(parts)


# -- CLI ---------------------------------------------------------------------------


def fail(msg: str) -> None:
    _fail(PROG, msg)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="LM checkpoint directory")
    p.add_argument(
        "--out", default=None, help="output directory (default: the checkpoint)"
    )
    p.add_argument("--split", default="train", help="env split (load_env)")
    p.add_argument(
        "--per-category", type=int, default=400,
        help="questions per category in the outcome table (built once, cached)",
    )  # fmt: skip
    p.add_argument(
        "--table-seed", type=int, default=0,
        help="seed of the questions sampled into the outcome table (not PPO's --seed)",
    )  # fmt: skip
    p.add_argument(
        "--val-fraction", type=float, default=None,
        help="hold out this share of the questions (fixed split) and report the "
        "deterministic policy's reward on them: for choosing PPO settings",
    )  # fmt: skip
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument(
        "--set", type=field_value, action="append", metavar="FIELD=VALUE",
        help="ControllerConfig override, e.g. --set d_model=64 (repeatable)",
    )  # fmt: skip
    # one flag per PPOConfig field: --episodes, --lr, --ent-coef, --no-anneal-lr, ...
    for f in dataclasses.fields(PPOConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = int if isinstance(f.default, int) else float
            p.add_argument(flag, type=kind, default=None, help=f"PPOConfig.{f.name}")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.episodes is None:
        fail("--episodes is required")
    if args.episodes <= 0:
        fail(f"--episodes must be positive, got {args.episodes}")
    if not os.path.isdir(args.checkpoint):
        fail(f"checkpoint not found: {args.checkpoint}")
    if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
        fail(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    return args


def ppo_config(args) -> PPOConfig:
    names = [f.name for f in dataclasses.fields(PPOConfig)]
    return PPOConfig(
        **{k: getattr(args, k) for k in names if getattr(args, k) is not None}
    )


@torch.no_grad()
def validate(table, encoder, controller) -> dict:
    """The deterministic policy on every question of an OutcomeTable, next to
    always-retrieve and the oracle (`OutcomeTable.policy_summary`)."""
    encoder.eval()
    controller.eval()
    actions, *_ = controller.act(table.qfeat, encoder(table.features), True)
    return {"questions": len(table), **table.policy_summary(actions)}


def run(args, log=print) -> list[dict]:
    from hmst.inference.env import load_env  # lazily: it loads the LM and memories

    cfg = ppo_config(args)
    env = load_env(
        args.checkpoint,
        split=args.split,
        seed=args.table_seed,
        per_category=args.per_category,
    )
    val = None
    if args.val_fraction is not None:  # a fixed split: every PPO seed sees the same
        from hmst.inference.env import QAEnv

        rest, val = env.table.split(args.val_fraction, seed=0)
        env = QAEnv(rest, env.episode_len)
    ccfg = ControllerConfig.from_dict(
        {
            **dict(args.set or []),
            "query_dim": env.query_dim,
            "num_features": env.num_features,
            "n_experts": env.n_experts,
        }
    )
    out_dir = args.out or args.checkpoint
    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, METRICS_FILE)
    encoder, controller, history = train_ppo(env, cfg, ccfg, log, metrics_path)
    extra = {"ppo": asdict(cfg), "history_last": history[-1], "metrics": METRICS_FILE}
    if val is not None:
        extra["validation"] = v = validate(val, encoder, controller)
        log(
            f"validation ({v['questions']} held-out questions): reward "
            f"{v['reward']:.4f} | always-retrieve {v['always_retrieve']:.4f} | oracle "
            f"{v['oracle']:.4f} | {100 * v['gain']:.1f}% of the oracle's gain"
        )
    path = os.path.join(out_dir, "controller")
    save_controller(path, encoder, controller, ccfg, extra)
    if os.path.isfile(os.path.join(out_dir, "manifest.json")):
        from hmst.inference.engine import add_component

        add_component(out_dir, "controller")  # the saved system now has a controller
    log(f"wrote {path} and {metrics_path}")
    return history


def main(argv=None) -> list[dict]:
    return run_main(PROG, run, parse_args(argv))


if __name__ == "__main__":
    main()
