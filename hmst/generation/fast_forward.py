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

`prepare_for_inference` re-lays every Linear weight (and the tied head) column-major:
the values are unchanged, but MKL's small-batch fp32 kernels read an (in, out) matrix
up to ~1.8x faster than an (out, in) one (1 row x 256->2048: 109 vs 173 us here).

Shape legend: B batch, T new tokens, D d_model, V vocab, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hmst.models.moe import grouped_experts


def _moe(moe, x_BTD: torch.Tensor, bias_E=None, tap=None, layer=0) -> torch.Tensor:
    """Router (fp32) + grouped dispatch, as `MoE.forward` without its statistics.
    `bias_E` shifts which experts are chosen (as `Router`); `tap` records the choice."""
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    router = moe.router
    logits_TE = F.linear(x_TD.float(), router.gate.weight.float())
    probs_TE = logits_TE.softmax(dim=-1)
    if bias_E is None:
        gates_TK, topk_idx_TK = probs_TE.topk(router.top_k, dim=-1)
    else:
        topk_idx_TK = (logits_TE + bias_E).topk(router.top_k, dim=-1).indices
        gates_TK = probs_TE.gather(1, topk_idx_TK)
    gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
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
        return F.linear(h_BD, model.embed.weight)
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
    for i, (layer, cache) in enumerate(zip(model.layers, caches)):
        bias = expert_bias
        if expert_bias is not None and expert_bias.dim() == 2:  # (L, E): per layer
            bias = expert_bias[i]
        x = x + layer.attn(layer.attn_norm(x), cos, sin, cache, pos, mask)
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


def _column_major(w: torch.Tensor) -> torch.Tensor:
    """Same (out, in) shape and values, stored transposed (in, out) in memory."""
    return w.t().contiguous().t()


@torch.no_grad()
def prepare_for_inference(model) -> nn.Module:
    """Eval mode, gradients off and Linear weights (plus the tied head) laid out
    column-major for faster small-batch matmuls. In place; returns the model. Only for
    models that will not be trained or saved afterwards (the weights are views)."""
    model.eval().requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            mod.weight.data = _column_major(mod.weight.data)
    return model
