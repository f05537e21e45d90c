"""Training audit: routing statistics, probe audits, metrics records and the plots."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CORPUS, ROOT, TINY_FLAGS, tiny_config
from hmst.models.base_moe import BaseMoEModel
from hmst.observe.audit import ProbeAudit, RoutingStats, resolve_module, topk_jaccard


def test_routing_stats_sums_window_and_resets():
    rs = RoutingStats(2, 4, "cpu")
    c1 = torch.tensor([[4, 0, 2, 2], [2, 2, 2, 2]])
    c2 = torch.tensor([[4, 0, 0, 4], [2, 2, 2, 2]])
    rs.update(c1, torch.tensor([1.0, 2.0]), torch.tensor(1.5), torch.tensor(0.5))
    rs.update(c2, torch.tensor([3.0, 2.0]), torch.tensor(0.5), torch.tensor(1.5))
    s = rs.summary()
    assert s["expert_tokens"] == [[8, 0, 2, 6], [4, 4, 4, 4]]
    assert s["expert_load_max_over_mean_per_layer"] == pytest.approx([2.0, 1.0])
    assert s["expert_load_max_over_mean"] == pytest.approx(2.0)
    assert s["dead_experts"] == [1, 0]
    assert s["router_entropy"] == pytest.approx([2.0, 2.0])
    assert s["load_balance_loss"] == pytest.approx(1.0)
    assert s["router_z_loss"] == pytest.approx(1.0)
    assert rs.summary()["expert_tokens"] == [[0] * 4, [0] * 4]  # a new window


def test_resolve_module_paths():
    model = BaseMoEModel(config=tiny_config())
    assert resolve_module(model, "layers[-1].moe") is model.layers[1].moe
    assert resolve_module(model, "layers[0].attn") is model.layers[0].attn
    for bad in ("layers[5].moe", "layers.nope", "layers[0]..moe", "config"):
        with pytest.raises(ValueError, match="module path"):
            resolve_module(model, bad)


def test_router_entropy_matches_definition():
    model = BaseMoEModel(config=tiny_config())
    ids = torch.randint(0, 300, (2, 16))
    seen = []
    model.layers[0].moe.router.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    out = model(ids)
    probs = model.layers[0].moe.router.gate(seen[0]).softmax(-1)
    expected = -(probs * probs.log()).sum(-1).mean()
    assert out["router_entropy"][0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_probe_audit_stability_and_activations():
    model = BaseMoEModel(config=tiny_config())
    probe = torch.randint(0, 300, (2, 16))
    audit = ProbeAudit(model, probe, ["layers[-1].moe"])
    first = audit.run(model)
    assert "routing_top1_agreement" not in first  # nothing to compare with yet
    same = audit.run(model)
    assert same["routing_top1_agreement"] == [1.0, 1.0]
    assert same["routing_topk_jaccard"] == pytest.approx([1.0, 1.0])
    captured = []
    h = model.layers[-1].moe.register_forward_hook(
        lambda m, i, o: captured.append(o[0])
    )
    model(probe)
    h.remove()
    assert same["activations"]["layers[-1].moe"]["rms"] == pytest.approx(
        captured[0].square().mean().sqrt().item(), rel=1e-5
    )
    with torch.no_grad():  # a different router moves the choices
        for block in model.layers:
            block.moe.router.gate.weight.normal_()
    moved = audit.run(model)
    assert min(moved["routing_top1_agreement"]) < 1.0
    assert not model.layers[0].moe.router._forward_hooks  # hooks gone after the probe


def test_topk_jaccard_hand_case():
    a = torch.tensor([[0, 1], [2, 3]])
    b = torch.tensor([[1, 0], [2, 0]])
    assert topk_jaccard(a, b) == pytest.approx((1.0 + 1 / 3) / 2)


def test_training_writes_audit_and_plots(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", CORPUS, "--output-dir", str(out), *TINY_FLAGS,
           "--val-split", "0.1", "--max-steps", "6", "--eval-every", "3",
           "--batch-size", "4",
           "--audit-layers", "layers[0].attn", "layers[-1].moe"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in recs if r["kind"] == "train"]
    # every layer sees batch x seq x top_k assignments per step (log every step)
    assert all(sum(row) == 4 * 32 * 2 for r in train for row in r["expert_tokens"])
    audits = [r for r in recs if r["kind"] == "audit"]
    assert [a["step"] for a in audits] == [3, 6]
    assert set(audits[0]["activations"]) == {"layers[0].attn", "layers[-1].moe"}
    assert all(0 <= x <= 1 for x in audits[1]["routing_top1_agreement"])
    r = subprocess.run(
        [sys.executable, "scripts/plot_metrics.py", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pngs = sorted(os.listdir(out / "plots"))
    assert pngs == ["audit.png", "expert_load.png", "losses.png", "routing.png"]
    assert all(os.path.getsize(out / "plots" / p) > 10_000 for p in pngs)


def test_bad_audit_path_and_plot_input(tmp_path):
    cmd = [sys.executable, "train.py", CORPUS, "--output-dir", str(tmp_path / "r"),
           *TINY_FLAGS, "--val-split", "0.1", "--max-steps", "2",
           "--audit-layers", "layers[9].moe"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "train.py: error: bad module path 'layers[9].moe'" in r.stderr
    r = subprocess.run(
        [sys.executable, "scripts/plot_metrics.py", str(tmp_path / "missing")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "metrics file not found" in r.stderr
