"""HMSTInferenceEngine: every decision path, events, traces, save/load, bad input.

A tiny random-weight system (the plumbing, not the quality: the fact-QA bench
measures that on a trained one)."""

import itertools
import json
import math
import os

import pytest
import torch

from conftest import ROOT, Recorder, tiny_config
from hmst.configs.model_config import CriticConfig
from hmst.inference.engine import (
    DECISIONS,
    FEATURES,
    EngineConfig,
    HMSTInferenceEngine,
)
from hmst.memory.episodic import EpisodicMemory
from hmst.memory.retriever import Retriever, RetrieverConfig
from hmst.memory.semantic import SemanticMemory
from hmst.models.base_moe import BaseMoEModel
from hmst.models.critic import CriticModel
from hmst.models.early_exit import EarlyExitConfig, EarlyExitHeads
from hmst.observe.hooks import Observer
from hmst.observe.trace import MemorySink, TraceRecorder, validate_trace

FACTS = [
    "Bolaro Keitu lives in Oslo.",
    "Dravi Sunei is a baker.",
    "Tamsa Lirou works for Kestrel Labs.",
    "Vile Mousto keeps a cat as a pet.",
]


def make_engine(tokenizer, min_score=-1.0, exit_threshold=0.0, **cfg):
    torch.manual_seed(0)
    model = BaseMoEModel(config=tiny_config(max_seq_len=160)).eval()
    retriever = Retriever(
        RetrieverConfig(
            d_model=32, dim=16, min_score=min_score, sif_a=1e-3,
            vocab_size=tokenizer.vocab_size,
        )
    )  # fmt: skip
    retriever.fit_token_weights(tokenizer.encode(t) for t in FACTS)
    semantic = SemanticMemory(dimension=16, max_entries=100)
    episodic = EpisodicMemory(None, max_entries=8, d_model=16)
    ccfg = CriticConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=4, d_ff=64,
        max_seq_len=96, max_question_len=24, max_answer_len=24, dropout=0.0,
        pad_id=tokenizer.pad_id,
    )  # fmt: skip
    critic = (CriticModel(ccfg).eval(), tokenizer)
    heads = EarlyExitHeads(
        model.config, EarlyExitConfig((0,), adapter_rank=4, threshold=exit_threshold)
    ).init_from(model)
    engine = HMSTInferenceEngine(
        model, tokenizer, retriever=retriever, semantic=semantic, episodic=episodic,
        critic=critic, early_exit=heads, policy="fixed",
        config=EngineConfig(max_new_tokens=6, stop=(), **cfg),
    )  # fmt: skip
    engine.add_knowledge(FACTS[:3])
    engine.remember(FACTS[3])
    return engine


@pytest.fixture(scope="module")
def engine(tokenizer):
    return make_engine(tokenizer)


@pytest.mark.parametrize("bits", list(itertools.product([False, True], repeat=4)))
def test_every_decision_path(engine, bits):
    forced = dict(zip(DECISIONS, bits))
    r = engine.answer("Where does Bolaro Keitu live?", decisions=forced)
    assert r.decisions == forced and r.decision_source == "forced"
    sources = {h.source for h in r.hits}
    assert ("episodic" in sources) == forced["episodic"]
    assert ("semantic" in sources) == forced["semantic"]
    assert all(h.text in FACTS for h in r.hits)  # no FAISS sentinel ever
    assert (r.critic is not None) == forced["verification"]
    assert r.new_tokens == len(r.exit_layers) > 0
    L = engine.model.config.n_layers
    if forced["early_exit"]:  # threshold 0: every decoded token leaves after block 0
        assert r.exit_layers[0] == L - 1 and set(r.exit_layers[1:]) <= {0}
        assert r.blocks_per_token < L
    else:
        assert set(r.exit_layers) == {L - 1}
    if forced["verification"]:
        assert r.abstained == (r.critic["score"] < 0.5)
        assert r.answer == (engine.config.abstain_text if r.abstained else r.raw_answer)
    valid = [h for h in r.hits if h.valid]
    used = [h for h in r.hits if h.used]
    assert all(h.valid for h in used) and bool(used) == bool(valid)
    assert len({h.text for h in used}) <= engine.config.context_k
    bare = len(engine._prompt("Where does Bolaro Keitu live?", []))
    assert (r.prompt_tokens > bare) == bool(used)


def test_hits_below_min_score_are_reported_but_not_used(tokenizer):
    eng = make_engine(tokenizer, min_score=2.0)  # cosine never reaches 2
    r = eng.answer("Who is a baker?", decisions=dict(episodic=True, semantic=True))
    assert r.hits and not any(h.valid for h in r.hits)
    assert r.prompt_tokens == len(eng._prompt("Who is a baker?", []))


def test_the_floor_follows_each_memorys_size(tokenizer):
    """size_floors: the buffer (1 line) gets the 1-entry cut, the store (3) its own."""
    eng = make_engine(tokenizer, min_score=0.0)
    eng.retriever.config.size_floors = [[1, -2.0], [3, 2.0]]
    r = eng.answer("Who is a baker?", decisions=dict(episodic=True, semantic=True))
    valid = {
        s: [h.valid for h in r.hits if h.source == s] for s in ("episodic", "semantic")
    }
    assert valid["episodic"] and all(valid["episodic"])
    assert valid["semantic"] and not any(valid["semantic"])


def test_events_fire_once_per_decision(engine):
    rec = Recorder()
    with engine.observers.scoped(rec):
        engine.answer("Who is a baker?", decisions=dict.fromkeys(DECISIONS[1:], True))
    assert rec.count("controller_decision") == 1
    assert rec.count("memory_retrieval") == 2
    assert rec.count("critic_verdict") == 1
    assert rec.count("generation_begin") == rec.count("generation_end") == 1
    retrievals = [a[0] for e, a in rec.events if e == "memory_retrieval"]
    for ev in retrievals:
        assert ev["requested"] == engine.config.top_k
        assert len(ev["ids"]) == ev["returned"] and ev["valid"] <= ev["returned"]
        assert all(i >= 0 for i in ev["ids"])
    verdict = [a[0] for e, a in rec.events if e == "critic_verdict"][0]
    assert verdict["action"] in ("accept", "abstain") and verdict["threshold"] == 0.5
    rec2 = Recorder()
    with engine.observers.scoped(rec2):
        r = engine.answer("Who is a baker?", decisions=dict(early_exit=True))
    exits = [a for e, a in rec2.events if e == "early_exit"]
    assert len(exits) == sum(layer < 1 for layer in r.exit_layers)
    assert len(engine.observers) == 0  # scoped registration does not leak


def test_diagnostic_times_components_and_matches_off(engine):
    q = "Where does Bolaro Keitu live?"
    on = dict.fromkeys(DECISIONS[1:], True)
    off = engine.answer(q, decisions=on)
    rec = Recorder()
    with engine.observers.scoped(rec):
        diag = engine.answer(q, decisions=on, observe="diagnostic")
    assert diag.answer == off.answer and diag.raw_answer == off.raw_answer
    timed = {a[0] for e, a in rec.events if e == "timing"}
    assert {"probe", "controller", "episodic_memory", "semantic_memory"} <= timed
    assert {"generate", "critic"} <= timed


def test_trace_of_an_engine_query_validates(engine):
    sink = MemorySink()
    with engine.observers.scoped(TraceRecorder(sink)):
        engine.answer("Who is a baker?", decisions=dict.fromkeys(DECISIONS[1:], True))
    assert len(sink.traces) == 1
    lines = sink.traces[0]
    validate_trace(lines)
    kinds = [line.get("event") for line in lines if line["type"] == "event"]
    assert {"controller_decision", "memory_retrieval", "critic_verdict"} <= set(kinds)
    assert kinds.count("memory_retrieval") == 2
    end = lines[-1]
    assert end["engine"]["decisions"]["semantic"] is True
    tokens = [line for line in lines if line["type"] == "token"]
    assert [t["token_id"] for t in tokens] == end["generated"][0]
    assert all(len(t["experts"]) == 2 for t in tokens)  # both layers' routing


def test_raising_observer_does_not_break_the_engine(engine, capsys):
    class Broken(Observer):
        def on_controller_decision(self, decision):
            raise RuntimeError("boom")

    with engine.observers.scoped(Broken()):
        r = engine.answer("Who is a baker?")
    assert r.answer
    assert "observer disabled" in capsys.readouterr().err


def test_bad_input(engine):
    with pytest.raises(ValueError, match="empty query"):
        engine.answer("   ")
    with pytest.raises(ValueError, match="unknown decisions"):
        engine.answer("Who?", decisions={"teleport": True})
    with pytest.raises(ValueError, match="no meta-controller"):
        HMSTInferenceEngine(engine.model, engine.tokenizer)


def test_save_load_round_trip_and_manifest(engine, tmp_path):
    path = str(tmp_path / "system")
    engine.save_pretrained(path, extra={"note": "test"})
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert set(manifest["components"]) == {
        "model", "retriever", "semantic_memory", "episodic_memory", "critic",
        "early_exit",
    }  # fmt: skip
    with pytest.raises(ValueError, match="no meta-controller"):
        HMSTInferenceEngine.from_pretrained(path)
    loaded = HMSTInferenceEngine.from_pretrained(path, policy="fixed")
    assert loaded.manifest_extra == {"note": "test"}
    assert len(loaded.semantic) == 3 and len(loaded.episodic) == 1
    q = "Where does Bolaro Keitu live?"
    for bits in [(False, True, True, True), (True, False, False, False)]:
        forced = dict(zip(DECISIONS, bits))
        a, b = engine.answer(q, decisions=forced), loaded.answer(q, decisions=forced)
        assert (a.answer, a.raw_answer, a.exit_layers) == (
            b.answer,
            b.raw_answer,
            b.exit_layers,
        )
        assert [(h.id, round(h.score, 5)) for h in a.hits] == [
            (h.id, round(h.score, 5)) for h in b.hits
        ]
    # a changed file is caught by the manifest's hashes
    with open(os.path.join(path, "retriever", "retriever.json"), "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match="differs from the manifest"):
        HMSTInferenceEngine.from_pretrained(path, policy="fixed")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        HMSTInferenceEngine.from_pretrained(str(tmp_path / "nope"))


def test_remember_interactions_and_expert_bias(tokenizer):
    eng = make_engine(tokenizer, remember_interactions=True, expert_bias_strength=0.0)
    n = len(eng.episodic)
    r = eng.answer("Who is a baker?", decisions=dict(verification=False))
    assert len(eng.episodic) == n + 1
    assert eng.episodic.entries()[-1].metadata["text"].endswith(r.answer)
    w = torch.tensor([0.97, 0.01, 0.01, 0.01])
    eng.config.expert_bias_strength = 0.0
    assert eng._expert_bias(w) is None
    eng.config.expert_bias_strength = 1.0
    bias = eng._expert_bias(w)
    assert bias.argmax() == 0 and bias.shape == (4,)


# -- a saved tiny QA system: PPO end to end, the CLI over a system -------------------


@pytest.fixture(scope="module")
def tiny_system(tokenizer, tmp_path_factory):
    from hmst.qa import make_world

    eng = make_engine(tokenizer)
    world = make_world(40, seed=0)
    eng.add_knowledge([f.statement for f in world["semantic"]])
    path = str(tmp_path_factory.mktemp("sys") / "system")
    eng.save_pretrained(path, extra={"world": {"num_subjects": 40, "seed": 0}})
    return path


def test_rl_train_builds_the_env_trains_and_registers_the_controller(tiny_system):
    import shutil

    from hmst.inference.engine import read_manifest
    from hmst.training import rl_train

    path = tiny_system + "_rl"
    shutil.copytree(tiny_system, path)
    history = rl_train.main(
        ["--checkpoint", path, "--episodes", "64", "--episodes-per-rollout", "32",
         "--minibatch-size", "64", "--per-category", "3", "--num-threads", "1"]
    )  # fmt: skip
    assert len(history) == 2 and all(math.isfinite(h["mean_reward"]) for h in history)
    assert os.path.isfile(os.path.join(path, "rl_table_train.safetensors"))
    assert "controller" in read_manifest(path)["components"]  # hashed like the rest
    rl_train.main(  # retraining replaces the controller and its manifest entry
        ["--checkpoint", path, "--episodes", "32", "--episodes-per-rollout", "32",
         "--per-category", "3", "--num-threads", "1", "--seed", "1"]
    )  # fmt: skip
    assert "controller" in read_manifest(path)["components"]
    eng = HMSTInferenceEngine.from_pretrained(path)  # the controller policy
    r = eng.answer("Where does Bolaro Keitu live?")
    assert r.decision_source == "controller"
    assert set(r.decision_probs) == {*DECISIONS, "uncertainty"}
    assert len(r.expert_weights) == 4 and abs(sum(r.expert_weights) - 1) < 1e-5
    for k in DECISIONS:  # the controller's probabilities, thresholded
        assert r.decisions[k] == (r.decision_probs[k] > 0.5)


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "inference.py"), *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_inference_cli_over_a_system(tiny_system, tmp_path):
    r = _cli(tiny_system, "--prompt", "Who is a baker?")
    assert r.returncode == 2 and "no meta-controller" in r.stderr
    r = _cli(tiny_system, "--prompt", "Who is a baker?", "--policy", "fixed",
             "--force", "semantic=1", "--force", "verification=0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "semantic" in r.stderr and "hits used" in r.stderr
    r = _cli(tiny_system, "--prompt", "x", "--policy", "fixed", "--force", "teleport=1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--force" in r.stderr
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        '{"id": "a", "prompt": "Who is a baker?"}\n{"id": 7, "prompt": "Hi?"}\n'
    )
    out = tmp_path / "out.jsonl"
    trace = tmp_path / "trace.jsonl"
    r = _cli(tiny_system, "--input", str(queries), "--output", str(out),
             "--policy", "fixed", "--trace", str(trace))  # fmt: skip
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == ["a", 7]
    assert {"answer", "decisions", "hits", "critic", "latency_s"} <= set(recs[0])
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert sum(line["type"] == "header" for line in lines) == 2
    r = _cli(tiny_system, "--prompt", "x", "--quantize", "int8", "--policy", "fixed")
    assert r.returncode == 2 and "--quantize" in r.stderr


@pytest.mark.parametrize("early_exit", [False, True])
def test_bare_prompt_decodes_from_the_probe_cache(engine, monkeypatch, early_exit):
    """Without evidence the prompt is the probe's: generation starts from the probe's
    KV cache (no second prefill) and gives the tokens a fresh prefill gives."""
    import importlib

    gen_mod = importlib.import_module("hmst.generation.generate")  # not the function
    ee_mod = importlib.import_module("hmst.models.early_exit")

    q = "Where does Vile Mousto live?"
    d = dict(early_exit=early_exit, episodic=False, semantic=False, verification=False)
    _, _, _, probe = engine.state_features(q)
    fresh, fresh_exits, fresh_p = engine._generate(probe["ids"], early_exit, None, None)
    calls = []
    for mod in (gen_mod, ee_mod):
        real = mod.prefill
        monkeypatch.setattr(
            mod,
            "prefill",
            lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k),
        )
    res = engine.answer(q, decisions=d)
    assert calls == []  # the probe's cache was used
    assert res.raw_answer == engine._cut(engine.tokenizer.decode(fresh))
    assert res.lm_confidence == pytest.approx(fresh_p, abs=1e-5)
    if early_exit:
        assert res.exit_layers == fresh_exits
    with engine.observers.scoped(Recorder()):  # observed: its own, traced prefill
        assert engine.answer(q, decisions=d).raw_answer == res.raw_answer
    assert calls


def test_a_semantic_read_reuses_the_probes_search(engine, monkeypatch):
    calls = []
    real = engine.semantic.search
    monkeypatch.setattr(
        engine.semantic, "search", lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    )
    r = engine.answer("Who is a baker?", decisions=dict(semantic=True))
    assert calls == [engine.config.top_k]  # one search, serving feature and hits
    assert len([h for h in r.hits if h.source == "semantic"]) == 3  # all 3 stored
    semantic_best = r.features["semantic_best"]
    assert semantic_best == max(h.score for h in r.hits if h.source == "semantic")


def test_generate_stream_rejects_a_short_prefilled_cache(engine):
    from hmst.generation import SamplingParams, generate_stream

    ids = engine._prompt("Who is a baker?", [])
    caches = engine.model.allocate_kv_cache(1, len(ids) + 2)
    logits = engine.model(torch.tensor([ids]), kv_caches=caches)["logits"][:, -1]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    with pytest.raises(ValueError, match="room for"):
        next(generate_stream(engine.model, [ids], params, prefilled=(caches, logits)))


def test_probe_features_are_the_retrievers_features(engine):
    """The query vector the engine searches with is the retriever's own definition
    of a text's features (what its projections were trained on)."""
    qfeat, _, _, probe = engine.state_features("Who is a baker?")
    text = engine.tokenizer.decode(probe["ids"])
    ref = engine.retriever.features(engine.model, engine.tokenizer, [text])[0]
    assert ref.numel() == 2 * qfeat.numel()  # plain means, then SIF-weighted means
    torch.testing.assert_close(qfeat, ref[: qfeat.numel()])
    r = engine.retriever.embed_features(ref[None], "query")[0]
    torch.testing.assert_close(probe["q_vec"], r)


def test_prompt_nll_is_the_prompts_mean_token_nll(engine):
    """The familiarity feature is the LM's mean NLL of the prompt's tokens (from the
    probe's prefill; no second forward), in units of ln V."""
    _, vec, feats, probe = engine.state_features("Who is a baker?")
    x = torch.tensor([probe["ids"]])
    with torch.no_grad():
        logits = engine.model(x)["logits"][0, :-1].float()
    want = torch.nn.functional.cross_entropy(logits, x[0, 1:]).item()
    V = engine.model.config.vocab_size
    assert feats["prompt_nll"] == pytest.approx(want / math.log(V), rel=1e-5)
    assert vec[FEATURES.index("prompt_nll")] == pytest.approx(feats["prompt_nll"])


def test_a_controller_of_other_features_is_refused(tiny_system, tmp_path):
    import shutil

    from hmst.inference.engine import add_component
    from hmst.models.meta_controller import (
        ControllerConfig,
        build_controller,
        save_controller,
    )

    path = str(tmp_path / "system")
    shutil.copytree(tiny_system, path)
    cfg = ControllerConfig(query_dim=8, num_features=len(FEATURES) - 1, n_experts=4)
    save_controller(os.path.join(path, "controller"), *build_controller(cfg), cfg, {})
    add_component(path, "controller")
    with pytest.raises(
        ValueError, match=f"reads {len(FEATURES) - 1} state features.*retrain"
    ):
        HMSTInferenceEngine.from_pretrained(path)


def test_remembered_sentence_keeps_its_tokens(tokenizer):
    eng = make_engine(tokenizer)
    text = "Tamsa Lirou lives in Oslo."
    i = eng.remember(text)
    entry = [e for e in eng.episodic.entries() if e.id == i][0]
    assert entry.tokens == tokenizer.encode(text)
    torch.testing.assert_close(entry.key_N, eng._embed([text], "doc")[0])


def test_exit_threshold_is_tuned_on_answers(tokenizer):
    from hmst.inference.build import EXIT_GRID, tune_exit_threshold
    from hmst.inference.env import sample_questions, set_conversation
    from hmst.models.early_exit import NEVER
    from hmst.qa import make_world

    eng = make_engine(tokenizer)
    items = sample_questions(make_world(40, seed=0), "train", 2, seed=0)
    quiet = lambda *a: None  # noqa: E731
    res = tune_exit_threshold(eng, items, min_agreement=1.0, log=quiet)
    assert eng.early_exit.config.threshold == res["threshold"]
    tried = [float(t) for t in res["grid"]]
    assert tried == list(EXIT_GRID[: len(tried)])
    agree = [g["agreement"] for g in res["grid"].values()]
    assert all(a < 1.0 for a in agree[:-1])  # the lowest threshold that agrees
    if res["threshold"] == NEVER:
        assert len(tried) == len(EXIT_GRID) and agree[-1] < 1.0
    else:
        assert agree[-1] == 1.0 and res["threshold"] == tried[-1]

        def answers(ee):
            out = []
            for _, fact, buffer in items:
                set_conversation(eng, buffer)
                d = dict(early_exit=ee, episodic=True, semantic=True)
                out.append(eng.answer(fact.question, decisions=d).raw_answer)
            return out

        assert answers(True) == answers(False)
    # any agreement is enough: the most aggressive threshold is taken
    assert tune_exit_threshold(eng, items, 1e-9, quiet)["threshold"] == EXIT_GRID[0]


def test_exit_threshold_picks_the_lowest_that_agrees(tokenizer, monkeypatch):
    """Below 0.85 early exit changes every other answer (forced here): 0.85 is chosen
    at 99%, 0.0 at 50%, and nothing (never exit) when no threshold could agree."""
    import dataclasses

    from hmst.inference.build import tune_exit_threshold
    from hmst.inference.env import sample_questions
    from hmst.models.early_exit import NEVER
    from hmst.qa import make_world

    eng = make_engine(tokenizer)
    items = sample_questions(make_world(40, seed=0), "train", 2, seed=0)
    answer, calls = eng.answer, []

    def answer_changed_by_exit(question, decisions):
        r = answer(question, decisions=decisions)
        calls.append(question)
        low = eng.early_exit.config.threshold < cut
        if decisions["early_exit"] and low and len(calls) % 2:
            return dataclasses.replace(r, raw_answer=r.raw_answer + " (changed)")
        return r

    monkeypatch.setattr(eng, "answer", answer_changed_by_exit)
    quiet = lambda *a: None  # noqa: E731
    cut = 0.85
    res = tune_exit_threshold(eng, items, 0.99, quiet)
    assert res["threshold"] == 0.85 == eng.early_exit.config.threshold
    assert [g["agreement"] for g in res["grid"].values()] == [0.5] * 4 + [1.0]
    assert tune_exit_threshold(eng, items, 0.5, quiet)["threshold"] == 0.0
    cut = 9.0  # every threshold changes answers
    assert tune_exit_threshold(eng, items, 0.99, quiet)["threshold"] == NEVER
