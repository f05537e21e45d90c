"""MetaController, StateSummaryEncoder and the controller checkpoint."""

import json
import os

import pytest
import torch

from hmst.models.meta_controller import (
    DECISIONS,
    ControllerConfig,
    MetaController,
    StateSummaryEncoder,
    build_controller,
    load_controller,
    save_controller,
)


def tiny_cfg(**kw) -> ControllerConfig:
    base = dict(
        d_model=32, n_layers=2, n_heads=4, d_ff=64, n_experts=4, state_dim=16,
        query_dim=12, num_features=5, use_query=True,
    )  # fmt: skip
    base.update(kw)
    return ControllerConfig(**base)


def inputs(cfg, B=3, L=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, cfg.query_dim) if L is None else (B, L, cfg.query_dim)
    q = torch.randn(shape, generator=g)
    feats = torch.randn(B, cfg.num_features, generator=g) * 3 + 1
    return q, feats


def test_outputs_keys_shapes_ranges():
    cfg = tiny_cfg()
    enc, ctl = build_controller(cfg)
    q, feats = inputs(cfg, B=5)
    out = ctl(q, enc(feats))
    for d in DECISIONS:
        assert out[d].shape == (5,)
        assert ((out[d] >= 0) & (out[d] <= 1)).all()
        torch.testing.assert_close(out[d], torch.sigmoid(out["logits"][d]))
    assert out["expert_weights"].shape == (5, cfg.n_experts)
    torch.testing.assert_close(out["expert_weights"].sum(-1), torch.ones(5))
    assert out["logits"]["expert"].shape == (5, cfg.n_experts)
    assert out["uncertainty"].shape == (5,) and out["logits"]["uncertainty"].shape == (
        5,
    )
    assert ((out["uncertainty"] >= 0) & (out["uncertainty"] <= 1)).all()
    assert out["value"].shape == (5,) and out["value"].requires_grad
    # the policy starts near p = 0.5 (max entropy) for every decision
    for d in DECISIONS:
        assert (out[d] - 0.5).abs().max() < 0.1


def test_query_dim_defaults_to_d_model_and_dims_are_checked():
    ctl = MetaController(32, 1, 4, 64, n_experts=4, state_dim=8)
    assert ctl.query_dim == 32
    out = ctl(torch.randn(2, 32), torch.randn(2, 8))
    assert out["value"].shape == (2,)
    with pytest.raises(ValueError, match="query_dim"):
        ctl(torch.randn(2, 31), torch.randn(2, 8))
    with pytest.raises(ValueError, match="state_summary"):
        ctl(torch.randn(2, 32), torch.randn(2, 9))
    with pytest.raises(ValueError, match="divisible"):
        tiny_cfg(d_model=30)


@pytest.mark.parametrize("grad", [False, True])  # no_grad may take the fused fast path
def test_masked_query_tokens_do_not_change_outputs(grad):
    cfg = tiny_cfg()
    enc, ctl = build_controller(cfg)
    ctl.eval()
    q, feats = inputs(cfg, B=2, L=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    state = enc(feats).detach()
    with torch.set_grad_enabled(grad):
        out = ctl(q, state, mask)
        junk = q.clone()
        junk[~mask] = 1e3 * torch.randn(int((~mask).sum()), cfg.query_dim)
        out_junk = ctl(junk, state, mask)
        # row 1 alone, truncated to its 2 real tokens, no mask at all
        out_trunc = ctl(q[1:, :2], state[1:])
    for k in (*DECISIONS, "expert_weights", "uncertainty", "value"):
        torch.testing.assert_close(out[k], out_junk[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[k][1:], out_trunc[k], atol=1e-5, rtol=1e-5)
    # the mask is not a no-op: unmasking the junk changes the outputs
    out_unmasked = ctl(junk, state)
    assert (out_unmasked["value"] - out["value"]).abs().max() > 1e-3
    # a query with every token padded still gives finite outputs (state token remains)
    none = ctl(q, state, torch.zeros(2, 6, dtype=torch.bool))
    assert torch.isfinite(none["value"]).all()


def test_pooled_query_equals_one_token_sequence():
    cfg = tiny_cfg()
    enc, ctl = build_controller(cfg)
    q, feats = inputs(cfg, B=3)
    state = enc(feats)
    a, b = ctl(q, state), ctl(q[:, None], state, torch.ones(3, 1, dtype=torch.bool))
    torch.testing.assert_close(a["value"], b["value"])
    torch.testing.assert_close(a["expert_weights"], b["expert_weights"])


def test_distribution_and_act():
    cfg = tiny_cfg()
    enc, ctl = build_controller(cfg)
    q, feats = inputs(cfg, B=64)
    state = enc(feats)
    out = ctl(q, state)
    dist = MetaController.distribution(out)
    assert dist.logits.shape == (64, len(DECISIONS))
    for i, d in enumerate(DECISIONS):
        torch.testing.assert_close(dist.probs[:, i], out[d])
    a1, logp1, v1, _ = ctl.act(q, state, generator=torch.Generator().manual_seed(3))
    a2, logp2, _, _ = ctl.act(q, state, generator=torch.Generator().manual_seed(3))
    assert a1.shape == (64, 4) and set(a1.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a1, a2) and torch.equal(logp1, logp2)
    torch.testing.assert_close(logp1, dist.log_prob(a1).sum(-1))
    torch.testing.assert_close(v1, out["value"])
    # deterministic: p > 0.5
    ad, _, _, _ = ctl.act(q, state, deterministic=True)
    stacked = torch.stack([out[d] for d in DECISIONS], -1)
    assert torch.equal(ad, (stacked > 0.5).float())


def test_encoder_standardises_each_feature():
    enc = StateSummaryEncoder(3, 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g)
    scaled = x * torch.tensor([1.0, 1000.0, 0.01]) + torch.tensor([0.0, 5e4, -0.03])
    enc.update_stats(scaled[:150])  # two batches == one batch of all the data
    enc.update_stats(scaled[150:])
    torch.testing.assert_close(enc.feat_mean, scaled.mean(0), rtol=1e-5, atol=1e-3)
    var = scaled.var(0, unbiased=False)
    torch.testing.assert_close(enc.feat_var, var, rtol=1e-4, atol=0.0)
    enc.update_stats(torch.zeros(0, 3))  # an empty batch changes nothing
    assert float(enc.feat_count) == 400
    ref = StateSummaryEncoder(3, 8)
    ref.mlp.load_state_dict(enc.mlp.state_dict())
    ref.update_stats(x)
    # the same data in other units gives the same summary
    torch.testing.assert_close(enc(scaled), ref(x), atol=1e-4, rtol=1e-3)
    # one feature is not normalised away (a LayerNorm over F = 1 would be constant)
    one = StateSummaryEncoder(1, 4)
    one.update_stats(torch.tensor([[0.0], [10.0]]))
    assert not torch.allclose(one(torch.tensor([[0.0]])), one(torch.tensor([[10.0]])))


def test_config_round_trip_and_unknown_field():
    cfg = tiny_cfg()
    assert ControllerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown controller config"):
        ControllerConfig.from_dict({"d_model": 32, "bogus": 1})


def test_save_load_round_trip(tmp_path):
    cfg = tiny_cfg()
    enc, ctl = build_controller(cfg)
    enc.update_stats(torch.randn(50, cfg.num_features) * 7)
    q, feats = inputs(cfg, B=4)
    enc.eval(), ctl.eval()
    with torch.no_grad():
        ref = ctl(q, enc(feats))
    path = str(tmp_path / "controller")
    save_controller(path, enc, ctl, cfg, extra={"note": [1, 2]})
    assert sorted(os.listdir(path)) == [
        "controller.safetensors",
        "controller_config.json",
    ]
    enc2, ctl2, cfg2, extra = load_controller(path)
    assert cfg2 == cfg and extra == {"note": [1, 2]}
    assert ctl.config == ctl2.config == cfg  # what an engine passes back to save
    assert not ctl2.training and not enc2.training
    with torch.no_grad():
        out = ctl2(q, enc2(feats))
    for k in (*DECISIONS, "expert_weights", "uncertainty", "value"):
        assert torch.equal(out[k], ref[k])
    assert torch.equal(enc2.feat_mean, enc.feat_mean)
    # overwrite in place (atomic swap leaves no .tmp / .old behind)
    save_controller(path, enc, ctl, cfg)
    assert load_controller(path)[3] == {}
    assert not os.path.exists(path + ".tmp") and not os.path.exists(path + ".old")


def test_load_errors(tmp_path):
    cfg = tiny_cfg()
    enc, ctl = build_controller(cfg)
    with pytest.raises(FileNotFoundError, match="controller checkpoint not found"):
        load_controller(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no controller_config.json"):
        load_controller(str(tmp_path / "empty"))

    path = str(tmp_path / "c")
    save_controller(path, enc, ctl, cfg)
    weights = os.path.join(path, "controller.safetensors")
    config = os.path.join(path, "controller_config.json")
    good_weights = open(weights, "rb").read()

    with open(weights, "wb") as f:
        f.write(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt controller weights"):
        load_controller(path)
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="has no controller.safetensors"):
        load_controller(path)
    with open(weights, "wb") as f:
        f.write(good_weights)

    with open(config, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="corrupt controller config"):
        load_controller(path)
    with open(config, "w") as f:
        json.dump({"controller": {**cfg.to_dict(), "d_model": 64}}, f)
    with pytest.raises(ValueError, match="do not match its config"):
        load_controller(path)
    with open(config, "w") as f:
        json.dump({"critic": {}}, f)
    with pytest.raises(ValueError, match="bad controller config"):
        load_controller(path)


def test_without_query_tokens_the_query_does_not_matter():
    cfg = tiny_cfg(use_query=False)
    enc, ctl = build_controller(cfg)
    q, feats = inputs(cfg)
    state = enc(feats)
    a, b = ctl(q, state), ctl(q * 100 + 3, state)
    for k in DECISIONS + ("value", "uncertainty"):
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(ValueError, match="query_dim"):
        ctl(torch.zeros(3, 7), state)  # still checked
