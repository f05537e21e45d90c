"""Selective scan backends and EpisodicMemorySSM: chunked == ref (outputs and grads),
no full (B, L, D, N) tensor, step() == forward, cache continuation, causality, 8K."""

import logging

import pytest
import torch

from hmst.configs.model_config import SSMConfig
from hmst.kernels import scan as scan_mod
from hmst.kernels.scan import (
    LargestTensor,
    chunk_plan,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)
from hmst.models.ssm import EpisodicMemorySSM


def scan_inputs(b, L, d, n, h0=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, L, d, generator=g)
    # Step sizes spanning short and long memories; A as in the S4D-real init.
    delta = torch.exp(torch.rand(b, L, d, generator=g) * 5 - 5)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    A = A * (0.5 + torch.rand(d, n, generator=g))
    B = torch.randn(b, L, n, generator=g)
    C = torch.randn(b, L, n, generator=g)
    D = torch.randn(d, generator=g)
    state = torch.randn(b, d, n, generator=g) if h0 else None
    args = [u, delta, A, B, C, D, state]
    return [a.requires_grad_() if a is not None else None for a in args]


def run_with_grads(fn, args, seed=1):
    y, h = fn(*args)
    g = torch.Generator().manual_seed(seed)
    wy, wh = torch.randn(y.shape, generator=g), torch.randn(h.shape, generator=g)
    loss = (y * wy).sum() + (h * wh).sum()  # gradient flows through the final state too
    leaves = [a for a in args if a is not None]
    return y, h, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    "L,chunk,h0",
    [
        (1, None, False),
        (37, None, True),
        (64, 8, False),
        (100, 7, True),
        (257, None, True),
    ],
)
def test_chunked_matches_ref_outputs_and_grads(L, chunk, h0):
    args = scan_inputs(2, L, 6, 4, h0=h0)
    y_r, h_r, g_r = run_with_grads(selective_scan_ref, args)
    y_c, h_c, g_c = run_with_grads(
        lambda *a: selective_scan_chunked(*a, chunk=chunk), args
    )
    torch.testing.assert_close(y_c, y_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h_c, h_r, atol=1e-4, rtol=1e-4)
    assert len(g_c) == len(g_r)
    for a, b in zip(g_c, g_r):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_chunk_plan_is_sqrt_and_covers_sequence():
    for L in (1, 2, 63, 64, 65, 4096, 8191):
        T, nc = chunk_plan(L)
        assert T * nc >= L > T * (nc - 1)
        assert T * T >= L > (T - 1) * (T - 1)


def test_chunked_never_allocates_a_full_state_sequence():
    b, L, d, n = 1, 256, 8, 16
    args = scan_inputs(b, L, d, n, h0=True)
    with LargestTensor() as mode:
        run_with_grads(selective_scan_chunked, args)
    # The backward's per-group state store is capped at a quarter of the sequence.
    assert mode.largest <= b * L * d * n // 4
    with LargestTensor() as mode:  # the detector does see a full-size tensor
        torch.exp(args[1].detach().unsqueeze(-1) * args[2].detach())
    assert mode.largest == b * L * d * n


def test_auto_backend_on_cpu_is_chunked_and_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(scan_mod, "_logged", set())
    args = [a.detach() if a is not None else None for a in scan_inputs(1, 9, 3, 2)]
    with caplog.at_level(logging.INFO, logger="hmst.kernels.scan"):
        y_auto, _ = selective_scan(*args)
        selective_scan(*args)
    assert [r.getMessage() for r in caplog.records].count(
        "selective scan backend: chunked (tensors on cpu)"
    ) == 1
    torch.testing.assert_close(y_auto, selective_scan_chunked(*args)[0])
    with pytest.raises(ValueError, match="unknown scan backend"):
        selective_scan(*args, backend="nope")


@pytest.mark.skipif(
    not torch.cuda.is_available() or scan_mod._load_cuda() is None,
    reason="needs CUDA and mamba_ssm",
)
def test_cuda_backend_matches_chunked():
    args = [a.detach().cuda().requires_grad_() for a in scan_inputs(2, 300, 8, 4)[:-1]]
    y_c, h_c = selective_scan(*args, backend="cuda")
    y_k, h_k = selective_scan(*args, backend="chunked")
    torch.testing.assert_close(y_c, y_k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h_c, h_k, atol=1e-4, rtol=1e-4)


# -- EpisodicMemorySSM --------------------------------------------------------------


def tiny_ssm(**kw):
    torch.manual_seed(0)
    cfg = dict(d_state=4, n_blocks=2, max_seq_len=8192, expand=2, d_conv=4)
    cfg.update(kw)
    return EpisodicMemorySSM(16, **cfg).eval()


def test_interface_and_config_construction():
    m = EpisodicMemorySSM(16, config=SSMConfig(d_state=8, n_blocks=3, max_seq_len=64))
    assert (m.d_model, m.d_state, len(m.blocks), m.d_inner) == (16, 8, 3, 32)
    y, state = m(torch.randn(2, 10, 16))
    assert y.shape == (2, 10, 16) and state.shape == (2, 8)
    assert m(torch.randn(2, 10, 16), return_state=False).shape == (2, 10, 16)
    with pytest.raises(ValueError, match="either a config"):
        EpisodicMemorySSM(16, d_state=8, config=SSMConfig())
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        m(torch.randn(1, 65, 16))


def test_step_token_by_token_matches_forward():
    m = tiny_ssm()
    x = torch.randn(2, 23, 16)
    full_cache = m.allocate_inference_cache(2)
    with torch.no_grad():
        y, state = m(x, cache=full_cache)
    cache = m.allocate_inference_cache(2)
    ys = []
    for t in range(x.shape[1]):
        y_t, state_t = m.step(x[:, t], cache)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state_t, state, atol=1e-5, rtol=1e-5)
    for a, b in zip(
        cache.ssm_states + cache.conv_states,
        full_cache.ssm_states + full_cache.conv_states,
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert cache.seqlen_offset == full_cache.seqlen_offset == 23
    assert not torch.equal(state, torch.zeros_like(state))


def test_forward_in_pieces_with_cache_matches_whole():
    m = tiny_ssm()
    x = torch.randn(2, 50, 16)
    with torch.no_grad():
        y, state = m(x)
        cache = m.allocate_inference_cache(2)
        parts = [m(x[:, a:b], cache=cache) for a, b in ((0, 2), (2, 31), (31, 50))]
    torch.testing.assert_close(
        torch.cat([p[0] for p in parts], 1), y, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(parts[-1][1], state, atol=1e-5, rtol=1e-5)


def test_model_grads_chunked_match_ref():
    x = torch.randn(2, 40, 16)
    grads = {}
    for backend in ("ref", "chunked"):
        m = tiny_ssm(backend=backend)  # same seed: same weights
        y, state = m(x)
        (y.square().mean() + state.sum()).backward()
        grads[backend] = {k: p.grad for k, p in m.named_parameters()}
    for k, g in grads["ref"].items():
        torch.testing.assert_close(grads["chunked"][k], g, atol=1e-4, rtol=1e-4)


def test_causality():
    m = tiny_ssm()
    x = torch.randn(1, 30, 16)
    x2 = x.clone()
    x2[:, 17] += 1.0
    with torch.no_grad():
        y, _ = m(x)
        y2, _ = m(x2)
    assert torch.equal(y[:, :17], y2[:, :17])
    assert not torch.allclose(y[:, 17:], y2[:, 17:])


def test_8k_context_forward_then_step():
    m = tiny_ssm(d_state=4, n_blocks=1, expand=1)
    x = torch.randn(1, 8192, 16)
    with torch.no_grad():
        y, state = m(x)
        cache = m.allocate_inference_cache(1)
        m(x[:, :-1], cache=cache)
        y_last, state_last = m.step(x[:, -1], cache)
    assert y.shape == (1, 8192, 16) and torch.isfinite(y).all()
    torch.testing.assert_close(y_last, y[:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state_last, state, atol=1e-4, rtol=1e-4)


# -- HMSTLM: windowed attention fed by the SSM --------------------------------------


def test_window_blocks_distant_tokens_unless_the_ssm_carries_them():
    from hmst.configs.model_config import ModelConfig
    from hmst.models.hmst_lm import HMSTLM, sliding_window_mask

    mask = sliding_window_mask(5, 2)[0, 0]
    assert mask.tolist()[3] == [False, False, True, True, False]
    cfg = ModelConfig(
        vocab_size=20, d_model=16, n_layers=2, n_heads=2, d_ff=16, max_seq_len=40
    )
    ids = torch.randint(0, 20, (1, 40), generator=torch.Generator().manual_seed(0))
    reach = 2 * (5 - 1)  # n_layers x (window - 1): the farthest attention can see
    far, near = ids.clone(), ids.clone()
    far[0, 39 - reach - 1] = (ids[0, 39 - reach - 1] + 1) % 20
    near[0, 39 - reach] = (ids[0, 39 - reach] + 1) % 20
    for ssm in (None, SSMConfig(d_state=4, n_blocks=1)):
        torch.manual_seed(0)
        model = HMSTLM(cfg, ssm, window=5).eval()
        with torch.no_grad():
            last = [model(x)["logits"][0, -1] for x in (ids, far, near)]
        assert not torch.equal(last[0], last[2])  # within reach: always visible
        assert torch.equal(last[0], last[1]) == (ssm is None)
