"""Optimizer and learning-rate schedule.

AdamW (torch's fused kernel wherever this torch has one for the parameters' device and
dtype: CUDA, and CPU since torch 2.4 — there 3x faster than the per-tensor loop on the
micro model, 14.8 vs 46 ms a step, equal to 2.4e-7) or bitsandbytes' 8-bit AdamW
(imported lazily; it runs on CPU too). Decoupled weight decay on matrices only: not on
norms or the embedding.
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and "embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model, lr, weight_decay, betas, use_8bit: bool = False):
    groups = param_groups(model, weight_decay)
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError(
                "--use-8bit-optimizer needs bitsandbytes: pip install 'hmst[8bit]'"
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except RuntimeError:  # no fused kernel for this device/dtype: the plain loop
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer, warmup_steps, total_steps, min_ratio):
    fn = lr_lambda(warmup_steps, total_steps, min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
