"""Sparse mixture of SwiGLU experts with top-k routing.

Shape legend: T tokens (batch flattened), D d_model, E experts, K experts per token,
A = T*K token-expert assignments.

Dispatch (`grouped_experts`): the A assignments are sorted by expert, the token rows
gathered once, each expert runs one matmul pair on its contiguous slice, and the results
are un-permuted and combined with the gate weights by one batched matmul. The only host
sync is one `tolist()` of the E counts per layer. `reference_experts` is the per-token
loop that defines the result (tests check both agree in outputs and gradients).

Router runs in fp32. Losses follow Switch (load balance: E * sum_e f_e * P_e, equal to 1
at perfect balance) and ST-MoE (z-loss: mean logsumexp(logits)^2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hmst.configs.model_config import ModelConfig
from hmst.models.layers import SwiGLU


class RouterOutput(NamedTuple):
    topk_idx_TK: torch.Tensor  # chosen experts, long
    gates_TK: torch.Tensor  # top-k probabilities renormalised to sum to gate_scale
    probs_mean_E: torch.Tensor  # mean router probability per expert (differentiable)
    counts_E: torch.Tensor  # assignments per expert (long, no grad)
    z_loss: torch.Tensor  # scalar
    entropy: torch.Tensor | None = None  # mean per-token router entropy (nats), no grad


def load_balance_loss(
    counts_E: torch.Tensor, probs_mean_E: torch.Tensor
) -> torch.Tensor:
    """Switch load-balancing loss E * sum_e f_e * P_e, with f_e the fraction of the
    token-expert assignments routed to e (so 1.0 means perfectly balanced)."""
    f_E = counts_E.float() / counts_E.sum().clamp(min=1)
    return probs_mean_E.numel() * (f_E * probs_mean_E).sum()


def select_experts(router: "Router", x_TD: torch.Tensor, expert_bias_E=None):
    """The routing decision, shared by every forward path (training, decoding, early
    exit): fp32 logits (T, E) and probabilities, the top-k experts by logits plus the
    router's balance bias (plus `expert_bias_E`, e.g. the meta-controller's preference,
    in log space), and the chosen experts' probabilities renormalised to sum to 1,
    times `router.gate_scale`.
    The biases decide which experts run, never how much each counts."""
    logits_TE = F.linear(x_TD.float(), router.gate.weight.float())
    probs_TE = logits_TE.softmax(dim=-1)
    select_TE = logits_TE + router.balance_bias if router.balanced else logits_TE
    if expert_bias_E is not None:
        select_TE = select_TE + expert_bias_E
    topk_idx_TK = select_TE.topk(router.top_k, dim=-1).indices
    gates_TK = probs_TE.gather(1, topk_idx_TK)
    gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
    if router.gate_scale != 1.0:
        gates_TK = gates_TK * router.gate_scale
    return logits_TE, probs_TE, topk_idx_TK, gates_TK


class Router(nn.Module):
    """Linear gate over the experts. `balance_bias` (E,), fp32: the auxiliary-loss-free
    balancing bias (DeepSeek-V3), moved by `update_balance_bias` after each training
    step; zeros and not saved when the model does not use it (`balance_bias_rate` 0)."""

    def __init__(
        self, d_model: int, n_experts: int, top_k: int, balance=False, gate_scale=1.0
    ):
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.n_experts, self.top_k, self.balanced = n_experts, top_k, balance
        self.gate_scale = gate_scale
        self.register_buffer("balance_bias", torch.zeros(n_experts), persistent=balance)

    def forward(self, x_TD: torch.Tensor, expert_bias_E: torch.Tensor | None = None):
        logits_TE, probs_TE, topk_idx_TK, gates_TK = select_experts(
            self, x_TD, expert_bias_E
        )
        counts_E = torch.bincount(topk_idx_TK.flatten(), minlength=self.n_experts)
        lse_T = torch.logsumexp(logits_TE, dim=-1)
        z_loss = lse_T.square().mean()
        with torch.no_grad():  # H = lse - sum_e p_e * logit_e
            entropy = (lse_T - (probs_TE * logits_TE).sum(-1)).mean()
        return RouterOutput(
            topk_idx_TK, gates_TK, probs_TE.mean(0), counts_E, z_loss, entropy
        )


@torch.no_grad()
def update_balance_bias(routers, counts_LE: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free load balancing (Wang et al. 2024, DeepSeek-V3): after a
    training step, each layer's bias of an expert that got more than the mean share of
    that step's assignments (`counts_LE`, summed over the global batch) goes down by
    `rate`, one that got less goes up; biases are kept centred (top-k is unchanged by a
    common shift)."""
    for router, c_E in zip(routers, counts_LE.float()):
        b = router.balance_bias
        b.add_(rate * torch.sign(c_E.mean() - c_E).to(b))
        b.sub_(b.mean())


def grouped_experts(x_TD, topk_idx_TK, gates_TK, counts_E, experts: nn.ModuleList):
    """Vectorised dispatch: sort assignments by expert, one matmul pair per slice.

    Every expert is called, on an empty slice if it got no tokens, so that all expert
    parameters join the autograd graph (DDP needs that) and no rank skips work.
    """
    T, K = topk_idx_TK.shape
    order_A = topk_idx_TK.flatten().argsort(stable=True)
    x_AD = x_TD.index_select(0, order_A // K)
    chunks = x_AD.split(counts_E.tolist())  # the single host sync of the layer
    # Training runs every expert (DDP needs all in the graph); inference skips idle.
    run_all = torch.is_grad_enabled()
    y_AD = torch.cat([e(c) for e, c in zip(experts, chunks) if run_all or c.shape[0]])
    inverse_A = torch.empty_like(order_A)
    inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
    y_TKD = y_AD.index_select(0, inverse_A).view(T, K, -1)
    # (T, 1, K) @ (T, K, D): the gate-weighted sum over each token's K experts.
    return torch.bmm(gates_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)


def reference_experts(x_TD, topk_idx_TK, gates_TK, counts_E, experts: nn.ModuleList):
    """The specification: every token, every chosen expert, one at a time."""
    rows = []
    for t in range(x_TD.shape[0]):
        acc = 0
        for k in range(topk_idx_TK.shape[1]):
            e = int(topk_idx_TK[t, k])
            acc = acc + gates_TK[t, k].to(x_TD.dtype) * experts[e](x_TD[t : t + 1])[0]
        rows.append(acc)
    return torch.stack(rows)


class MoE(nn.Module):
    """Router + routed SwiGLU experts. Returns the output and the router stats."""

    dispatch = staticmethod(grouped_experts)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(
            cfg.d_model,
            cfg.n_experts,
            cfg.num_experts_per_tok,
            balance=getattr(cfg, "balance_bias_rate", 0.0) > 0,
            gate_scale=getattr(cfg, "gate_scale", 1.0),
        )
        self.experts = nn.ModuleList(
            SwiGLU(cfg.d_model, cfg.d_ff) for _ in range(cfg.n_experts)
        )

    def forward(self, x_BTD: torch.Tensor, expert_bias_E: torch.Tensor | None = None):
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        r = self.router(x_TD, expert_bias_E)
        y_TD = self.dispatch(x_TD, r.topk_idx_TK, r.gates_TK, r.counts_E, self.experts)
        return y_TD.view(B, T, D), r
