"""Module hooks on a BaseMoEModel, installed only for an observed generation.

`ModelTap(model, emitter)` is a context manager. Inside it, every router's forward is
seen by a hook that keeps the experts and gate weights the layer actually used, and
whether an expert bias (the meta-controller's preference) changed the choice. In
diagnostic mode, attention and MoE modules are also timed (pre/post hooks) and their
outputs checked for NaN/Inf. The generation loop calls `flush(step)` after each forward
to turn what was kept into `routing` events. On exit every hook is removed, so an
unobserved call carries none.
"""

from __future__ import annotations

import time
from collections import defaultdict
from functools import partial

import torch
import torch.nn.functional as F

from hmst.observe.hooks import Emitter


class ModelTap:
    def __init__(self, model, emitter: Emitter):
        self.model, self.emitter = model, emitter
        self.pending: list[tuple] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self._t0: dict[int, float] = {}
        self._handles = []

    def __enter__(self):
        for i, block in enumerate(self.model.layers):
            router = block.moe.router
            self._handles.append(router.register_forward_hook(partial(self._route, i)))
        if self.emitter.diagnostic:
            for i, block in enumerate(self.model.layers):
                for name, mod in (("attention", block.attn), ("moe", block.moe)):
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

    def _route(self, layer, router, inputs, out):
        x_TD = inputs[0]
        bias = inputs[1] if len(inputs) > 1 else None
        logits_TE = F.linear(x_TD.float(), router.gate.weight.float())
        logp_TE = logits_TE.log_softmax(-1)
        routing = {
            "experts": out.topk_idx_TK.cpu(),
            "gates": out.gates_TK.float().cpu(),
            "entropy": -(logp_TE.exp() * logp_TE).sum(-1).cpu(),
            "overridden": None,
        }
        if bias is not None:  # what the router alone would have chosen
            own_TK = logits_TE.topk(router.top_k, dim=-1).indices.sort(-1).values
            chosen_TK = out.topk_idx_TK.sort(-1).values
            routing["overridden"] = (own_TK != chosen_TK).any(-1).cpu()
        self.pending.append((layer, routing))

    def _start(self, mod, inputs):
        self._t0[id(mod)] = time.perf_counter()

    def _stop(self, name, layer, mod, inputs, out):
        self.seconds[name] += time.perf_counter() - self._t0.pop(id(mod))
        y = out[0] if isinstance(out, tuple) else out
        if not torch.isfinite(y).all():
            bad = (~torch.isfinite(y)).sum().item()
            self.emitter.emit("anomaly", f"layers[{layer}].{name}", f"{bad} non-finite")

    def flush(self, step: int) -> list[tuple]:
        """Emit the routing kept since the last flush as events of `step`."""
        kept, self.pending = self.pending, []
        for layer, routing in kept:
            self.emitter.emit("routing", step, layer, routing)
        return kept
