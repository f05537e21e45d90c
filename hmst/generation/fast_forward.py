"""Inference-only forward of a `BaseMoEModel`: the last position's logits, no more.

`model(...)` is the reference: it also returns router statistics and auxiliary
losses (logsumexp, entropy, bincount stacks, load-balance loss) that decoding never
reads, and at batch 1 those cost about as much as the attention. `fast_logits` walks
the same modules with the same maths and skips them; a single token runs its K experts
directly instead of the sort/scatter dispatch. Tests check both paths agree to 1e-5 in
fp32 (prefill and decode, padded or not). It also uses the int8 head made by
`hmst.generation.quantize` when there is one. Hooks on the model, its blocks, MoE and
router modules do not fire here (attention and expert hooks do): routing is observed
through the explicit `tap` argument instead (see `hmst.observe.tap`).

`prepare_for_inference` picks, per Linear, the fastest CPU form of its few-row matmuls
(MKL's fp32 kernels for a few rows are far below the memory bandwidth they need, and
which call is fastest depends on the layout): expert and head weights compute up to 16
rows as `(W @ x.T).T` (`small_matmul`), attention projections are stored column-major.

Shape legend: B batch, T new tokens, D d_model, V vocab, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hmst.kernels import native
from hmst.models.layers import SwiGLU, rope_matrix
from hmst.models.moe import grouped_experts, select_experts


def _moe(moe, x_BTD: torch.Tensor, bias_E=None, tap=None, layer=0) -> torch.Tensor:
    """Router (fp32) + grouped dispatch, as `MoE.forward` without its statistics.
    `bias_E` shifts which experts are chosen (as `Router`); `tap` records the choice."""
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    router = moe.router
    logits_TE, _, topk_idx_TK, gates_TK = select_experts(router, x_TD, bias_E)
    if tap is not None:
        tap.route(layer, logits_TE, topk_idx_TK, gates_TK, bias_E)
    if B * T == 1:  # one token (batch-1 decoding): its K experts, no sort/scatter
        y_TD = sum(
            g * moe.experts[e](x_TD)
            for e, g in zip(topk_idx_TK[0].tolist(), gates_TK[0].to(x_TD.dtype))
        )
    else:
        counts_E = torch.bincount(topk_idx_TK.flatten(), minlength=router.n_experts)
        y_TD = grouped_experts(x_TD, topk_idx_TK, gates_TK, counts_E, moe.experts)
    return y_TD.view(B, T, D)


def head_logits(model, h_BD: torch.Tensor) -> torch.Tensor:
    """(B, D) final hidden states -> (B, V) logits, through the int8 head if any."""
    q_head = getattr(model, "int8_head", None)
    if q_head is not None:
        return q_head(h_BD)
    if model.config.tie_embeddings:
        rows = getattr(model, "head_rows", 0)  # set by prepare_for_inference
        native_ok = getattr(model, "head_native", False)
        return small_matmul(h_BD, model.embed.weight, rows, native_ok)
    return model.lm_head(h_BD)


@torch.no_grad()
def fast_logits(
    model, ids_BT, caches, pos: int, mask=None, expert_bias=None, tap=None
) -> torch.Tensor:
    """Logits (B, V) of the last of the T tokens at positions [pos, pos + T), writing
    their keys/values into `caches`. Same contract as `model(ids_BT, kv_caches=caches,
    pos=pos, attn_mask=mask, expert_bias=expert_bias, last_only=True)["logits"][:, -1]`.
    `tap` (an `hmst.observe.ModelTap`, only when observed) records the routing."""
    T = ids_BT.shape[1]
    if pos + T > model.config.max_seq_len:
        raise ValueError(
            f"sequence end {pos + T} exceeds max_seq_len {model.config.max_seq_len}"
        )
    cos, sin = model.rope_cos[pos : pos + T], model.rope_sin[pos : pos + T]
    x = model.embed(ids_BT)
    rot = None  # one new token: its RoPE rotation as a matrix, once for all layers
    if T == 1 and cos.dtype == x.dtype:
        rot = rope_matrix(cos[0], sin[0])
    for i, (layer, cache) in enumerate(zip(model.layers, caches)):
        bias = expert_bias
        if expert_bias is not None and expert_bias.dim() == 2:  # (L, E): per layer
            bias = expert_bias[i]
        x = x + layer.attn(layer.attn_norm(x), cos, sin, cache, pos, mask, rot)
        x = x + _moe(layer.moe, layer.moe_norm(x), bias, tap, i)
    return head_logits(model, model.norm(x[:, -1]))


def reference_logits(
    model, ids_BT, caches, pos: int, mask=None, expert_bias=None, tap=None
) -> torch.Tensor:
    """The specification of `fast_logits`: the model's own forward (a `tap` sees its
    routing through router hooks: `ModelTap(..., hook_routers=True)`)."""
    out = model(
        ids_BT,
        kv_caches=caches,
        pos=pos,
        attn_mask=mask,
        expert_bias=expert_bias,
        last_only=True,
    )
    return out["logits"][:, -1]


BACKENDS = {"fast": fast_logits, "reference": reference_logits}


# Weights smaller than this (elements) always take `F.linear`.
MIN_NUMEL = 1 << 16
WIDE_ROWS, NARROW_ROWS = 16, 4  # `transposed_rows` of wide (out >= 2 in) / other


def transposed_rows(w_OI: torch.Tensor) -> int:
    """Up to how many rows `small_matmul` computes `x @ w.T` transposed for this
    weight (0: never): CPU fp32 row-major weights of at least MIN_NUMEL elements,
    16 rows when wide (out >= 2 * in), else 4."""
    if (
        w_OI.device.type != "cpu"
        or w_OI.dtype != torch.float32
        or not w_OI.is_contiguous()
        or w_OI.numel() < MIN_NUMEL
    ):
        return 0
    return WIDE_ROWS if w_OI.shape[0] >= 2 * w_OI.shape[1] else NARROW_ROWS


def small_matmul(
    x_MI: torch.Tensor, w_OI: torch.Tensor, rows: int, use_native: bool = False
) -> torch.Tensor:
    """`F.linear(x, w)` (no bias) in the fastest CPU form for a few rows M, with
    `rows = transposed_rows(w)`.

    With `use_native` (only where `native.available()`), up to 4 rows go to the native
    kernel (`hmst.kernels.native`: streams w once, ~29 GB/s at 1 thread here, vs 12-25
    GB/s for MKL's few-row kernels). Otherwise, and for M up to `rows`, MKL's fastest
    form (measured at 1 thread with the weights streamed from memory, BENCHMARKS.md):
    `(w @ x.T).T` (a gemm against M columns) is 1.3-3x faster than `F.linear` (256 ->
    2048 at M=2: 90 vs 196 us; 1024 -> 256 at M=2: 50 vs 83 us; the 256 -> 8192 head at
    M=8: 702 vs 1035 us). A single row against a wide weight is duplicated into two
    columns (MKL's one-column path is its slow row-major gemv: 99 vs 171 us); against a
    narrow one F.linear is as fast. The M columns must be `x.T` of a contiguous x (a
    row-major (in, M) operand is 2-4x slower), so a transposed input, such as the
    previous layer's result, is copied first (M x in: cheap)."""
    M = x_MI.shape[0]
    x_MI = x_MI.contiguous()
    if use_native and rows and M <= native.MAX_ROWS and x_MI.dtype is torch.float32:
        return native.gemv_unchecked(x_MI, w_OI)  # rows > 0: w is fp32, CPU, contiguous
    if M > rows or (M == 1 and rows != WIDE_ROWS):
        return F.linear(x_MI, w_OI)
    if M == 1:
        return (w_OI @ x_MI.expand(2, -1).contiguous().t())[:, :1].t()
    return (w_OI @ x_MI.t()).t()


def rows_linear(x: torch.Tensor, w_OI: torch.Tensor, rows: int, use_native: bool):
    """`small_matmul` over the last dimension of x (any leading shape)."""
    y = small_matmul(x.reshape(-1, x.shape[-1]), w_OI, rows, use_native)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class FastLinear(nn.Linear):
    """An `nn.Linear` whose forward is `small_matmul` (same weights and state dict).
    Made by `prepare_for_inference`, which sets `rows` and `native`."""

    rows, native = 0, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = rows_linear(x, self.weight, self.rows, self.native)
        return y if self.bias is None else y + self.bias


class RowsMatmul:
    """`rows_linear` over a fixed weight, as a plain callable (not a module, so it
    adds nothing to the state dict): the fused q/k/v projection of
    `prepare_for_inference`."""

    def __init__(self, w_OI: torch.Tensor, use_native: bool):
        self.weight, self.rows, self.native = w_OI, transposed_rows(w_OI), use_native

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rows_linear(x, self.weight, self.rows, self.native)


class NativeSwiGLU:
    """`SwiGLU.one_row` for one token: `native.swiglu` over the expert's own weights
    (read at each call: no copy). A plain callable, not a module."""

    def __init__(self, expert):
        self.expert = expert

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        e = self.expert
        y = native.swiglu_unchecked(x.contiguous(), e.w13.weight, e.w2.weight)
        return y.view(x.shape)


def _fuse_qkv(attn, use_native: bool) -> None:
    """`attn.qkv`: all three projections with one matmul, over a (q + k + v, D) copy
    of their weights (a copy, not views: the parameters stay separate tensors, so the
    model still saves; the cost is the q/k/v weights once more in memory)."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    if any(type(p) is not nn.Linear or p.bias is not None for p in projs):
        return  # quantized or biased projections keep their own path
    attn.qkv = RowsMatmul(torch.cat([p.weight.data for p in projs]), use_native)


def _column_major(w: torch.Tensor) -> torch.Tensor:
    """Same (out, in) shape and values, stored transposed (in, out) in memory."""
    return w.t().contiguous().t()


@torch.no_grad()
def prepare_for_inference(model, use_native: bool | None = None) -> nn.Module:
    """Eval mode, gradients off, and the fastest CPU matmul form for each Linear. In
    place; returns the model; int8-quantized layers keep their own kernels.
    `use_native`: use the native few-row kernel (default: wherever it can be built).

    Expert and head weights (and any other plain Linear) become `FastLinear`s: they
    see a varying few rows (1 to ~4 per expert when decoding a batch of 8), where
    `small_matmul` pays. So do attention projections when the native kernel is
    available, and q/k/v are fused into one weight (`Attention.qkv`, a copy: later
    changes to the q/k/v weights do not reach it). Without it they see exactly the
    batch size in rows, where a column-major copy under plain `F.linear` is as fast
    or faster at 1 and 8 rows (256 -> 256: 16 vs 22 us at 1 row), so they are re-laid
    out instead (the weights are then views: save the model before, not after)."""
    model.eval().requires_grad_(False)
    attn = {id(m) for block in model.layers for m in block.attn.modules()}
    if use_native is None:
        use_native = native.available()
    elif use_native and not native.available():
        raise RuntimeError("the native gemv kernel is not available on this machine")
    relayout = not use_native
    if use_native:  # q/k/v in one native call (+8% tok/s at batch 1)
        for block in model.layers:
            _fuse_qkv(block.attn, use_native)
        for mod in model.modules():  # one token through an expert: one native call
            if isinstance(mod, SwiGLU) and all(  # plain fp32 CPU weights, as gemv
                type(lin) is nn.Linear and transposed_rows(lin.weight)
                for lin in (mod.w13, mod.w2)
            ):
                mod.one_row = NativeSwiGLU(mod)
    for mod in model.modules():
        if type(mod) is not nn.Linear:
            continue
        if id(mod) in attn and relayout:
            mod.weight.data = _column_major(mod.weight.data)
        else:
            mod.__class__ = FastLinear
            mod.rows, mod.native = transposed_rows(mod.weight), use_native
    if model.config.tie_embeddings:
        model.head_rows = transposed_rows(model.embed.weight)
        model.head_native = use_native
    return model
