"""Token-level generation: prefill, then one token at a time against the KV cache.

Ids in, ids out. Prompts of different lengths are left-padded and masked, so each row
decodes exactly as it would alone (RoPE is relative, padded keys are never attended).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import torch

from hmst.generation.fast_forward import BACKENDS, reference_logits
from hmst.generation.sampling import SamplingParams, draw, sampling_logits
from hmst.observe.hooks import Emitter
from hmst.observe.tap import ModelTap
from hmst.observe.trace import logit_summary


def _make_generator(seed, device):
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def generate_stream(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int | None = None,
    backend="fast",
    expert_bias: torch.Tensor | None = None,
    observe: Emitter | None = None,
    prefilled: tuple | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) per step. A row that emitted `eos_id`
    keeps emitting it; the stream ends when every row has, or after max_new_tokens.
    `backend`: "fast" (`fast_logits`), "reference" (the model's own forward) or a
    function with their signature (e.g. a compiled one, in bench/bench_decode.py).
    `expert_bias` (E,) or (L, E) shifts expert choice (the meta-controller's
    preference). `observe` (an `hmst.observe.Emitter`, None = off) receives the
    generation's events; the tokens are the same either way. `prefilled`
    (caches, logits (B, V)): the prompts already ran through the model into these
    caches (e.g. the inference engine's probe) and these are their last logits;
    equal-length prompts only, caches long enough for the new tokens."""
    forward = BACKENDS[backend] if isinstance(backend, str) else backend
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    max_len = model.config.max_seq_len
    lens = [len(p) for p in prompts]
    B, T = len(prompts), max(lens)
    if T >= max_len:
        raise ValueError(
            f"prompt of {T} tokens leaves no room in the {max_len}-token context"
        )
    total = min(T + params.max_new_tokens, max_len)
    device = model.embed.weight.device
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    valid = torch.ones(B, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, device=device)
        valid[i, : T - len(p)] = False
    padded = min(lens) != T
    mask = None
    if padded:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = (causal[None] & valid[:, None, :T]).unsqueeze(1)  # (B, 1, T, T)
    first_logits = None
    if prefilled is None:
        caches = model.allocate_kv_cache(B, total)
    else:
        caches, first_logits = prefilled
        if padded or first_logits.shape[0] != B or caches[0].max_seq_len < total:
            raise ValueError(
                "prefilled caches need equal-length prompts, one logits row per "
                f"prompt and room for {total} positions"
            )
    gen = _make_generator(params.seed, device)
    n_new = total - T
    if observe is None:
        yield from _decode(
            model, ids, caches, mask, valid, padded, params, gen, eos_id, n_new,
            forward, expert_bias, first_logits=first_logits,
        )  # fmt: skip
        return
    yield from _observed(
        observe, model, prompts, ids, caches, mask, valid, padded, params, gen,
        eos_id, n_new, forward, expert_bias, first_logits,
    )  # fmt: skip


def _decode(model, ids, caches, mask, valid, padded, params, gen, eos_id, n_new,
            forward, expert_bias, tap=None, on_token=None,
            first_logits=None):  # fmt: skip
    """The token loop. `tap`/`on_token(step, logits, filtered, nxt)` exist only when
    the generation is observed; the ops are the same either way. `first_logits`: the
    prompt is already in `caches` (no prefill)."""
    T = ids.shape[1]
    logits = first_logits
    if logits is None:
        logits = prefill(model, ids, caches, mask, forward, expert_bias, tap)
    context = ids
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(n_new):
        filtered = sampling_logits(logits, params, context)
        nxt = draw(filtered, params, gen)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
        if on_token is not None:
            on_token(step, logits, filtered, nxt, finished)
        if eos_id is not None:
            finished |= nxt == eos_id
        yield nxt
        if step == n_new - 1 or bool(finished.all()):
            return
        pos = T + step
        mask = valid[:, None, None, : pos + 1] if padded else None
        logits = decode_one_token(
            model, nxt, caches, pos, mask, forward, expert_bias, tap
        )
        if params.repetition_penalty != 1.0:
            context = torch.cat([context, nxt[:, None]], dim=1)


def _observed(emitter, model, prompts, ids, caches, mask, valid, padded, params, gen,
              eos_id, n_new, forward, expert_bias, first_logits):  # fmt: skip
    """`_decode` with a `ModelTap` and per-token events around it."""
    t0 = time.perf_counter()
    emitter.emit(
        "generation_begin",
        {
            "prompts": prompts,
            "params": dataclasses.asdict(params),
            "mode": emitter.mode,
        },
    )
    generated: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    tap = ModelTap(model, emitter, hook_routers=forward is reference_logits)

    def on_token(step, logits, filtered, nxt, finished):
        tap.flush(step)  # the routing of the forward that produced these logits
        for row, tok in enumerate(nxt.tolist()):
            if finished[row]:
                continue
            sampled = None if params.temperature == 0 else filtered[row].softmax(-1)
            summary = logit_summary(logits[row], sampled, tok)
            emitter.emit("step", {"step": step, "row": row, **summary})
            if tok == eos_id:
                reasons[row] = "eos"
            else:
                generated[row].append(tok)

    try:
        with tap:
            yield from _decode(
                model, ids, caches, mask, valid, padded, params, gen, eos_id, n_new,
                forward, expert_bias, tap, on_token, first_logits,
            )  # fmt: skip
    except GeneratorExit:  # the consumer stopped early (stop string, Ctrl-C)
        reasons = [r if r == "eos" else "stopped" for r in reasons]
        raise
    finally:
        emitter.emit(
            "generation_end",
            {
                "generated": generated,
                "finish_reasons": reasons,
                "elapsed_s": time.perf_counter() - t0,
                "failed_observers": list(emitter.failed.values()),
            },
        )


def prefill(model, ids_BT, caches, mask=None, forward=None, expert_bias=None, tap=None):
    """Run the whole (left-padded) prompt once; logits (B, V) of its last position."""
    forward = forward or BACKENDS["fast"]
    return forward(model, ids_BT, caches, 0, mask, expert_bias, tap)


def decode_one_token(model, tok_B, caches, pos: int, mask=None, forward=None,
                     expert_bias=None, tap=None):  # fmt: skip
    """Feed one token per row at position `pos`; logits (B, V) for the next one."""
    forward = forward or BACKENDS["fast"]
    return forward(model, tok_B[:, None], caches, pos, mask, expert_bias, tap)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.9,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """HF-style: (B, T) ids -> (B, T + n) ids (rows that hit EOS are EOS-padded)."""
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    prompts = input_ids.tolist()
    steps = list(generate_stream(model, prompts, params, eos_token_id))
    if not steps:
        return input_ids
    return torch.cat([input_ids, torch.stack(steps, dim=1).to(input_ids.device)], dim=1)
