"""What an observed generation records inside the model, and nothing when unobserved.

`ModelTap(model, emitter)` is a context manager made only when an `Emitter` exists.
Routing: the decode path (`hmst.generation.fast_forward`) calls `tap.route(...)` with
the router logits and the experts and gates it used, behind one `if tap is not None`
check, so the recorded choice is by construction the one the layer used (with the
controller's expert bias too). With `hook_routers=True` (the model's own forward, the
reference path) a forward hook on each router records the same. In diagnostic mode,
attention and expert modules get pre/post hooks that time them and check their
outputs for NaN/Inf. `flush(step)` turns what was recorded since the last call into
`routing` events (one per layer); on exit every hook is removed.

Shape legend: N routed tokens, E experts, K experts per token.
"""

from __future__ import annotations

import time
from collections import defaultdict
from functools import partial

import torch
import torch.nn.functional as F

from hmst.observe.hooks import Emitter


class ModelTap:
    def __init__(self, model, emitter: Emitter, hook_routers: bool = False):
        self.model, self.emitter, self.hook_routers = model, emitter, hook_routers
        self.pending: list[tuple] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self._t0: dict[int, float] = {}
        self._handles = []

    def __enter__(self):
        for i, block in enumerate(self.model.layers):
            if self.hook_routers:
                hook = partial(self._router_hook, i)
                self._handles.append(block.moe.router.register_forward_hook(hook))
            if self.emitter.diagnostic:
                mods = [("attention", block.attn)]
                mods += [("experts", e) for e in block.moe.experts]
                for name, mod in mods:
                    self._handles.append(mod.register_forward_pre_hook(self._start))
                    self._handles.append(
                        mod.register_forward_hook(partial(self._stop, name, i))
                    )
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.emitter.diagnostic:
            for name, s in self.seconds.items():
                self.emitter.emit("timing", name, s)
        return False

    def route(self, layer: int, logits_NE, experts_NK, gates_NK, bias_E=None) -> None:
        """Record one layer's routing (cheap: references only; summarised at flush)."""
        self.pending.append((layer, logits_NE, experts_NK, gates_NK, bias_E))

    def _router_hook(self, layer, router, inputs, out):
        logits = F.linear(inputs[0].float(), router.gate.weight.float())
        bias = inputs[1] if len(inputs) > 1 else None
        self.route(layer, logits, out.topk_idx_TK, out.gates_TK, bias)

    def _start(self, mod, inputs):
        self._t0[id(mod)] = time.perf_counter()

    def _stop(self, name, layer, mod, inputs, out):
        self.seconds[name] += time.perf_counter() - self._t0.pop(id(mod))
        y = out[0] if isinstance(out, tuple) else out
        if not torch.isfinite(y).all():
            bad = (~torch.isfinite(y)).sum().item()
            self.emitter.emit("anomaly", f"layers[{layer}].{name}", f"{bad} non-finite")

    def flush(self, step: int) -> None:
        """Emit the routing recorded since the last flush as events of `step`."""
        kept, self.pending = self.pending, []
        for layer, logits_NE, experts_NK, gates_NK, bias_E in kept:
            logp_NE = logits_NE.float().log_softmax(-1)
            overridden = None
            if bias_E is not None:  # would the router alone have chosen the same?
                k = experts_NK.shape[1]
                own_NE = logits_NE + self.model.layers[layer].moe.router.balance_bias
                own_NK = own_NE.topk(k, dim=-1).indices.sort(-1).values
                overridden = (own_NK != experts_NK.sort(-1).values).any(-1).cpu()
            routing = {
                "experts": experts_NK.cpu(),
                "gates": gates_NK.float().cpu(),
                "entropy": -(logp_NE.exp() * logp_NE).sum(-1).cpu(),
                "overridden": overridden,
            }
            self.emitter.emit("routing", step, layer, routing)
