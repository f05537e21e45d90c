"""Observer events, scoped registration, failing hooks, trace summaries and schema."""

import json
import math

import jsonschema
import pytest
import torch

from hmst.observe.hooks import Emitter, Observer, ObserverRegistry, check_mode
from hmst.observe.trace import (
    JSONLFileSink,
    MemorySink,
    TraceRecorder,
    logit_summary,
    validate_trace,
)


class Counter(Observer):
    def __init__(self):
        self.calls = []

    def on_step(self, record):
        self.calls.append(record["step"])


class Broken(Observer):
    def on_step(self, record):
        raise RuntimeError("boom")


def test_modes_are_checked():
    for m in ("off", "summary", "diagnostic"):
        assert check_mode(m) == m
    with pytest.raises(ValueError, match="unknown observe mode 'loud'"):
        check_mode("loud")


def test_registry_is_scoped_and_off_means_no_emitter():
    reg = ObserverRegistry()
    assert reg.emitter("off") is None  # the hot path sees None: no work at all
    c = Counter()
    with reg.scoped(c):
        em = reg.emitter("off")
        em.emit("step", {"step": 0})
    assert len(reg) == 0 and c.calls == [0]
    assert reg.emitter("off") is None
    with pytest.raises(TypeError):
        reg.register(object())


def test_failing_observer_is_reported_once_and_others_continue(capsys):
    c = Counter()
    em = Emitter([Broken(), c], "summary")
    for s in range(3):
        em.emit("step", {"step": s})
    assert c.calls == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.count("observer disabled") == 1 and "Broken.on_step" in err
    assert len(em.failed) == 1


def test_logit_summary_matches_hand_computation():
    raw = torch.tensor([2.0, 1.0, 0.0, -1.0])
    p = raw.softmax(-1)
    s = logit_summary(raw, None, token=1, k=3)
    assert s["logit_entropy"] == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)
    assert s["surprisal"] == pytest.approx(-math.log(p[1].item()), rel=1e-6)
    assert s["top1_top2_margin"] == pytest.approx((p[0] - p[1]).item(), rel=1e-6)
    assert [i for i, _ in s["topk"]] == [0, 1, 2]
    assert s["sampling_entropy"] == 0.0  # greedy
    q = torch.tensor([0.5, 0.5, 0.0, 0.0])
    s = logit_summary(raw, q, token=0)
    assert s["sampling_entropy"] == pytest.approx(math.log(2), rel=1e-6)


def synthetic_trace(sink, batch=2, layers=2, steps=3):
    rec = TraceRecorder(sink, model_info={"config_sha256": "0" * 64})
    em = Emitter([rec], "summary")
    em.emit("generation_begin", {"prompts": [[1, 2, 3]] * batch, "params": {}})
    for step in range(steps):
        n = batch * 3 if step == 0 else batch  # prefill routes every prompt position
        for layer in range(layers):
            em.emit(
                "routing",
                step,
                layer,
                {
                    "experts": torch.arange(n * 2).view(n, 2) % 4,
                    "gates": torch.full((n, 2), 0.5),
                    "entropy": torch.full((n,), 1.2),
                    "overridden": None,
                },
            )
        for row in range(batch):
            summary = logit_summary(torch.randn(10), None, token=row)
            em.emit("step", {"step": step, "row": row, **summary})
    em.emit(
        "memory_retrieval",
        {"source": "semantic", "requested": 4, "ids": [3, 9], "scores": [0.9, 0.7]},
    )
    em.emit("timing", "attention", 0.01)
    em.emit("generation_end", {"generated": [[0, 0, 0], [1, 1, 1]], "elapsed_s": 0.1})
    return rec


def test_trace_validates_and_picks_last_prompt_position():
    sink = MemorySink()
    synthetic_trace(sink)
    (lines,) = sink.traces
    validate_trace(lines)
    tokens = [x for x in lines if x["type"] == "token"]
    assert len(tokens) == 6 and tokens[0]["step"] == 0
    # row 1's last prompt position is flat index 5: experts (10, 11) % 4
    assert tokens[1]["experts"][0] == [2, 3]
    assert tokens[0]["router_entropy"] == pytest.approx([1.2, 1.2])
    bad = dict(tokens[0], token_id=-1)
    with pytest.raises(jsonschema.ValidationError):
        validate_trace([lines[0], bad, lines[-1]])
    sentinel = {"type": "event", "event": "memory_retrieval", "source": "semantic",
                "requested": 2, "ids": [-1], "scores": [3.4e38]}  # fmt: skip
    with pytest.raises(jsonschema.ValidationError):
        validate_trace([lines[0], sentinel, lines[-1]])


def test_jsonl_sink_appends_whole_traces(tmp_path):
    path = tmp_path / "t.jsonl"
    sink = JSONLFileSink(str(path))
    synthetic_trace(sink)
    synthetic_trace(sink)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["type"] for x in lines].count("header") == 2
    with pytest.raises(FileNotFoundError, match="trace directory not found"):
        JSONLFileSink(str(tmp_path / "nope" / "t.jsonl"))


# -- generation, observed -------------------------------------------------------------

from conftest import Recorder, tiny_config  # noqa: E402
from hmst.generation import generate_stream  # noqa: E402
from hmst.generation.sampling import SamplingParams  # noqa: E402
from hmst.models.base_moe import BaseMoEModel  # noqa: E402

PROMPTS = [[1, 5, 9, 4, 7], [2, 3]]  # different lengths: the padded path


def run(model, mode=None, observers=(), prompts=PROMPTS, **kw):
    params = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, seed=3)
    em = None if mode is None else Emitter(observers, mode)
    steps = generate_stream(model, prompts, params, observe=em, **kw)
    return torch.stack(list(steps), 1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BaseMoEModel(config=tiny_config()).eval()


def test_modes_give_identical_tokens(model):
    off = run(model)
    for mode in ("summary", "diagnostic"):
        assert torch.equal(run(model, mode, [Recorder()]), off)
    assert torch.equal(run(model, "diagnostic", [Broken()]), off)  # a raising hook


def test_every_event_fires_the_expected_number_of_times(model):
    rec = Recorder()
    out = run(model, "diagnostic", [rec])
    n_steps, n_layers = out.shape[1], model.config.n_layers
    assert rec.count("generation_begin") == rec.count("generation_end") == 1
    assert rec.count("step") == n_steps * len(PROMPTS)
    assert rec.count("routing") == n_steps * n_layers
    assert sorted(a[0] for k, a in rec.events if k == "timing") == [
        "attention",
        "experts",
    ]
    assert rec.count("anomaly") == 0
    assert rec.events[0][0] == "generation_begin" and rec.events[-1][0] == (
        "generation_end"
    )
    end = rec.events[-1][1][0]
    assert end["generated"] == out.tolist() and end["finish_reasons"] == ["length"] * 2


def used_experts(model, prompt, observe, bias=None):
    """Experts that actually ran, per forward and layer (batch 1: the chosen ones)."""
    ran, handles = [], []
    for i, block in enumerate(model.layers):
        for e, expert in enumerate(block.moe.experts):
            handles.append(expert.register_forward_hook(
                lambda m, inp, out, i=i, e=e: ran.append((i, e, inp[0].shape[0]))
            ))  # fmt: skip
    try:
        run(model, "summary", observe, prompts=[prompt], expert_bias=bias)
    finally:
        for h in handles:
            h.remove()
    return ran


@pytest.mark.parametrize("biased", [False, True])
def test_recorded_experts_are_the_ones_used(model, biased):
    E = model.config.n_experts
    bias = torch.full((E,), -50.0) if biased else None
    if biased:
        bias[[E - 1, E - 2]] = 50.0  # the controller forces the last two experts
    rec = Recorder()
    ran = used_experts(model, [4], [rec], bias)  # 1-token prompt: every step T=1
    routing = [a for k, a in rec.events if k == "routing"]
    recorded = [(layer, sorted(r["experts"][0].tolist())) for _, layer, r in routing]
    executed, it = [], iter(ran)
    for layer, _ in recorded:
        executed.append((layer, sorted(next(it)[1] for _ in range(2))))
    assert recorded == executed
    if biased:
        assert all(e == [E - 2, E - 1] for _, e in recorded)
        ov = torch.cat([r["overridden"] for _, _, r in routing])
        assert ov.any()  # the router alone would often have chosen otherwise
    else:
        assert all(r["overridden"] is None for _, _, r in routing)


def test_reference_path_records_the_same_routing(model):
    fast, ref = Recorder(), Recorder()
    run(model, "summary", [fast])
    run(model, "summary", [ref], backend="reference")
    a = [args[2]["experts"] for k, args in fast.events if k == "routing"]
    b = [args[2]["experts"] for k, args in ref.events if k == "routing"]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_trace_of_a_generation_validates(model):
    sink = MemorySink()
    run(model, "diagnostic", [TraceRecorder(sink, {"checkpoint": "mem"})])
    (lines,) = sink.traces
    validate_trace(lines)
    tokens = [x for x in lines if x["type"] == "token"]
    assert len(tokens) == 12 and all(len(t["experts"]) == 2 for t in tokens)
    assert {x["component"] for x in lines if x.get("event") == "timing"} == {
        "attention",
        "experts",
    }
