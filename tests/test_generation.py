"""Generation core and text layer: fast path == reference, cache == recompute with
padding, stop strings, UTF-8 streaming, prompt truncation, int8."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_config
from hmst.generation import SamplingParams, generate_stream
from hmst.generation import text as text_mod
from hmst.generation import fast_forward
from hmst.generation.fast_forward import (
    fast_logits,
    prepare_for_inference,
    reference_logits,
)
from hmst.generation.quantize import quantize_int8
from hmst.generation.text import TextGenerator, _RowText
from hmst.kernels import native
from hmst.models.base_moe import BaseMoEModel


def _model(**kw):
    return BaseMoEModel(config=tiny_config(**kw)).eval()


@pytest.fixture(params=["native", "torch"])
def kernel(request, monkeypatch):
    """Run with the native few-row kernel (skipped where it cannot be built), then
    with the PyTorch forms alone."""
    if request.param == "native" and not native.available():
        pytest.skip("no C compiler: the native kernel is unavailable")
    if request.param == "torch":
        monkeypatch.setattr(native, "_lib", False)
    return request.param


@pytest.mark.parametrize("out_f,in_f", [(96, 32), (32, 64), (32, 32)])
def test_small_matmul_equals_linear(out_f, in_f, kernel, monkeypatch):
    """Every row count, wide and narrow weights, contiguous or transposed input."""
    monkeypatch.setattr(fast_forward, "MIN_NUMEL", 0)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    rows = fast_forward.transposed_rows(w)
    assert rows == (16 if out_f >= 2 * in_f else 4)
    assert fast_forward.transposed_rows(w.t().contiguous().t()) == 0  # column-major
    for M in range(1, 21):
        x = torch.randn(M, in_f, generator=g)
        for inp in (x, x.t().contiguous().t()):
            y = fast_forward.small_matmul(inp, w, rows, kernel == "native")
            assert y.shape == (M, out_f)
            torch.testing.assert_close(y, F.linear(x, w), atol=1e-5, rtol=1e-5)
    lin = nn.Linear(in_f, out_f)  # FastLinear: 3-D input, bias, a hook fires once
    lin.weight.data = w
    fast = copy.deepcopy(lin)
    fast.__class__, fast.rows = fast_forward.FastLinear, rows
    fast.native = kernel == "native"
    seen = []
    fast.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, in_f, generator=g)
    torch.testing.assert_close(fast(x), lin(x), atol=1e-5, rtol=1e-5)
    assert seen == [(2, 3, out_f)]


def test_native_gemv_equals_linear_and_falls_back(monkeypatch, tmp_path):
    if not native.available():
        pytest.skip("no C compiler: the native kernel is unavailable")
    g = torch.Generator().manual_seed(0)
    for n_out, n_in in [(2048, 256), (256, 1024), (37, 50), (5, 17), (3, 16)]:
        w = torch.randn(n_out, n_in, generator=g)
        for M in range(1, native.MAX_ROWS + 1):
            x = torch.randn(M, n_in, generator=g)
            exact = F.linear(x.double(), w.double())  # sums of up to 1024 N(0, 1)
            err = (native.gemv(x, w) - exact).abs().max()
            assert err <= 4 * (F.linear(x, w) - exact).abs().max() + 1e-5
    w13, w2 = torch.randn(2 * 48, 40, generator=g), torch.randn(40, 48, generator=g)
    x = torch.randn(40, generator=g)
    gate, up = F.linear(x.double(), w13.double()).chunk(2)
    exact = F.linear(F.silu(gate) * up, w2.double())
    assert (native.swiglu(x, w13, w2) - exact).abs().max() < 1e-4
    with pytest.raises(ValueError, match="swiglu needs"):
        native.swiglu(x, w13[:-1], w2)  # odd hidden width
    with pytest.raises(ValueError, match="contiguous fp32"):
        native.gemv(torch.randn(5, 17), torch.randn(3, 17))  # 5 rows
    with pytest.raises(ValueError, match="contiguous fp32"):
        native.gemv(torch.randn(2, 17), torch.randn(17, 3).t())  # column-major
    # Disabled, or no working compiler: unavailable, no error (callers use PyTorch).
    monkeypatch.setenv("HMST_CACHE", str(tmp_path))  # no cached build to reuse
    for env, value in (("HMST_NATIVE", "0"), ("CC", "false")):
        monkeypatch.setattr(native, "_lib", None)
        with monkeypatch.context() as m:
            m.setenv(env, value)
            assert not native.available()
            with pytest.raises(RuntimeError, match="not available"):
                native.gemv(torch.randn(1, 4), torch.randn(2, 4))
    monkeypatch.setattr(native, "_lib", None)
    assert native.available()  # builds into the fresh cache
    assert list(tmp_path.glob("kernels/hmst_gemv_*.so"))


def test_batch1_decoding_with_prepared_model(kernel, monkeypatch):
    """One prompt (the single-token expert path, `SwiGLU.one_row` with the native
    kernel): prepared fast path == the plain model's reference forward, every step."""
    monkeypatch.setattr(fast_forward, "MIN_NUMEL", 0)
    model = _model(max_seq_len=64, init_std=0.2)
    fast = prepare_for_inference(copy.deepcopy(model))
    expert = fast.layers[0].moe.experts[0]
    assert (expert.one_row is not None) == (kernel == "native")
    x = torch.randn(1, 1, 32)
    torch.testing.assert_close(expert(x), model.layers[0].moe.experts[0](x))
    prompt = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(2))
    c_fast, c_ref = fast.allocate_kv_cache(1, 40), model.allocate_kv_cache(1, 40)
    a = fast_logits(fast, prompt, c_fast, 0)
    b = reference_logits(model, prompt, c_ref, 0)
    for pos in range(7, 17):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        nxt = b.argmax(-1, keepdim=True)
        a = fast_logits(fast, nxt, c_fast, pos)
        b = reference_logits(model, nxt, c_ref, pos)


def _pad_left(prompts):
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    valid = torch.ones(len(prompts), 64, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        valid[i, : T - len(p)] = False
    return ids, valid


@pytest.mark.parametrize("prepared", [False, True])
def test_cached_decoding_matches_full_recompute(prepared, kernel, monkeypatch):
    """Left-padded batch, prefill + 1-token steps through `fast_logits` vs the
    reference forward of each row's whole unpadded sequence, at every step."""
    model = _model(max_seq_len=64, init_std=0.2)
    ref_model = copy.deepcopy(model)  # the full recompute uses the plain model
    if prepared:  # small-row matmul forms, even for these tiny weights
        monkeypatch.setattr(fast_forward, "MIN_NUMEL", 0)
        model = prepare_for_inference(model)
        assert model.head_native == (kernel == "native")
        assert model.layers[0].moe.experts[0].w13.native == model.head_native
        assert model.layers[0].moe.experts[0].w13.rows == 16 and model.head_rows == 16
        assert model.layers[0].moe.experts[0].w2.rows == 4
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 4, 13)]
    ids, valid = _pad_left(prompts)
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    caches = model.allocate_kv_cache(3, 40)
    logits = fast_logits(model, ids, caches, 0, (causal & valid[:, None, :T])[:, None])
    seqs = [list(p) for p in prompts]
    for step in range(10):
        for i, seq in enumerate(seqs):
            full = ref_model(torch.tensor([seq]))["logits"][0, -1]
            torch.testing.assert_close(logits[i], full, atol=1e-4, rtol=1e-4)
        nxt = torch.randint(3, 300, (3,), generator=g)
        for seq, t in zip(seqs, nxt.tolist()):
            seq.append(t)
        pos = T + step
        mask = valid[:, None, None, : pos + 1]
        logits = fast_logits(model, nxt[:, None], caches, pos, mask)


def test_fast_and_reference_backends_agree():
    model = _model(init_std=0.2)
    x = torch.randint(3, 300, (2, 12))
    caches = [model.allocate_kv_cache(2, 20) for _ in range(2)]
    a = fast_logits(model, x, caches[0], 0)
    b = reference_logits(model, x, caches[1], 0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for c0, c1 in zip(*caches):
        torch.testing.assert_close(c0.k, c1.k)
    # one row, one token at a time: the fast path's single-token MoE branch
    caches = [model.allocate_kv_cache(1, 20) for _ in range(2)]
    for pos in range(6):
        tok = x[:1, pos : pos + 1]
        a = fast_logits(model, tok, caches[0], pos)
        b = reference_logits(model, tok, caches[1], pos)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    for prompts in ([[5, 6, 7, 8, 9], [10, 11]], [[12, 13, 14]]):
        runs = [
            torch.stack(list(generate_stream(model, prompts, params, backend=b)), 1)
            for b in ("fast", "reference")
        ]
        assert torch.equal(runs[0], runs[1])


def test_model_generate_is_the_hf_style_entry():
    model = _model()
    x = torch.randint(3, 300, (2, 6))
    out = model.generate(x, max_new_tokens=5, temperature=0.0)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], x)
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    steps = torch.stack(list(generate_stream(model, x.tolist(), params)), 1)
    assert torch.equal(out[:, 6:], steps)
    a, b = (model.generate(x, 8, temperature=1.0, top_k=20, seed=3) for _ in range(2))
    assert torch.equal(a, b)  # a seed makes sampling reproducible


def test_stream_stops_at_context_end_and_on_eos():
    model = _model(max_seq_len=32)
    params = SamplingParams(max_new_tokens=100, temperature=0.0)
    steps = list(generate_stream(model, [[5] * 20], params))
    assert len(steps) == 32 - 20
    first = steps[0].item()  # make the first greedy token the "EOS": one step only
    assert len(list(generate_stream(model, [[5] * 20], params, eos_id=first))) == 1
    with pytest.raises(ValueError, match="empty prompt"):
        next(generate_stream(model, [[5], []], params))
    with pytest.raises(ValueError, match="no room"):
        next(generate_stream(model, [[5] * 32], params))


def _scripted(monkeypatch, rows):
    """Make the text layer receive these token ids (one list per row) from the
    token loop, so its streaming and stop logic see a known split of the text."""
    n = max(map(len, rows))

    def fake_stream(model, prompts, params, eos_id, observe=None):
        assert len(prompts) == len(rows)
        for s in range(min(n + 1, params.max_new_tokens)):  # then EOS
            yield torch.tensor([r[s] if s < len(r) else eos_id for r in rows])

    monkeypatch.setattr(text_mod, "generate_stream", fake_stream)


def _split_ids(tokenizer, pieces):
    """Ids whose token boundaries fall exactly between `pieces`."""
    return [i for p in pieces for i in tokenizer.encode(p)]


def test_stop_string_split_across_tokens_never_streamed(tokenizer, monkeypatch):
    # "STOP" is split over three tokens; "ST" and "STO" look like its start but are not.
    pieces = ["Hello ST", "ar and", " STO", "ne ", "S", "TO", "P after", " more"]
    ids = _split_ids(tokenizer, pieces)
    _scripted(monkeypatch, [ids])
    gen = TextGenerator(_model(), tokenizer)
    streamed = []
    r = gen.generate(
        "x", SamplingParams(max_new_tokens=len(ids), stop=["STOP"]), streamed.append
    )
    assert r.text == "Hello STar and STOne " and r.finish_reason == "stop"
    assert "".join(streamed) == r.text
    assert all("STOP" not in "".join(streamed[: k + 1]) for k in range(len(streamed)))
    # a row that never completes the stop string gets everything, held back parts too
    ids = _split_ids(tokenizer, ["abc ST", "O"])
    _scripted(monkeypatch, [ids])
    streamed = []
    r = gen.generate("x", SamplingParams(stop=["STOP"]), streamed.append)
    assert "".join(streamed) == r.text == "abc STO" and r.finish_reason == "eos"


def test_multibyte_text_streams_without_replacement_chars(tokenizer, monkeypatch):
    text = "Café naïve — 日本語のテキスト 🙂👍🏽 ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 2  # mostly byte-level tokens
    _scripted(monkeypatch, [ids, ids[:7]])
    gen = TextGenerator(_model(), tokenizer)
    streamed = {0: [], 1: []}
    results = gen.stream_batch(
        ["a", "b"],
        SamplingParams(max_new_tokens=len(ids), stop=["🙂👍"]),
        lambda row, piece: streamed[row].append(piece),
    )
    assert results[0].text == "Café naïve — 日本語のテキスト "
    assert "".join(streamed[0]) == results[0].text
    assert len(streamed[0]) > 5  # it really streamed
    assert all("\ufffd" not in p for p in streamed[0] + streamed[1])
    assert text.startswith(results[1].text) and results[1].finish_reason == "eos"


def test_row_text_holds_back_only_possible_stop_prefixes(tokenizer):
    row = _RowText(tokenizer, ["\n\n", "END"])
    out = [
        "".join(row.feed(i) for i in tokenizer.encode(piece))
        for piece in ["one", "\n", "two", "E", "N"]
    ]
    assert out == ["one", "", "\ntwo", "", ""]
    assert row.flush() == "EN" and not row.stopped


def test_prompt_longer_than_context_is_left_truncated(tokenizer, capsys):
    gen = TextGenerator(_model(max_seq_len=32), tokenizer)
    prompt = "word " * 200
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    r = gen.generate(prompt, params)
    assert r.truncated_prompt_tokens > 0 and r.prompt_tokens == 32 - 10
    assert r.new_tokens + r.prompt_tokens <= 32
    assert "dropped its first" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate("  \n", params)


def test_int8_stays_close_to_fp32():
    torch.manual_seed(0)
    # init 0.05: logits peaked enough for top-1 to mean something (default 0.02 is
    # near-uniform), not yet chaotic (0.1 flips many routing decisions).
    model = _model(d_model=64, d_ff=128, max_seq_len=64, init_std=0.05)
    before = copy.deepcopy(model.state_dict())
    q = quantize_int8(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    int8 = [
        n for n, m in q.named_modules() if "quantized.dynamic" in type(m).__module__
    ]
    # per layer: q, k, v, o + w13, w2 of 4 experts; plus the head
    assert len(int8) == 2 * (4 + 2 * 4) + 1 and "int8_head" in int8
    assert isinstance(q.layers[0].moe.router.gate, nn.Linear)  # router stays fp32
    x = torch.randint(3, 300, (4, 48))
    with torch.no_grad():
        ref = model(x)["logits"]
        got = q(x)["logits"]  # reference forward over int8 Linears, fp32 tied head
    # relative logit error measured 4.3-6.5% (0.05 init), 1.2-1.3% (0.02 init)
    assert (got - ref).norm() <= 0.1 * ref.norm()
    last = fast_logits(q, x, q.allocate_kv_cache(4, 48), 0)  # int8 head as well
    assert (last - ref[:, -1]).norm() <= 0.1 * ref[:, -1].norm()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    prompts = x[:, :8].tolist()
    a = torch.stack(list(generate_stream(model, prompts, params)), 1)
    b = torch.stack(list(generate_stream(q, prompts, params)), 1)
    assert (a == b).float().mean() >= 0.75  # greedy paths may part after a near-tie
