"""Early exit: never-exit == the model, exit-at-once counts, KV-cached decoding ==
the teacher-forced simulation, heads save -> load, CLI errors."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config

from hmst.data import (
    TokenData,
    eval_windows,
    read_documents,
    split_documents_tail,
    tokenize_documents,
)
from hmst.models.base_moe import BaseMoEModel
from hmst.models.early_exit import (
    NEVER,
    EarlyExitConfig,
    EarlyExitHeads,
    early_exit_forward,
    greedy_decode,
    forced_decode,
    layer_counts,
)
from hmst.training.early_exit_train import (
    CONFIG_FILE,
    KL_FLOOR,
    confidence_target,
    evaluate_exit,
    exit_features,
    exit_oracle,
    fit_confidence,
    fit_kv_fill,
    head_losses,
    load_heads,
    prepare_splits,
    save_heads,
)

L = 4


def build(
    dtype=torch.float32, layers=(0, 1, 2), seed=0, rule="learned", hidden=16,
    kv_fill="copy",
):  # fmt: skip
    torch.manual_seed(seed)
    cfg = tiny_config(n_layers=L)
    model = BaseMoEModel(config=cfg).to(dtype).eval().requires_grad_(False)
    heads = EarlyExitHeads(
        cfg, EarlyExitConfig(layers, 8, hidden, rule=rule, kv_fill=kv_fill)
    )
    heads.init_from(model)
    with torch.no_grad():  # random, spread-out confidences and non-trivial adapters
        for p in list(heads.conf.parameters()) + list(heads.adapters.parameters()):
            p.normal_(0.0, 0.5)
    return model, heads.to(dtype).eval()


def mid_threshold(model, heads, ids):
    """A threshold at which some tokens exit early and others do not."""
    from hmst.models.early_exit import base_hidden_states

    hs, _ = base_hidden_states(model, ids)
    conf = torch.cat([heads.confidence(model, i, hs[i], "learned")[0].flatten()
                      for i in heads.config.exit_layers])  # fmt: skip
    return float(conf.detach().quantile(0.75))


def test_never_exit_equals_model_exactly():
    model, heads = build()
    ids = torch.randint(0, 300, (3, 32))
    out = early_exit_forward(model, heads, ids, threshold=NEVER)
    assert torch.equal(out["logits"], model(ids)["logits"])
    assert (out["exit_layer"] == L - 1).all()
    prompt = ids[:1, :5]
    toks, exits = greedy_decode(model, heads, prompt, 12, threshold=NEVER)
    ref, _ = greedy_decode(model, None, prompt, 12)
    assert torch.equal(toks, ref) and exits == [L - 1] * 12
    full = model(torch.cat([prompt, toks[:, :-1]], 1))["logits"][0, 4:].argmax(-1)
    assert torch.equal(full, toks[0])


@pytest.mark.parametrize("layers", [(0, 1, 2), (1, 2)])
def test_threshold_zero_exits_at_first_exit_layer(layers):
    model, heads = build(layers=layers)
    ids = torch.randint(0, 300, (2, 32))
    out = early_exit_forward(model, heads, ids, threshold=0.0)
    first = layers[0]
    assert (out["exit_layer"] == first).all()
    c = layer_counts(out["exit_layer"], L)
    n = ids.numel()
    assert c["block_evals"] == n * (first + 1)
    assert c["kv_fills"] == n * (L - 1 - first)
    assert c["saved_fraction"] == pytest.approx(1 - (first + 1) / L)
    # The emitted distribution is that exit head's, position by position.
    x = model.embed(ids)
    cos, sin = model.rope_cos[:32], model.rope_sin[:32]
    with torch.no_grad():
        for layer in model.layers[: first + 1]:
            x = layer(x, cos, sin)[0]
        expect = heads.logits(model, first, x)
    torch.testing.assert_close(out["logits"], expect, rtol=1e-5, atol=1e-5)


def test_exit_oracle_ends_match_the_full_model_and_first_head():
    """lam 0: nothing is worth a KL > 0, every token runs the full model; a huge lam:
    every token exits at the first head, whose teacher-forced ppl is the one
    `evaluate_exit` measures at threshold 0 (where the K/V fill, which the oracle
    ignores, cannot matter: no token runs a block past the first head)."""
    model, heads = build(layers=(1, 2))
    windows = [torch.randint(0, 300, (33,)).numpy() for _ in range(3)]
    lo, hi = exit_oracle(model, heads, windows, lams=(0.0, 1e6))
    full = evaluate_exit(model, None, windows, None)
    assert lo["saved_fraction"] == 0.0 and lo["d_ppl"] == pytest.approx(0.0)
    assert lo["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    assert hi["saved_fraction"] == pytest.approx(1 - 2 / L)
    first = evaluate_exit(model, heads, windows, 0.0)
    assert hi["ppl"] == pytest.approx(first["ppl"], rel=1e-4)


def test_depth_bonus_adds_a_log_of_blocks_saved_to_the_score():
    model, heads = build(layers=(0, 1, 2))
    x = torch.randn(5, model.config.d_model)
    plain = {i: heads.score(i, x) for i in (0, 1, 2)}
    heads.config.depth_bonus = 2.0
    for i in (0, 1, 2):  # an exit after block i saves L - 1 - i blocks
        assert heads.bonus(i) == pytest.approx(2.0 * math.log(L - 1 - i))
        torch.testing.assert_close(heads.score(i, x), plain[i] + heads.bonus(i))
    assert heads.bonus(2) == 0.0  # saves one block: ln 1 = 0
    ids = torch.randint(0, 300, (2, 32))
    tau = mid_threshold(model, heads, ids)
    out = early_exit_forward(model, heads, ids, threshold=tau)
    heads.config.depth_bonus = 0.0
    ref = early_exit_forward(model, heads, ids, threshold=tau)
    # Every score rose or stayed, so position 0 (whose states depend on no other
    # token's exit) can only exit earlier; the bonus changes some decisions.
    assert (out["exit_layer"][:, 0] <= ref["exit_layer"][:, 0]).all()
    assert not torch.equal(out["exit_layer"], ref["exit_layer"])
    with pytest.raises(ValueError, match="depth_bonus"):
        EarlyExitConfig((0, 1), depth_bonus=-1.0)


def test_prompt_positions_never_exit():
    model, heads = build()
    ids = torch.randint(0, 300, (2, 32))
    out = early_exit_forward(model, heads, ids, threshold=0.0, exit_from=10)
    assert (out["exit_layer"][:, :10] == L - 1).all()
    assert (out["exit_layer"][:, 10:] == 0).all()
    ref = model(ids)["logits"]
    torch.testing.assert_close(out["logits"][:, :10], ref[:, :10])


@pytest.mark.parametrize("rule,bonus,fill", [("learned", 0.0, "copy"),
                                             ("learned", 1.5, "copy"),
                                             ("learned", 0.0, "learned"),
                                             ("max_prob", 0.0, "copy")])  # fmt: skip
def test_cached_decode_equals_teacher_forced_simulation(rule, bonus, fill):
    """Token-by-token decoding with the KV cache (K/V fill for skipped blocks) takes
    the same exit decisions and emits the same distributions as the layer-parallel
    teacher-forced pass over the whole sequence; fp64 so no decision sits on a
    rounding tie."""
    model, heads = build(torch.float64, rule=rule, kv_fill=fill)
    assert len(heads.kv_maps) == (3 if fill == "learned" else 0)  # 0_2 0_3 1_3
    heads.config.depth_bonus = bonus
    prompt = torch.randint(0, 300, (1, 6))
    if rule == "learned":
        tau = mid_threshold(model, heads, prompt)
    else:
        tau = 0.0105  # max-prob of a near-uniform 300-way tiny model: mixed exits
    toks, exits = greedy_decode(model, heads, prompt, 24, threshold=tau)
    seq = torch.cat([prompt, toks[:, :-1]], 1)
    sim = early_exit_forward(model, heads, seq, threshold=tau, exit_from=6)
    assert sim["exit_layer"][0, 5:].tolist() == exits
    assert len(set(exits)) >= 2, f"threshold gave no mix of exit layers: {exits}"
    assert torch.equal(sim["logits"][0, 5:].argmax(-1), toks[0])
    # The emitted distributions too, step by step against the cache.
    logits, exits2 = forced_decode(model, heads, seq, 6, tau)
    assert exits2 == exits
    torch.testing.assert_close(logits, sim["logits"][:, 5:])
    # Skipped blocks matter: later tokens differ from the full model's.
    full = model(seq)["logits"][0, 5:]
    assert not torch.allclose(sim["logits"][0, 5:], full)


def test_only_heads_get_gradients():
    model, heads = build()
    heads.train()
    x = torch.randint(0, 300, (2, 32))
    loss, kls = head_losses(model, heads, x, torch.roll(x, -1, 1), kl_weight=0.5)
    loss.backward()
    assert set(kls) == {0, 1, 2} and all(v >= 0 for v in kls.values())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in heads.conf.parameters())  # fitted in phase 2
    grads = [p.grad for n, p in heads.named_parameters() if not n.startswith("conf.")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_fit_confidence_learns_to_rank_tokens_by_kl():
    """Phase 2 fits each probe's logit to logit(exp(-KL)): it must beat the best
    constant on its own data and rank tokens by KL (higher score, lower KL)."""
    model, heads = build(layers=(1, 2))
    windows = [torch.randint(0, 300, (33,)).numpy() for _ in range(32)]
    mse = fit_confidence(model, heads, windows, epochs=30, seed=0, lr=1e-2)
    feats = exit_features(model, heads, windows)
    for layer, (x, kl) in feats.items():
        target = confidence_target(kl)
        assert mse[layer] < 0.75 * target.var().item()
        z = heads.confidence_logit(layer, x)
        top, bottom = kl[z >= z.median()], kl[z < z.median()]
        assert top.mean() < bottom.mean()
    assert all(not p.requires_grad for p in heads.parameters())


def test_learned_kv_fill_fits_true_keys_values_better_than_copying():
    """The copy fill k_proj(attn_norm(h_l)) is linear in rms_norm(h_l), so the
    least-squares map can only fit block j's true K/V better on its own data."""
    import torch.nn.functional as F

    from hmst.models.early_exit import base_hidden_states

    model, heads = build(kv_fill="learned")
    windows = [torch.randint(0, 300, (33,)).numpy() for _ in range(24)]
    r2 = fit_kv_fill(model, heads, windows, ridge=1e-6)
    assert set(r2) == {"0_2", "0_3", "1_3"} and all(0 < v <= 1 for v in r2.values())
    ids = torch.from_numpy(np.stack(windows)[:, :-1].astype(np.int64))
    hs, _ = base_hidden_states(model, ids)
    for name in r2:
        l, j = map(int, name.split("_"))
        attn, h_true = model.layers[j].attn, model.layers[j].attn_norm(hs[j - 1])
        h_copy = model.layers[j].attn_norm(hs[l])
        true = torch.cat([attn.k_proj(h_true), attn.v_proj(h_true)], -1)
        copy = torch.cat([attn.k_proj(h_copy), attn.v_proj(h_copy)], -1)
        learned = torch.cat(heads.fill(l, j, hs[l]), -1)
        err_l, err_c = F.mse_loss(learned, true), F.mse_loss(copy, true)
        assert err_l < err_c, (name, err_l.item(), err_c.item())
        sst = (true - true.mean((0, 1))).square().sum()
        r2_direct = (1 - (learned - true).square().sum() / sst).item()
        assert r2[name] == pytest.approx(r2_direct, abs=1e-4)


def test_confidence_target_is_the_logit_of_exp_minus_kl():
    kl = torch.tensor([1e-6, 0.01, 0.5, 3.0], dtype=torch.float64)
    q = torch.exp(-kl.clamp_min(KL_FLOOR))
    torch.testing.assert_close(confidence_target(kl), torch.log(q / (1 - q)))


@pytest.mark.parametrize("hidden", [0, 16])
def test_heads_save_load_identical(tmp_path, hidden):
    model, heads = build(hidden=hidden)
    heads.config.threshold = 0.6
    path = str(tmp_path / "ee")
    save_heads(path, heads, model, meta={"note": "x"})
    back = load_heads(path, model)
    assert back.config == heads.config
    sd, sd2 = heads.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = torch.randint(0, 300, (2, 32))
    a = early_exit_forward(model, heads, ids)
    b = early_exit_forward(model, back, ids)
    assert torch.equal(a["logits"], b["logits"])
    assert torch.equal(a["exit_layer"], b["exit_layer"])
    other, _ = build(seed=1, hidden=hidden)
    with pytest.raises(ValueError, match="another model"):
        load_heads(path, other)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        assert json.load(f)["config"]["threshold"] == 0.6


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "hmst.training.early_exit_train", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip


def test_cli_missing_checkpoint(tmp_path):
    r = _cli("--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("early_exit_train: error: ")
    assert not (tmp_path / "o").exists()


def test_cli_trains_tunes_and_saves(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config(n_layers=3)
    ckpt = str(tmp_path / "ckpt")
    BaseMoEModel(config=cfg).save_pretrained(ckpt, tokenizer=tokenizer)
    corpus = tmp_path / "c.txt"
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt")) as f:
        corpus.write_text(f.read()[:60_000])
    out = str(tmp_path / "ee")
    r = _cli("--checkpoint", ckpt, "--output", out, "--data", str(corpus),
             "--steps", "3", "--tune-windows", "4", "--test-windows", "4",
             "--adapter-rank", "4", "--conf-hidden", "8")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "test slice" in r.stdout
    model = BaseMoEModel.from_pretrained(ckpt)
    heads = load_heads(out, model)
    with open(os.path.join(out, CONFIG_FILE)) as f:
        doc = json.load(f)
    assert heads.config.threshold == doc["config"]["threshold"]
    assert heads.config.exit_layers == (0, 1)
    assert doc["meta"]["test"]["full"]["saved_fraction"] == 0.0
    # --retune: the same weights, tuned again at another ppl budget.
    r = _cli("--checkpoint", ckpt, "--output", out, "--data", str(corpus),
             "--retune", "--max-ppl-increase", "0.5", "--depth-bonus", "0",
             "--tune-windows", "4", "--test-windows", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (
        "tuning at d_ppl <= 45.00% (--max-ppl-increase 50.00%, margin 10%)" in r.stdout
    )
    back = load_heads(out, model)
    sd, sd2 = heads.state_dict(), back.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with open(os.path.join(out, CONFIG_FILE)) as f:
        doc2 = json.load(f)
    meta = doc2["meta"]
    assert meta["max_ppl_increase"] == 0.5 and meta["tune_margin"] == 0.1
    assert meta["train_log"] == doc["meta"]["train_log"]
    # The tuned threshold keeps the tuning slice within the budget less the margin,
    # and is the largest saving among the rows that do.
    limit = meta["tune"]["full"]["ppl"] * (1 + 0.5 * 0.9)
    ok = [r for r in meta["tune"]["rows"] if r["ppl"] <= limit]
    chosen = next(r for r in ok if r["threshold"] == doc2["config"]["threshold"])
    assert chosen["saved_fraction"] == max(r["saved_fraction"] for r in ok)
    r = _cli("--checkpoint", ckpt, "--output", out, "--retune", "--tune-margin", "1")
    assert r.returncode == 2 and "--tune-margin" in r.stderr
    r = _cli("--checkpoint", ckpt, "--output", ckpt)
    assert r.returncode == 2 and "must not be the checkpoint" in r.stderr


def test_splits_alternate_heldout_windows_or_use_the_val_file(tmp_path, tokenizer):
    text = open(os.path.join(ROOT, "data", "tinyshakespeare.txt")).read()[:40_000]
    corpus, val = tmp_path / "c.txt", tmp_path / "v.txt"
    corpus.write_text(text)
    val.write_text(text[:8_000])
    train, tune, test = prepare_splits(tokenizer, str(corpus), 32, 0.2, 0.05)
    # Held-out windows alternate: tune gets the even ones, test the odd ones.
    _, held = split_documents_tail(read_documents([str(corpus)]), 0.2)
    windows = eval_windows(TokenData([tokenize_documents(tokenizer, held)]), 32, 10**9)
    assert [w.tolist() for w in tune] == [w.tolist() for w in windows[0::2]]
    assert [w.tolist() for w in test] == [w.tolist() for w in windows[1::2]]
    whole = tokenize_documents(tokenizer, read_documents([str(corpus)]))
    assert len(train) + sum(len(w) - 1 for w in windows) <= len(whole) + 1
    # --val-file: all of the corpus trains the heads, the val file is split.
    train2, tune2, test2 = prepare_splits(
        tokenizer, str(corpus), 32, 0.2, 0.05, val_file=str(val)
    )
    ids = tokenize_documents(tokenizer, read_documents([str(val)]))
    assert len(train2) == len(whole)
    assert tune2[0].tolist() == ids[:33].tolist()
    assert test2[0].tolist() == ids[32:65].tolist()
    r = _cli("--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"),
             "--data", str(corpus), "--val-file", str(val),
             "--tune-on", "train-tail")  # fmt: skip
    assert r.returncode == 2 and "--val-file needs --tune-on heldout" in r.stderr


def test_batched_decode_exits_when_every_row_is_confident():
    model, heads = build(torch.float64)
    ids = torch.randint(0, 300, (2, 16))
    logits, exits = forced_decode(model, heads, ids, 6, threshold=0.0)
    assert exits == [L - 1] + [0] * 10
    sim = early_exit_forward(model, heads, ids, threshold=0.0, exit_from=6)
    torch.testing.assert_close(logits, sim["logits"][:, 5:])
    _, exits = forced_decode(model, heads, ids, 6, threshold=NEVER)
    assert exits == [L - 1] * 11


def test_exit_loss_is_the_lm_head_read_at_that_block():
    torch.manual_seed(0)
    model = BaseMoEModel(config=tiny_config(n_layers=3)).double()
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    seen = {}
    model.layers[1].register_forward_hook(lambda m, i, o: seen.__setitem__("h", o[0]))
    out = model(x, targets=y, exit_layer=1)
    logits = torch.nn.functional.linear(model.norm(seen["h"]), model.embed.weight)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert torch.allclose(out["exit_loss"], want.float(), atol=1e-6)
    assert "exit_loss" not in model(x, targets=y)  # off unless asked for
    for bad in (-1, 2):  # block 2 is the last: it already feeds the LM head
        with pytest.raises(ValueError, match="exit_layer"):
            model(x, targets=y, exit_layer=bad)


def test_train_with_early_exit_loss_rotates_over_blocks(tmp_path):
    from conftest import CORPUS, TINY_FLAGS

    def train(*extra):
        return subprocess.run(
            [sys.executable, "train.py", CORPUS, "--output-dir", str(tmp_path / "o"),
             *TINY_FLAGS, "--set", "model.n_layers=3", "--batch-size", "2",
             "--val-split", "0.1", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=240,
        )  # fmt: skip

    r = train("--early-exit-loss", "-1", "--max-steps", "1")
    assert r.returncode == 2 and "--early-exit-loss must be >= 0" in r.stderr
    r = train("--early-exit-loss", "0.5", "--max-steps", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "o" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    exits = [list(r["exit_loss"]) for r in recs if r.get("kind") == "train"]
    assert exits == [["0"], ["1"], ["0"], ["1"]]  # step s reads block s % 2
    assert all(
        0 < v < 20 for r in recs if "exit_loss" in r for v in r["exit_loss"].values()
    )
