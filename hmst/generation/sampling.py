"""The only sampler: temperature (0 = greedy), top-k, top-p, repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 50
    """Tokens to generate at most (the design's --max-length)."""
    temperature: float = 0.8
    """0 means greedy."""
    top_k: int = 50
    """Keep the k most likely tokens (0 disables)."""
    top_p: float = 0.9
    """Keep the smallest set of tokens whose probability reaches p (1 disables)."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the context (CTRL / HF convention)."""
    seed: int | None = None
    """Seed of the sampling generator (None: nondeterministic)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (text level); excluded from the output."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


def apply_repetition_penalty(logits_BV, context_BS, penalty: float):
    if penalty == 1.0:
        return logits_BV
    picked = logits_BV.gather(1, context_BS)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits_BV.scatter(1, context_BS, picked)


def sampling_logits(logits_BV, params: SamplingParams, context_BS=None):
    """The logits actually sampled from: penalties, temperature, top-k and top-p
    applied (filtered tokens at -inf). Greedy (temperature 0): the penalised logits,
    whose argmax is the token."""
    logits_BV = logits_BV.float()
    if context_BS is not None:
        logits_BV = apply_repetition_penalty(
            logits_BV, context_BS, params.repetition_penalty
        )
    if params.temperature == 0:
        return logits_BV
    logits_BV = logits_BV / params.temperature
    if params.top_k and params.top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(params.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_idx = logits_BV.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (keeps >= 1 token)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def draw(filtered_BV, params: SamplingParams, generator=None):
    """Token ids (B,) from `sampling_logits`: argmax when greedy, else a sample."""
    if params.temperature == 0:
        return filtered_BV.argmax(dim=-1)
    probs = filtered_BV.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_next(logits_BV, params: SamplingParams, generator=None, context_BS=None):
    """Next token ids (B,) from the last-position logits (B, V)."""
    return draw(sampling_logits(logits_BV, params, context_BS), params, generator)
