"""Selective scan (Mamba-1 "S6"): one contract, three backends.

Contract (every backend honours it; `ref` is the specification)::

    h_t = exp(delta_t * A) * h_{t-1} + (delta_t * u_t) B_t    h: (B, D, N), h_{-1} = h0
    y_t = h_t C_t + D * u_t

    selective_scan(u, delta, A, B, C, D=None, h0=None) -> (y (B, L, D), h_L (B, D, N))

Glossary: u input (B, L, D); delta step size, > 0 (B, L, D); A state matrix, diagonal
and negative so exp(delta * A) is a decay in (0, 1] (D, N); B input matrix (B, L, N);
C output matrix (B, L, N); D skip connection (D,); h0 initial state (B, D, N).
Shape legend: L length, D channels (d_inner), N state size, T chunk length,
nc number of chunks, G chunks per backward group.

Backends:
- `ref`: the time loop, one `selective_state_update` per token, autograd through it.
- `chunked`: exact, pure PyTorch, default on CPU and for training. The sequence is cut
  into nc ~ sqrt(L) chunks of T ~ sqrt(L) tokens. (1) every chunk is scanned from a zero
  state, all chunks at once (T steps on (B, nc, D, N)); (2) chunk states are carried
  across chunks (nc steps on (B, D, N)) with the chunk's total decay
  exp(A * sum_t delta_t); (3) every chunk is rescanned from its true initial state to
  produce y. Every exponent is A * (a sum of deltas) <= 0, so nothing overflows, and
  no log-space arithmetic loses precision. The backward pass is hand-written and
  recomputes the states chunk group by chunk group from the saved chunk-boundary
  states, so no (B, L, D, N) tensor ever exists (autograd through the loops would save
  one step tensor per token: O(L * D * N) memory).
- `cuda`: mamba_ssm's `selective_scan_fn`, imported lazily, used when importable and
  the tensors are on CUDA. It takes no initial state, and its backward ignores the
  gradient of the returned final state (mamba_ssm behaviour): `auto` picks it only
  when h0 is None.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)

# Budget for the per-token states stored by one backward chunk group (at least one
# chunk, at most a quarter of the sequence).
GROUP_BYTES = 32 * 2**20

_cuda_fn = None
_cuda_tried = False
_logged: set[tuple[str, str]] = set()


def selective_state_update(h, u, delta, A, B, C, D=None):
    """One token of the recurrence. h (b, D, N), u/delta (b, D), B/C (b, N) ->
    (y (b, D), new h). O(D * N) per token: the model's recurrent `step()` uses it."""
    decay = torch.exp(delta.unsqueeze(-1) * A)  # (b, D, N), in (0, 1] as A < 0
    h = decay * h + (delta * u).unsqueeze(-1) * B.unsqueeze(-2)
    y = (h @ C.unsqueeze(-1)).squeeze(-1)
    if D is not None:
        y = y + D * u
    return y, h


def selective_scan_ref(u, delta, A, B, C, D=None, h0=None):
    """The specification: a plain loop over time (fp32)."""
    dtype = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    b, L, d = u.shape
    h = u.new_zeros(b, d, A.shape[1]) if h0 is None else h0.float()
    ys = []
    for t in range(L):
        y_t, h = selective_state_update(h, u[:, t], delta[:, t], A, B[:, t], C[:, t])
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(b, 0, d)
    if D is not None:
        y = y + u * D.float()
    return y.to(dtype), h


# -- chunked ------------------------------------------------------------------------


def chunk_plan(L: int, chunk: int | None = None) -> tuple[int, int]:
    """(T, nc): chunk length ~ ceil(sqrt(L)) and number of chunks."""
    T = chunk or max(1, math.isqrt(max(L - 1, 0)) + 1)
    return T, max(1, -(-L // T))


def _to_chunks(x, T, nc):
    """(B, L, K) -> (T, B, nc, K), zero-padded to nc * T tokens, contiguous so that
    the per-step slice [t] is one block of memory."""
    b, L, k = x.shape
    if nc * T > L:
        x = F.pad(x, (0, 0, 0, nc * T - L))
    return x.reshape(b, nc, T, k).permute(2, 0, 1, 3).contiguous()


def _from_chunks(x, L):
    """(T, B, nc, K) -> (B, L, K)."""
    T, b, nc, k = x.shape
    return x.permute(1, 2, 0, 3).reshape(b, nc * T, k)[:, :L]


def _step_(h, dl_t, du_t, B_t, A, a_buf, x_buf):
    """h <- exp(delta_t A) * h + (delta_t u_t) B_t, in place. Preallocated buffers:
    at d_state 256 a step tensor passes glibc's 32 MiB mmap threshold, and a fresh
    allocation per step would page-fault its way through it every time."""
    torch.mul(dl_t.unsqueeze(-1), A, out=a_buf).exp_()
    h.mul_(a_buf).add_(torch.mul(du_t.unsqueeze(-1), B_t.unsqueeze(-2), out=x_buf))


def _chunk_forward(dl, du, Bc, Cc, A, h0):
    """dl/du (T, B, nc, D) delta and delta*u; Bc/Cc (T, B, nc, N).
    Returns y (T, B, nc, D) without the skip term, Hin (B, nc, D, N), the chunk
    decays P (B, nc, D, N) and the final state."""
    T, b, nc, d = dl.shape
    n = A.shape[1]
    a_buf, x_buf = dl.new_empty(b, nc, d, n), dl.new_empty(b, nc, d, n)
    # (1) every chunk from a zero state, all chunks at once.
    h = dl.new_zeros(b, nc, d, n)
    for t in range(T):
        _step_(h, dl[t], du[t], Bc[t], A, a_buf, x_buf)
    # (2) carry across chunks; Hin[:, c] is the state entering chunk c.
    P = torch.exp(dl.sum(0).unsqueeze(-1) * A)  # (B, nc, D, N) total chunk decay
    Hin = torch.empty_like(h)
    H = h0 if h0 is not None else dl.new_zeros(b, d, n)
    for c in range(nc):
        Hin[:, c] = H
        H = P[:, c] * H + h[:, c]
    # (3) rescan every chunk from its true initial state.
    y = dl.new_empty(T, b, nc, d)
    h.copy_(Hin)
    for t in range(T):
        _step_(h, dl[t], du[t], Bc[t], A, a_buf, x_buf)
        torch.matmul(h, Cc[t].unsqueeze(-1), out=y[t].unsqueeze(-1))
    return y, Hin, P, H


def _chunk_backward(dl, du, uc, Bc, Cc, A, Hin, P, dyc, dhT, group):
    """Gradients of the chunked scan. r_t = dL/dh_{t-1} obeys the reverse scan
    r_t = a_t * (r_{t+1} + dy_t C_t), a_t = exp(delta_t A), solved the same chunked
    way; then each group of chunks recomputes its states from Hin and walks back."""
    T, b, nc, d = dl.shape
    n = A.shape[1]
    a_buf, x_buf = dl.new_empty(b, nc, d, n), dl.new_empty(b, nc, d, n)
    # (1) reverse-scan every chunk from a zero terminal adjoint.
    r = dl.new_zeros(b, nc, d, n)
    for t in range(T - 1, -1, -1):
        torch.mul(dl[t].unsqueeze(-1), A, out=a_buf).exp_()
        r.add_(torch.mul(dyc[t].unsqueeze(-1), Cc[t].unsqueeze(-2), out=x_buf))
        r.mul_(a_buf)
    # (2) carry back across chunks; Rend[:, c] = dL/d(state leaving chunk c).
    Rend = torch.empty_like(r)
    R = dhT if dhT is not None else dl.new_zeros(b, d, n)
    for c in range(nc - 1, -1, -1):
        Rend[:, c] = R
        R = P[:, c] * R + r[:, c]
    dh0 = R
    del r, a_buf, x_buf
    # (3) per group: recompute h_{t-1}, then walk back with the exact adjoint.
    ddl, ddu = torch.empty_like(dl), torch.empty_like(du)
    dB, dC = torch.empty_like(Bc), torch.empty_like(Cc)
    dA = torch.zeros_like(A)
    hprev = dl.new_empty(T, b, min(group, nc), d, n)  # the only per-token store
    g_bufs = [dl.new_empty(b, min(group, nc), d, n) for _ in range(4)]
    for g0 in range(0, nc, group):
        sl = slice(g0, min(nc, g0 + group))
        G = sl.stop - sl.start
        h, a_buf, x_buf, tmp = (t[:, :G] for t in g_bufs)
        h.copy_(Hin[:, sl])
        for t in range(T):
            hprev[t, :, :G].copy_(h)
            _step_(h, dl[t, :, sl], du[t, :, sl], Bc[t, :, sl], A, a_buf, x_buf)
            dC[t, :, sl] = (dyc[t, :, sl].unsqueeze(-2) @ h).squeeze(-2)
        r = h.copy_(Rend[:, sl])  # h is free again: reuse it for the adjoint
        for t in range(T - 1, -1, -1):
            g = r.add_(
                torch.mul(
                    dyc[t, :, sl].unsqueeze(-1), Cc[t, :, sl].unsqueeze(-2), out=x_buf
                )
            )
            ddu[t, :, sl] = (g @ Bc[t, :, sl].unsqueeze(-1)).squeeze(-1)
            dB[t, :, sl] = (du[t, :, sl].unsqueeze(-2) @ g).squeeze(-2)
            torch.mul(dl[t, :, sl].unsqueeze(-1), A, out=a_buf).exp_()
            r = g.mul_(a_buf)  # r_t = a_t * g_t
            prod = hprev[t, :, :G].mul_(r)  # g a_t h_{t-1} = dL/d(delta_t A)
            ddl[t, :, sl] = torch.mul(prod, A, out=tmp).sum(-1)
            dA += torch.einsum("bgd,bgdn->dn", dl[t, :, sl], prod)
    # du = delta * u: d/d(delta) += u * ddu, d/du = delta * ddu.
    ddl += uc * ddu
    dU = dl * ddu
    return dU, ddl, dA, dB, dC, dh0


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, h0, chunk):
        L = u.shape[1]
        T, nc = chunk_plan(L, chunk)
        uc, dl = _to_chunks(u, T, nc), _to_chunks(delta, T, nc)
        Bc, Cc = _to_chunks(B, T, nc), _to_chunks(C, T, nc)
        du = dl * uc
        yc, Hin, P, hL = _chunk_forward(dl, du, Bc, Cc, A, h0)
        y = _from_chunks(yc, L)
        if D is not None:
            y = y + u * D
        ctx.save_for_backward(uc, dl, du, A, Bc, Cc, D, Hin, P, u)
        ctx.has_h0 = h0 is not None
        ctx.L = L
        return y, hL

    @staticmethod
    def backward(ctx, dy, dhT):
        uc, dl, du, A, Bc, Cc, D, Hin, P, u = ctx.saved_tensors
        T, b, nc, d = dl.shape
        # Chunks per backward group: within the byte budget, and never more than a
        # quarter of the sequence, so no group store is (B, L, D, N)-sized.
        per_chunk = b * T * d * A.shape[1] * dl.element_size()
        group = max(1, min(nc // 4, GROUP_BYTES // per_chunk))
        dyc = _to_chunks(dy.contiguous(), T, nc)
        dU, ddl, dA, dB, dC, dh0 = _chunk_backward(
            dl, du, uc, Bc, Cc, A, Hin, P, dyc, dhT, group
        )
        L = ctx.L
        du_out = _from_chunks(dU, L)
        dD = None
        if D is not None:
            du_out = du_out + dy * D
            dD = (dy * u).sum((0, 1))
        return (
            du_out,
            _from_chunks(ddl, L),
            dA,
            _from_chunks(dB, L),
            _from_chunks(dC, L),
            dD,
            dh0 if ctx.has_h0 else None,
            None,
        )


def selective_scan_chunked(u, delta, A, B, C, D=None, h0=None, chunk=None):
    """Exact chunked scan (fp32 inside); `chunk` overrides T ~ sqrt(L) (tests)."""
    dtype = u.dtype
    args = [t.float().contiguous() for t in (u, delta, A, B, C)]
    Df = D.float() if D is not None else None
    h0f = h0.float().contiguous() if h0 is not None else None
    if u.shape[1] == 0:
        b, _, d = u.shape
        h = h0f if h0f is not None else args[0].new_zeros(b, d, A.shape[1])
        return u.new_zeros(u.shape), h
    y, h = _ChunkedScan.apply(*args, Df, h0f, chunk)
    return y.to(dtype), h


# -- cuda ---------------------------------------------------------------------------


def _load_cuda():
    global _cuda_fn, _cuda_tried
    if not _cuda_tried:
        _cuda_tried = True
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except ImportError:  # CPU machines, or builds without the CUDA kernels
            selective_scan_fn = None
        _cuda_fn = selective_scan_fn
    return _cuda_fn


def selective_scan_cuda(u, delta, A, B, C, D=None, h0=None):
    """mamba_ssm kernel; it wants (B, D, L) / (B, N, L) layouts."""
    fn = _load_cuda()
    if fn is None:
        raise RuntimeError("backend 'cuda' needs mamba_ssm, which is not importable")
    if h0 is not None:
        raise ValueError("mamba_ssm's selective_scan_fn takes no initial state")
    y, hL = fn(
        u.transpose(1, 2).contiguous(),
        delta.transpose(1, 2).contiguous(),
        A.float().contiguous(),
        B.transpose(1, 2).contiguous(),
        C.transpose(1, 2).contiguous(),
        D.float() if D is not None else None,
        return_last_state=True,
    )
    return y.transpose(1, 2), hL


BACKENDS = {
    "ref": selective_scan_ref,
    "chunked": selective_scan_chunked,
    "cuda": selective_scan_cuda,
}


def pick_backend(u, h0=None) -> str:
    """`auto`: cuda when mamba_ssm imports, u is on CUDA and there is no h0; else
    chunked. Each distinct choice is logged once."""
    use_cuda = u.is_cuda and h0 is None and _load_cuda() is not None
    name = "cuda" if use_cuda else "chunked"
    key = (name, u.device.type)
    if key not in _logged:
        _logged.add(key)
        log.info("selective scan backend: %s (tensors on %s)", name, u.device.type)
    return name


def selective_scan(u, delta, A, B, C, D=None, h0=None, backend="auto"):
    """Dispatch to a backend; see the module docstring for the contract."""
    if backend == "auto":
        backend = pick_backend(u, h0)
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose from {BACKENDS}")
    return BACKENDS[backend](u, delta, A, B, C, D, h0)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (out= buffers included, since their
    allocation is itself an op): how tests and bench_scan check that no scan backend
    materialises a (B, L, d_inner, d_state) tensor."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
