"""PPO pieces (GAE, clipped loss) by hand, and PPO learning a synthetic bandit env."""

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from hmst.models.meta_controller import DECISIONS, ControllerConfig, load_controller
from hmst.models.meta_controller import Obs, build_controller
from hmst.training import rl_train
from hmst.training.rl_train import (
    PPOConfig,
    compute_gae,
    evaluate_policy,
    ppo_loss,
    train_ppo,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEM = DECISIONS.index("semantic")


class BanditEnv:
    """Contextual bandit in the env protocol. Each turn is a fresh query:
    accuracy  +1 when semantic == (feature 0 > 0), the only thing worth learning;
    compute   -0.05 per other decision taken (early_exit, episodic, verification);
    latency   -0.05 * semantic;  calibration 0.
    Optimal reward per turn: 1 - 0.05 * P(feature 0 > 0) = 0.975. Feature 0 has a large
    offset and scale, so the policy has to use the encoder's normalisation.
    expert_target depends on the query embedding; correct_if_answered = feature 1 > 0.
    """

    episode_len, query_dim, num_features, n_experts = 2, 6, 3, 4
    ends_after = 2  # turns; == episode_len unless a test breaks the protocol

    def __init__(self):
        self.proj = torch.randn(
            self.query_dim, self.n_experts, generator=torch.Generator().manual_seed(9)
        )

    def _obs(self, n):
        q = torch.randn(n, self.query_dim, generator=self.gen)
        z = torch.randn(n, self.num_features, generator=self.gen)
        self.good_semantic = (z[:, 0] > 0).float()
        feats = z * torch.tensor([50.0, 1.0, 1.0]) + torch.tensor([200.0, 0.0, 0.0])
        return Obs(
            query_emb=q,
            features=feats,
            expert_target=torch.softmax(2 * q @ self.proj, -1),
            correct_if_answered=(z[:, 1] > 0).float(),
        )

    def reset(self, n, seed):
        self.gen, self.t = torch.Generator().manual_seed(seed), 0
        return self._obs(n)

    def step(self, actions):
        n = actions.shape[0]
        accuracy = (actions[:, SEM] == self.good_semantic).float()
        compute = -0.05 * (actions.sum(-1) - actions[:, SEM])
        latency = -0.05 * actions[:, SEM]
        info = dict(
            accuracy=accuracy, latency=latency, compute=compute,
            calibration=torch.zeros(n),
        )  # fmt: skip
        self.t += 1
        done = torch.full((n,), self.t == self.ends_after)
        return self._obs(n), accuracy + latency + compute, done, info


def tiny_controller_cfg(env) -> ControllerConfig:
    return ControllerConfig(
        d_model=32, n_layers=1, n_heads=4, d_ff=64, state_dim=16,
        n_experts=env.n_experts, query_dim=env.query_dim,
        num_features=env.num_features, use_query=True,  # the expert target needs it
    )  # fmt: skip


def fast_ppo(**kw) -> PPOConfig:
    base = dict(
        episodes=128 * 20, episodes_per_rollout=128, minibatch_size=64, lr=3e-3,
        update_epochs=4,
    )  # fmt: skip
    base.update(kw)
    return PPOConfig(**base)


# -- GAE and the clipped loss, by hand ---------------------------------------------


def test_compute_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.5], [2.0, -1.0], [3.0, 2.0]])
    values = torch.tensor([[0.5, 1.0], [1.0, 0.0], [1.5, 0.5]])
    dones = torch.tensor([[0, 0], [0, 1], [0, 0]])  # column 1 ends after t = 1
    last_value = torch.tensor([2.0, 1.0])
    adv, ret = compute_gae(rewards, values, dones, last_value, gamma=0.9, lam=0.8)
    # column 0: deltas 1.4, 2.35, 3.3; A2 = 3.3, A1 = 2.35 + 0.72 * 3.3,
    # A0 = 1.4 + 0.72 * A1.  Column 1: deltas -0.5, -1.0 (terminal: no bootstrap),
    # 2.4; A1 = -1.0 (no carry over the done), A0 = -0.5 + 0.72 * -1.0.
    expected_adv = torch.tensor([[4.80272, -1.22], [4.726, -1.0], [3.3, 2.4]])
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_adv + values)
    # gamma = 0: advantage = reward - value, whatever lambda and the dones
    adv0, ret0 = compute_gae(rewards, values, dones, last_value, gamma=0.0, lam=0.95)
    torch.testing.assert_close(adv0, rewards - values)
    torch.testing.assert_close(ret0, rewards)


def test_ppo_loss_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7])
    new_logp = ratio.log().requires_grad_()
    old_logp = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    value = torch.tensor([1.0, 0.0, 2.0, -1.0])
    returns = torch.tensor([0.0, 0.0, 1.0, 1.0])
    entropy = torch.tensor([0.5, 1.0, 1.5, 1.0])
    out = ppo_loss(new_logp, old_logp, adv, value, returns, entropy, 0.2, 0.5, 0.01)
    # per sample max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 2.2, 0.8 (clipped)
    assert out["pg_loss"].item() == pytest.approx(0.325)
    assert out["v_loss"].item() == pytest.approx(0.75)  # 0.5 * mean(1, 0, 1, 4)
    assert out["entropy"].item() == pytest.approx(1.0)
    assert out["clipfrac"].item() == pytest.approx(0.75)  # |r - 1| > 0.2: 3 of 4
    kl = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 0.7)]
    assert out["approx_kl"].item() == pytest.approx(sum(kl) / 4)
    assert out["approx_kl"].item() == pytest.approx(0.0872617, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.325 - 0.01 * 1.0 + 0.5 * 0.75)
    out["loss"].backward()
    # clipped samples pass no policy gradient; sample 1 (unclipped): -A * r / 4
    g = new_logp.grad
    assert g[0].item() == 0.0 and g[3].item() == 0.0
    assert g[1].item() == pytest.approx(-0.125)


# -- PPO on the synthetic env ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    env = BanditEnv()
    metrics = str(tmp_path_factory.mktemp("rl") / "m.jsonl")
    ccfg = tiny_controller_cfg(env)
    enc, ctl, hist = train_ppo(env, fast_ppo(), ccfg, lambda s: None, metrics)
    return env, ccfg, enc, ctl, hist, metrics


def test_ppo_learns_the_bandit(trained):
    env, ccfg, enc, ctl, hist, _ = trained
    with torch.random.fork_rng():
        torch.manual_seed(0)
        enc0, ctl0 = build_controller(ccfg)
    enc0.update_stats(env.reset(512, 1).features)  # a fair untrained baseline
    before = evaluate_policy(env, enc0, ctl0, n=512, seed=123)
    after = evaluate_policy(env, enc, ctl, n=512, seed=123)
    assert after["mean_reward"] > 0.92  # optimum 0.975
    assert after["mean_reward"] > before["mean_reward"] + 0.25
    assert after["accuracy"] > 0.95
    for d in ("early_exit", "episodic", "verification"):  # pure cost: learned off
        assert after[f"rate_{d}"] < 0.05
    assert 0.4 < after["rate_semantic"] < 0.6
    # supervised heads learned too: expert KL fell, uncertainty tracks wrong answers
    assert hist[-1]["expert_kl"] < 0.5 * hist[0]["expert_kl"]
    obs = env.reset(512, 7)
    with torch.no_grad():
        unc = ctl(obs.query_emb, enc(obs.features))["uncertainty"]
    wrong = obs.correct_if_answered == 0
    assert unc[wrong].mean() > unc[~wrong].mean() + 0.3


def test_history_and_metrics_file(trained):
    *_, hist, metrics = trained
    assert [h["iteration"] for h in hist] == list(range(1, 21))
    assert hist[-1]["episodes"] == 128 * 20
    keys = {
        "mean_reward", "accuracy", "latency", "compute", "calibration", "approx_kl",
        "clipfrac", "entropy", "explained_variance", "pg_loss", "v_loss",
        "expert_kl", *(f"rate_{d}" for d in DECISIONS),
    }  # fmt: skip
    assert keys <= set(hist[0])
    with open(metrics) as f:
        lines = [json.loads(line) for line in f]
    assert lines == json.loads(json.dumps(hist))
    # entropy falls as the policy commits; the LR anneals towards 0
    assert hist[-1]["entropy"] < hist[0]["entropy"]
    assert hist[-1]["lr"] < hist[0]["lr"]


def test_ppo_is_deterministic_given_the_seed():
    env = BanditEnv()
    ccfg = tiny_controller_cfg(env)
    cfg = fast_ppo(episodes=64 * 2, episodes_per_rollout=64, update_epochs=2)
    runs = [train_ppo(env, cfg, ccfg, log=lambda s: None) for _ in range(2)]
    cfg1 = fast_ppo(episodes=64 * 2, episodes_per_rollout=64, update_epochs=2, seed=1)
    other = train_ppo(env, cfg1, ccfg, log=lambda s: None)

    def strip(h):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in h]

    assert strip(runs[0][2]) == strip(runs[1][2])
    for a, b in zip(runs[0][1].parameters(), runs[1][1].parameters()):
        assert torch.equal(a, b)
    assert strip(other[2]) != strip(runs[0][2])


def test_last_iteration_takes_the_remaining_episodes_and_target_kl_stops():
    env = BanditEnv()
    ccfg = tiny_controller_cfg(env)
    cfg = fast_ppo(episodes=100, episodes_per_rollout=64, target_kl=1e-9)
    _, _, hist = train_ppo(env, cfg, ccfg, log=lambda s: None)
    assert [h["episodes"] for h in hist] == [64, 100]
    assert [h["epochs"] for h in hist] == [1, 1]  # stopped after the first epoch
    cfg.target_kl = None
    _, _, hist = train_ppo(env, cfg, ccfg, log=lambda s: None)
    assert [h["epochs"] for h in hist] == [4, 4]


def test_env_mismatch_and_bad_config_raise():
    env = BanditEnv()
    wrong_dim = ControllerConfig(query_dim=7, num_features=3, n_experts=4)
    with pytest.raises(ValueError, match="query_dim"):
        train_ppo(env, fast_ppo(), wrong_dim)
    dropout = ControllerConfig(query_dim=6, num_features=3, n_experts=4, dropout=0.1)
    with pytest.raises(ValueError, match="dropout"):
        train_ppo(env, fast_ppo(), dropout)
    with pytest.raises(ValueError, match="episodes must be positive"):
        PPOConfig(episodes=0)
    bad = BanditEnv()
    bad.episode_len = 3  # the env still ends episodes after 2 turns
    cfg = fast_ppo(episodes=8, episodes_per_rollout=8)
    with pytest.raises(ValueError, match="episode_len=3"):
        train_ppo(bad, cfg, tiny_controller_cfg(bad), log=lambda s: None)


# -- CLI ---------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "hmst.training.rl_train", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_bad_input_exits_2(tmp_path):
    (tmp_path / "ckpt").mkdir()
    for args, msg in (
        (["--checkpoint", str(tmp_path / "ckpt"), "--episodes", "0"],
         "--episodes must be positive"),
        (["--checkpoint", str(tmp_path / "nope"), "--episodes", "10"],
         "checkpoint not found"),
    ):  # fmt: skip
        r = _cli(*args)
        assert r.returncode == 2
        err = r.stderr.strip()
        assert err.startswith(f"rl_train: error: {msg}") and len(err.splitlines()) == 1


def test_cli_trains_and_saves_with_an_env(tmp_path, monkeypatch, capsys):
    calls = []

    def load_env(checkpoint, split="train", seed=0, per_category=150):
        calls.append((checkpoint, split, seed))
        return BanditEnv()

    fake = types.ModuleType("hmst.inference.env")
    fake.load_env = load_env
    monkeypatch.setitem(sys.modules, "hmst.inference", types.ModuleType("x"))
    monkeypatch.setitem(sys.modules, "hmst.inference.env", fake)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    ckpt.mkdir()
    hist = rl_train.main(
        ["--checkpoint", str(ckpt), "--episodes", "64", "--episodes-per-rollout", "32",
         "--out", str(out), "--seed", "3", "--ent-coef", "0.02", "--no-anneal-lr",
         "--set", "d_model=32", "--set", "n_layers=1", "--set", "state_dim=8"]
    )  # fmt: skip
    assert calls == [(str(ckpt), "train", 0)]  # --table-seed, not PPO's --seed
    assert len(hist) == 2 and hist[0]["lr"] == hist[1]["lr"] == 3e-4
    enc, ctl, cfg, extra = load_controller(str(out / "controller"))
    assert cfg.d_model == 32 and cfg.query_dim == BanditEnv.query_dim
    assert extra["ppo"]["ent_coef"] == 0.02 and extra["ppo"]["seed"] == 3
    assert extra["metrics"] == "rl_metrics.jsonl"
    assert extra["history_last"] == json.loads(json.dumps(hist[-1]))
    with open(out / "rl_metrics.jsonl") as f:
        assert len(f.readlines()) == 2
    assert "wrote" in capsys.readouterr().out
