"""Training audit: routing statistics every step, representation probes every N steps.

`RoutingStats` sums each step's router statistics on the device (no host sync), and
reduces them once, when a metrics record is written: tokens per expert, load
imbalance (max/mean), dead experts (no token in the whole window), router entropy,
load-balance and z losses.

`ProbeAudit` runs a fixed probe batch through the model every N steps with forward hooks
on modules addressed by paths such as ``layers[-1].moe`` (registered for the probe only,
so training itself carries no hooks): activation statistics of those modules, and how
stable routing is between audits (top-1 agreement and top-k Jaccard per layer).

Shape legend: L layers, E experts, T probe tokens, K experts per token.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

_PART = re.compile(r"^([A-Za-z_]\w*)((?:\[-?\d+\])*)$")


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """`layers[-1].moe` -> model.layers[-1].moe; a clear ValueError on a bad path."""
    mod = model
    for part in path.split("."):
        m = _PART.match(part)
        if m is None:
            raise ValueError(f"bad module path {path!r}: cannot parse {part!r}")
        name, indices = m.group(1), re.findall(r"-?\d+", m.group(2))
        if not hasattr(mod, name):
            raise ValueError(f"bad module path {path!r}: no attribute {name!r}")
        mod = getattr(mod, name)
        for i in indices:
            try:
                mod = mod[int(i)]
            except (IndexError, TypeError) as e:
                raise ValueError(f"bad module path {path!r}: {part!r}: {e}") from None
    if not isinstance(mod, nn.Module):
        raise ValueError(f"module path {path!r} names a {type(mod).__name__}")
    return mod


class RoutingStats:
    """Router statistics summed over the optimizer steps of one logging window."""

    def __init__(self, n_layers: int, n_experts: int, device):
        self.counts_LE = torch.zeros(n_layers, n_experts, device=device)
        self.entropy_L = torch.zeros(n_layers, device=device)
        self.losses_2 = torch.zeros(2, device=device)  # load-balance, z
        self.steps = 0

    @torch.no_grad()
    def update(self, counts_LE, entropy_L, lb_loss, z_loss) -> None:
        self.counts_LE += counts_LE
        self.entropy_L += entropy_L.detach()
        self.losses_2 += torch.stack([lb_loss.detach(), z_loss.detach()]).float()
        self.steps += 1

    def summary(self) -> dict:
        """Reduce the window (one host transfer) and start a new one."""
        n = max(self.steps, 1)
        counts = self.counts_LE.to("cpu", copy=True)  # .cpu() aliases on CPU
        entropy = (self.entropy_L / n).tolist()
        lb, z = (self.losses_2 / n).tolist()
        self.counts_LE.zero_(), self.entropy_L.zero_(), self.losses_2.zero_()
        self.steps = 0
        ratio = (counts.max(1).values / counts.mean(1).clamp(min=1e-9)).tolist()
        return {
            "load_balance_loss": lb,
            "router_z_loss": z,
            "expert_tokens": counts.long().tolist(),
            "expert_load_max_over_mean": max(ratio),
            "expert_load_max_over_mean_per_layer": ratio,
            "dead_experts": (counts == 0).sum(1).tolist(),
            "router_entropy": entropy,
        }


class ProbeAudit:
    """Every `every` steps: activation statistics of chosen modules and routing
    stability, on a fixed probe batch. Run on one rank with the unwrapped model."""

    def __init__(self, model: nn.Module, probe_ids: torch.Tensor, paths: list[str]):
        self.probe_ids = probe_ids
        self.paths = list(paths)
        for p in self.paths:  # fail at start-up, not after an hour of training
            resolve_module(model, p)
        self.prev_topk: list[torch.Tensor] | None = None

    @torch.no_grad()
    def run(self, model: nn.Module) -> dict:
        acts, topk = {}, []
        handles = []

        def keep_activation(path):
            def hook(_mod, _inp, out):
                acts[path] = out[0] if isinstance(out, tuple) else out

            return hook

        for p in self.paths:
            handles.append(
                resolve_module(model, p).register_forward_hook(keep_activation(p))
            )
        for block in model.layers:
            handles.append(
                block.moe.router.register_forward_hook(
                    lambda _m, _i, out: topk.append(out.topk_idx_TK)
                )
            )
        was_training = model.training
        model.eval()
        try:
            model(self.probe_ids.to(model.embed.weight.device))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        rec = {"activations": {p: activation_stats(a) for p, a in acts.items()}}
        if self.prev_topk is not None:
            rec["routing_top1_agreement"] = [
                (a[:, 0] == b[:, 0]).float().mean().item()
                for a, b in zip(topk, self.prev_topk)
            ]
            rec["routing_topk_jaccard"] = [
                topk_jaccard(a, b) for a, b in zip(topk, self.prev_topk)
            ]
        self.prev_topk = topk
        return rec


def activation_stats(x: torch.Tensor) -> dict:
    x = x.detach().float()
    finite = torch.isfinite(x)
    xf = torch.where(finite, x, torch.zeros_like(x))
    return {
        "mean": xf.mean().item(),
        "std": xf.std().item(),
        "rms": xf.square().mean().sqrt().item(),
        "abs_max": xf.abs().max().item(),
        "nonfinite_fraction": 1.0 - finite.float().mean().item(),
    }


def topk_jaccard(a_TK: torch.Tensor, b_TK: torch.Tensor) -> float:
    """Mean over tokens of |A & B| / |A | B| for the chosen expert sets."""
    n_experts = int(max(a_TK.max(), b_TK.max())) + 1
    a = torch.zeros(a_TK.shape[0], n_experts, dtype=torch.bool)
    b = torch.zeros_like(a)
    a.scatter_(1, a_TK.cpu(), True)
    b.scatter_(1, b_TK.cpu(), True)
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return (inter / union).mean().item()
