"""Text in, text out, over the token-level generator: prompt encoding and truncation,
UTF-8-safe streaming, stop strings (held back while they may still be forming, never
emitted), and per-generation timings.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from hmst.generation.generate import generate_stream
from hmst.generation.sampling import SamplingParams
from hmst.observe.hooks import ObserverRegistry, check_mode
from hmst.tokenizer import HMSTTokenizer


@dataclass
class GenerationResult:
    prompt: str
    text: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    finish_reason: str = "length"  # length | eos | stop | interrupted
    truncated_prompt_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        decode_time = self.latency_s - self.ttft_s
        return (
            (self.new_tokens - 1) / decode_time
            if self.new_tokens > 1 and decode_time > 0
            else 0.0
        )


class _RowText:
    """Per-row incremental decode + stop-string handling."""

    def __init__(self, tokenizer: HMSTTokenizer, stops: list[str]):
        self.decoder = tokenizer.decode_stream()
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far
        self.emitted = 0  # chars of `text` handed out
        self.stopped = False

    def feed(self, token_id: int) -> str:
        """New safe-to-show text after one token ('' while held back)."""
        self.text += self.decoder.step(token_id)
        for s in self.stops:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
                return self._take(len(self.text))
        hold = 0
        for s in self.stops:  # longest suffix of text that is a prefix of a stop string
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return self._take(len(self.text) - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return piece


class TextGenerator:
    """Generation over text for a model + tokenizer (inference.py, demo.py)."""

    def __init__(self, model, tokenizer: HMSTTokenizer, observe: str = "off"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.observe = check_mode(observe)
        """Default observation mode: off | summary | diagnostic."""
        self.observers = ObserverRegistry()
        """Observers of every generation (`observers.scoped(obs)` for a block)."""

    def encode_prompt(
        self, prompt: str, params: SamplingParams
    ) -> tuple[list[int], int]:
        """BOS + prompt ids, left-truncated so that at least min(max_new_tokens, half
        the context) new tokens fit. Returns (ids, number of tokens dropped)."""
        if not prompt.strip():
            raise ValueError("empty prompt")
        ids = self.tokenizer.encode(prompt, bos=True)
        ctx = self.model.config.max_seq_len
        keep = ctx - min(params.max_new_tokens, ctx // 2)
        dropped = max(0, len(ids) - keep)
        if dropped:
            ids = [self.tokenizer.bos_id] + ids[dropped + 1 :]
        return ids, dropped

    def stream_batch(
        self,
        prompts: list[str],
        params: SamplingParams,
        on_text: Callable[[int, str], None] | None = None,
        observe: str | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt at once; `on_text(row, piece)` streams the text.
        Ctrl-C (KeyboardInterrupt) ends the generation early with finish_reason
        'interrupted' instead of propagating. `observe` overrides the mode."""
        t0 = time.perf_counter()
        encoded = [self.encode_prompt(p, params) for p in prompts]
        results = [
            GenerationResult(
                prompt=p, prompt_tokens=len(ids), truncated_prompt_tokens=d
            )
            for p, (ids, d) in zip(prompts, encoded)
        ]
        for r in results:
            if r.truncated_prompt_tokens:
                print(
                    f"warning: prompt longer than the context; dropped its first "
                    f"{r.truncated_prompt_tokens} tokens",
                    file=sys.stderr,
                )
        rows = [_RowText(self.tokenizer, params.stop) for _ in prompts]
        done = [False] * len(prompts)
        eos = self.tokenizer.eos_id
        emitter = self.observers.emitter(observe or self.observe)
        stream: Iterator[torch.Tensor] = generate_stream(
            self.model, [ids for ids, _ in encoded], params, eos, observe=emitter
        )
        try:
            for step, nxt in enumerate(stream):
                if step == 0:
                    for r in results:
                        r.ttft_s = time.perf_counter() - t0
                for i, tok in enumerate(nxt.tolist()):
                    if done[i]:
                        continue
                    if tok == eos:
                        done[i], results[i].finish_reason = True, "eos"
                        continue
                    results[i].token_ids.append(tok)
                    results[i].new_tokens += 1
                    piece = rows[i].feed(tok)
                    if piece and on_text:
                        on_text(i, piece)
                    if rows[i].stopped:
                        done[i], results[i].finish_reason = True, "stop"
                if all(done):
                    break
        except KeyboardInterrupt:
            for i, r in enumerate(results):
                if not done[i]:
                    r.finish_reason, done[i] = "interrupted", True
        finally:
            stream.close()
        t1 = time.perf_counter()
        for i, r in enumerate(results):
            tail = rows[i].flush()
            if tail and on_text:
                on_text(i, tail)
            r.text, r.latency_s = rows[i].text, t1 - t0
        return results

    def generate(
        self, prompt: str, params: SamplingParams, on_text=None, observe=None
    ) -> GenerationResult:
        cb = (lambda _, piece: on_text(piece)) if on_text else None
        return self.stream_batch([prompt], params, cb, observe)[0]
