"""Fused LM head + cross-entropy: the loss of `F.linear(h, w)` without the logits.

At micro scale the (tokens x vocab) logits are the largest tensors of a training step
(2048 x 8192 fp32 = 64 MB for one batch): `F.cross_entropy(F.linear(h, w), y)` writes
them, a log-softmax of them, a zero-filled gradient and the gradient itself, each a
fresh allocation that the OS faults in page by page. `linear_cross_entropy` runs the
rows in chunks of a few MB instead, and since the loss is the graph's end it computes
the gradients of h and w in the same pass (softmax minus one-hot, two matmuls), so the
backward only scales them. Same maths as the unfused pair (tests: values and gradients
to 1e-5); measured 272 vs 381 ms for head + loss forward and backward at 2048 x 256 x
8192, 1 thread (BENCHMARKS.md). The idea is Liger-Kernel's fused linear cross-entropy.

Shape legend: N rows (batch x time flattened), D d_model, V vocab, C chunk rows.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 21  # logits per chunk (8 MB in fp32): rows = this // V


def _chunk_rows(vocab: int) -> int:
    return max(16, CHUNK_ELEMENTS // vocab)


def _chunk_loss(h_CD, w_VD, t_C, valid_C, scale_C=None):
    """Summed loss of a chunk; with `scale_C` (d loss / d row-loss), also the gradient
    of the logits, written in place of the logits buffer (fp32)."""
    logits_CV = (h_CD @ w_VD.t()).float()
    t_C = torch.where(valid_C, t_C, 0)
    target_C = logits_CV.gather(1, t_C[:, None]).squeeze(1)
    max_C1 = logits_CV.amax(-1, keepdim=True)
    exp_CV = logits_CV.sub_(max_C1).exp_()  # in place: the logits are not needed again
    sum_C1 = exp_CV.sum(-1, keepdim=True)
    loss_C = max_C1.squeeze(1) + sum_C1.log().squeeze(1) - target_C
    loss = torch.where(valid_C, loss_C, 0.0).sum()
    if scale_C is None:
        return loss, None
    grad_CV = exp_CV.mul_(scale_C[:, None] / sum_C1)  # softmax * scale
    grad_CV[torch.arange(len(t_C), device=t_C.device), t_C] -= scale_C
    return loss, grad_CV


def _chunked(h_ND, w_VD, t_N, ignore_index, want_h: bool, want_w: bool):
    """The mean loss over the valid rows, and (when asked) its gradients for h and w,
    one chunk of rows at a time."""
    valid_N = t_N != ignore_index
    n_valid = valid_N.sum().clamp(min=1)
    scale_N = valid_N.float() / n_valid if want_h or want_w else None
    grad_h = grad_w = None
    if want_h:
        grad_h = torch.empty(h_ND.shape, dtype=h_ND.dtype, device=h_ND.device)
    if want_w:
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
    total = h_ND.new_zeros((), dtype=torch.float32)
    step = _chunk_rows(w_VD.shape[0])
    for s in range(0, h_ND.shape[0], step):
        rows = slice(s, s + step)
        h_CD = h_ND[rows]
        loss, grad_CV = _chunk_loss(
            h_CD,
            w_VD,
            t_N[rows],
            valid_N[rows],
            None if scale_N is None else scale_N[rows],
        )
        total += loss
        if grad_h is not None:
            torch.mm(grad_CV.to(h_ND.dtype), w_VD.to(h_ND.dtype), out=grad_h[rows])
        if grad_w is not None:
            grad_w.addmm_(grad_CV.t(), h_CD.float())
    if grad_w is not None:
        grad_w = grad_w.to(w_VD.dtype)
    return total / n_valid, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, ignore_index):
        loss, grad_h, grad_w = _chunked(
            h_ND, w_VD, t_N, ignore_index, *ctx.needs_input_grad[:2]
        )
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_out.to(grad_w.dtype),
            None,
            None,
        )


def linear_cross_entropy(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    targets_N: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=...)` (mean over
    the rows whose target is not `ignore_index`), without materialising the logits.
    h (..., D), w (V, D), targets (...) long."""
    h_ND = h_ND.reshape(-1, h_ND.shape[-1])
    t_N = targets_N.reshape(-1)
    if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
        return _LinearCrossEntropy.apply(h_ND, w_VD, t_N, ignore_index)
    return _chunked(h_ND, w_VD, t_N, ignore_index, False, False)[0]
