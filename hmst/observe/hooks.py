"""Typed observation events for generation and the inference engine.

An `Observer` overrides the events it wants; every event is a no-op by default. The
generation loop holds an `Emitter` only when the mode is not ``off`` or an observer is
registered, so the ``off`` path does no work at all: each emission point is guarded by
one ``if emitter is not None`` check, and no module hooks exist.

Modes:
    off         nothing recorded (the default)
    summary     per-token logit summaries and per-layer routing (chosen experts, gates)
    diagnostic  summary + per-component timing (attention, experts, ...) and NaN/Inf
                checks on every component output

Events (arguments are plain Python values or small CPU tensors, never the model's own
buffers):
    generation_begin(info)      prompt ids, sampling parameters, mode
    step(record)                one generated token: logit summary (see trace.py)
    routing(step, layer, routing)  routing: experts (N, K), gates (N, K), entropy (N,)
                                of the router, overridden (N,) bool or None
    controller_decision(decision)
    memory_retrieval(event)     source, requested k, valid hits, ids, scores, texts
    critic_verdict(event)       score, threshold, action
    early_exit(step, layer)
    timing(component, seconds)
    anomaly(component, message) a NaN/Inf seen in diagnostic mode
    generation_end(info)        generated ids, finish reason, timings
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable

MODES = ("off", "summary", "diagnostic")
EVENTS = (
    "generation_begin",
    "step",
    "routing",
    "controller_decision",
    "memory_retrieval",
    "critic_verdict",
    "early_exit",
    "timing",
    "anomaly",
    "generation_end",
)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown observe mode {mode!r}: expected one of {MODES}")
    return mode


class Observer:
    """Override any of the `on_<event>` methods; the rest stay no-ops."""

    def on_generation_begin(self, info: dict) -> None: ...

    def on_step(self, record: dict) -> None: ...

    def on_routing(self, step: int, layer: int, routing: dict) -> None: ...

    def on_controller_decision(self, decision: dict) -> None: ...

    def on_memory_retrieval(self, event: dict) -> None: ...

    def on_critic_verdict(self, event: dict) -> None: ...

    def on_early_exit(self, step: int, layer: int) -> None: ...

    def on_timing(self, component: str, seconds: float) -> None: ...

    def on_anomaly(self, component: str, message: str) -> None: ...

    def on_generation_end(self, info: dict) -> None: ...


class Emitter:
    """Fans events out to observers. An observer that raises is reported once on
    stderr and then skipped for the rest of the emitter's life: a broken hook never
    breaks generation."""

    def __init__(self, observers: Iterable[Observer], mode: str = "summary"):
        self.mode = check_mode(mode)
        self.observers = list(observers)
        self.failed: dict[int, str] = {}

    @property
    def diagnostic(self) -> bool:
        return self.mode == "diagnostic"

    def emit(self, event: str, *args) -> None:
        name = "on_" + event
        for obs in self.observers:
            if id(obs) in self.failed:
                continue
            try:
                getattr(obs, name)(*args)
            except Exception as e:  # noqa: BLE001 - isolate user hooks, report once
                msg = f"{type(obs).__name__}.{name} raised {type(e).__name__}: {e}"
                self.failed[id(obs)] = msg
                print(f"hmst: observer disabled: {msg}", file=sys.stderr)


class ObserverRegistry:
    """Observers attached to a model or engine; `scoped()` keeps them to a block."""

    def __init__(self):
        self._observers: list[Observer] = []

    def register(self, observer: Observer) -> Observer:
        if not isinstance(observer, Observer):
            raise TypeError(f"expected an hmst.observe.Observer, got {type(observer)}")
        self._observers.append(observer)
        return observer

    def unregister(self, observer: Observer) -> None:
        self._observers = [o for o in self._observers if o is not observer]

    @contextlib.contextmanager
    def scoped(self, *observers: Observer):
        """`with registry.scoped(obs): ...` registers for the block only."""
        for o in observers:
            self.register(o)
        try:
            yield observers[0] if len(observers) == 1 else observers
        finally:
            for o in observers:
                self.unregister(o)

    def emitter(
        self, mode: str = "off", extra: Iterable[Observer] = ()
    ) -> Emitter | None:
        """None (nothing to do) when the mode is off and no observer is registered."""
        check_mode(mode)
        observers = [*self._observers, *extra]
        if mode == "off" and not observers:
            return None
        return Emitter(observers, "summary" if mode == "off" else mode)

    def __len__(self) -> int:
        return len(self._observers)
