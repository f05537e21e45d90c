"""Memory consolidation: move important episodic entries into semantic memory.

Importance of an episodic entry, each term in [0, 1]:

    importance = w_access   * a / (a + 1)                    a: times retrieved
               + w_recency  * 0.5 ** (age / half_life_s)     age: seconds since added
               + w_surprise * min(nll / surprise_scale, 1)   nll: mean token NLL

`nll` is the base model's surprise at the entry's tokens (what the LM does not already
know is what is worth keeping); `surprise_scale` defaults to ln(vocab_size), the NLL of
a uniform guess. Entries with importance >= `threshold` are moved: embedded (the base
model's mean-pooled final hidden states), then either added to semantic memory, or, if
an entry there has cosine > `duplicate_threshold` with it, merged into that entry (its
metadata gains `merge_count`, `last_merged` and the episodic ids) instead of adding a
near-copy. Moved entries leave the episodic buffer; others stay and are re-scored on
the next pass (their access count may grow), with their surprise cached by id.

The model hooks are callables so tests and other encoders can stand in:
`embed_fn(tokens) -> (dimension,)`, `surprise_fn(tokens) -> float`,
`decode_fn(tokens) -> str` (the text stored in semantic memory, e.g. the tokenizer's
`decode`). Pass `model=` (a `BaseMoEModel`) to derive embed/surprise from it.

`consolidate_once()` runs one pass synchronously; `start()`/`stop()` (or `with`) run
passes every `interval_s` in a background thread. An exception in that thread stops it
and is re-raised by `stop()`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hmst.memory.episodic import EpisodicEntry, EpisodicMemory
from hmst.memory.semantic import SemanticMemory

log = logging.getLogger(__name__)


@dataclass
class ConsolidationReport:
    moved: list[int] = field(default_factory=list)  # episodic ids added to semantic
    merged: dict[int, int] = field(default_factory=dict)  # episodic id -> semantic id
    kept: list[int] = field(default_factory=list)  # below threshold, still episodic
    importance: dict[int, float] = field(default_factory=dict)


@torch.no_grad()
def model_embed_and_surprise(model, tokens: list[int]) -> tuple[torch.Tensor, float]:
    """(mean-pooled final hidden state (d_model,), mean next-token NLL) of `tokens`
    under a BaseMoEModel, in windows of its max_seq_len."""
    window = model.config.max_seq_len
    device = model.embed.weight.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    hidden_sum = torch.zeros(model.config.d_model, dtype=torch.float64)
    nll_sum, n_pred = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window][None]
        out = model(chunk, return_hidden=True)
        hidden_sum += out["hidden_states"][0].double().sum(0).cpu()
        if chunk.shape[1] > 1:
            logits = out["logits"][0, :-1].float()
            nll = F.cross_entropy(logits, chunk[0, 1:], reduction="sum")
            nll_sum += float(nll)
            n_pred += chunk.shape[1] - 1
    mean_hidden = (hidden_sum / len(ids)).float()
    return mean_hidden, (nll_sum / n_pred if n_pred else 0.0)


class MemoryConsolidator:
    def __init__(
        self,
        episodic: EpisodicMemory,
        semantic: SemanticMemory,
        *,
        model=None,
        embed_fn=None,
        surprise_fn=None,
        decode_fn=None,
        surprise_scale: float | None = None,
        threshold: float = 0.5,
        duplicate_threshold: float = 0.95,
        weights: tuple[float, float, float] = (0.4, 0.2, 0.4),
        half_life_s: float = 3600.0,
        interval_s: float = 60.0,
    ):
        if model is None and (embed_fn is None or surprise_fn is None):
            raise ValueError("pass model=, or both embed_fn= and surprise_fn=")
        if decode_fn is None:
            raise ValueError(
                "decode_fn (tokens -> text) is required: semantic memory stores text"
            )
        if model is not None and model.config.d_model != semantic.dimension:
            raise ValueError(
                f"model d_model {model.config.d_model} != semantic memory dimension "
                f"{semantic.dimension}"
            )
        if surprise_scale is None:
            if model is None:
                raise ValueError("surprise_scale is required without a model")
            surprise_scale = math.log(model.config.vocab_size)
        if model is not None:
            embed_fn = embed_fn or (lambda t: model_embed_and_surprise(model, t)[0])
            surprise_fn = surprise_fn or (
                lambda t: model_embed_and_surprise(model, t)[1]
            )
        self.episodic, self.semantic, self.model = episodic, semantic, model
        self.embed_fn, self.surprise_fn, self.decode_fn = (
            embed_fn,
            surprise_fn,
            decode_fn,
        )
        self.surprise_scale = surprise_scale
        self.threshold = threshold
        self.duplicate_threshold = duplicate_threshold
        self.weights = weights
        self.half_life_s = half_life_s
        self.interval_s = interval_s
        self._surprise: dict[int, float] = (
            {}
        )  # episodic id -> NLL (tokens never change)
        self._pass_lock = threading.Lock()  # one pass at a time (thread + manual)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.passes = 0

    # -- scoring --------------------------------------------------------------------

    def surprise(self, entry: EpisodicEntry) -> float:
        if entry.id not in self._surprise:
            self._surprise[entry.id] = float(self.surprise_fn(entry.tokens))
        return self._surprise[entry.id]

    def importance(self, entry: EpisodicEntry, now: float | None = None) -> float:
        now = time.time() if now is None else now
        w_access, w_recency, w_surprise = self.weights
        a = entry.access_count
        age = max(now - entry.created, 0.0)
        s = min(self.surprise(entry) / self.surprise_scale, 1.0)
        return (
            w_access * a / (a + 1)
            + w_recency * 0.5 ** (age / self.half_life_s)
            + w_surprise * s
        )

    # -- one pass -------------------------------------------------------------------

    def consolidate_once(self) -> ConsolidationReport:
        with self._pass_lock:
            report = ConsolidationReport()
            now = time.time()
            scored = [(self.importance(e, now), e) for e in self.episodic.entries()]
            scored.sort(key=lambda t: -t[0])
            for imp, e in scored:
                report.importance[e.id] = imp
                if imp < self.threshold:
                    report.kept.append(e.id)
                    continue
                self._move(e, imp, report)
            alive = {e.id for e in self.episodic.entries()}
            self._surprise = {k: v for k, v in self._surprise.items() if k in alive}
            self.passes += 1
            return report

    def _move(self, e: EpisodicEntry, imp: float, report: ConsolidationReport):
        emb = torch.as_tensor(self.embed_fn(e.tokens)).detach().float().cpu().numpy()
        nearest = self.semantic.search(emb, 1)[0]
        if len(nearest.ids) and nearest.scores[0] > self.duplicate_threshold:
            sid = int(nearest.ids[0])
            old = nearest.metadata[0]
            self.semantic.update_metadata(
                sid,
                dict(
                    merge_count=old.get("merge_count", 0) + 1,
                    last_merged=time.time(),
                    episodic_ids=old.get("episodic_ids", []) + [e.id],
                    importance=max(old.get("importance", 0.0), imp),
                ),
            )
            report.merged[e.id] = sid
        else:
            meta = dict(
                e.metadata,
                episodic_ids=[e.id],
                importance=imp,
                surprise=self._surprise.get(e.id),
                access_count=e.access_count,
            )
            self.semantic.add(emb, self.decode_fn(e.tokens), meta)
            report.moved.append(e.id)
        self.episodic.remove([e.id])

    # -- background thread ----------------------------------------------------------

    def _run(self):
        try:
            while not self._stop.wait(self.interval_s):
                self.consolidate_once()
        except BaseException as exc:  # re-raised by stop(); the thread must not vanish
            log.exception("background consolidation stopped by an error")
            self.error = exc

    def start(self) -> "MemoryConsolidator":
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("consolidator already running")
        self._stop.clear()
        self.error = None
        self._thread = threading.Thread(
            target=self._run, name="hmst-consolidator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Signal the thread, wait for the pass in progress to finish, re-raise any
        error it hit."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"consolidator still in a pass after {timeout} s")
        self._thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError("background consolidation failed") from err

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
