"""EpisodicMemorySSM: a stack of Mamba-1 blocks that compresses a context into a state.

Glossary (Mamba paper symbols, as in mamba-minimal):
    d_model   width of the token stream (the transformer's d_model)
    d_inner   expand * d_model, width inside a block
    d_state   N, state size per channel
    dt_rank   rank of the delta projection, ceil(d_model / 16)
    d_conv    width of the causal depthwise convolution
    A_log     log(-A): A = -exp(A_log) (d_inner, N) keeps every decay in (0, 1]
    D         skip connection (d_inner,)
    delta     softplus(dt_proj(dt)): input-dependent step size (B, L, d_inner)
    B, C      input-dependent input/output matrices (B, L, N)
Shape legend: B batch, L tokens, Dm d_model, Di d_inner, N d_state, K d_conv.

Block: x + out_proj(scan(silu(conv(in_x)), delta, A, B, C, D) * silu(z)), where
(in_x, z) = in_proj(RMSNorm(x)). The stack ends with an RMSNorm.

State. `forward(x, return_state=True)` returns `(y (B, L, Dm), state (B, N))`. The
summary `state` is the mean over the d_inner channels of the LAST block's final SSM
state h_L (B, Di, N): parameter-free, so it means the same thing in every checkpoint,
and O(1) in the context length. The full recurrent cache (every block's conv window
and SSM state) is an `SSMCache`: pass `cache=` to `forward` to start from it and
update it (prefill in pieces), or drive `step()` token by token from
`allocate_inference_cache(batch)`. `summary(cache)` gives the same (B, N) summary.

Backends: the scan runs through `hmst.kernels.scan.selective_scan` ("auto": mamba_ssm's
CUDA kernel for CUDA tensors without a starting cache, else the exact chunked scan).
On the CUDA kernel the returned `state` carries no gradient (mamba_ssm's backward
ignores the final state); train anything that needs d(state) on the chunked backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hmst.configs.model_config import SSMConfig
from hmst.kernels.scan import selective_scan, selective_state_update


@dataclass
class SSMCache:
    """Recurrent state of every block: O(1) in the number of tokens seen."""

    conv_states: list[torch.Tensor]
    """Per block: the last d_conv - 1 conv inputs (B, Di, K - 1)."""
    ssm_states: list[torch.Tensor]
    """Per block: the SSM state h (B, Di, N), fp32."""
    seqlen_offset: int = 0
    """Tokens consumed so far."""


class MambaBlock(nn.Module):
    def __init__(self, d_model, d_state, expand, d_conv, dt_rank=None, backend="auto"):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state, self.d_conv = d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.backend = backend
        di = self.d_inner
        self.norm = nn.RMSNorm(d_model)
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, bias=True)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        self.out_proj = nn.Linear(di, d_model, bias=False)
        # S4D-real init: A = -(1..N) per channel.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(di, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(di))
        self._init_dt()

    def _init_dt(self, dt_min=1e-3, dt_max=1e-1):
        # Mamba: softplus(bias) starts log-uniform in [dt_min, dt_max], so channels
        # begin with memories from ~10 to ~1000 tokens.
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _ssm_inputs(self, x_BLDi):
        """delta (B, L, Di), B (B, L, N), C (B, L, N) from the conv output."""
        dt, Bm, Cm = self.x_proj(x_BLDi).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        return F.softplus(self.dt_proj(dt)), Bm, Cm

    def forward(self, x_BLD, conv_state=None, ssm_state=None):
        """Returns (x + mixer, new conv_state (B, Di, K - 1), final ssm_state)."""
        xi, z = self.in_proj(self.norm(x_BLD)).chunk(2, dim=-1)
        xi = xi.transpose(1, 2)  # (B, Di, L)
        if conv_state is None:
            conv_state = xi.new_zeros(xi.shape[0], self.d_inner, self.d_conv - 1)
        xpad = torch.cat([conv_state.to(xi.dtype), xi], dim=-1)  # causal: left context
        new_conv_state = xpad[:, :, xpad.shape[-1] - (self.d_conv - 1) :]
        xc = F.silu(self.conv1d(xpad)).transpose(1, 2)  # (B, L, Di)
        delta, Bm, Cm = self._ssm_inputs(xc)
        A = -torch.exp(self.A_log.float())
        y, h = selective_scan(
            xc, delta, A, Bm, Cm, self.D, h0=ssm_state, backend=self.backend
        )
        out = self.out_proj(y.to(z.dtype) * F.silu(z))
        return x_BLD + out, new_conv_state, h

    def step(self, x_BD, conv_state, ssm_state):
        """One token; updates conv_state and ssm_state in place. O(1) in L."""
        xi, z = self.in_proj(self.norm(x_BD)).chunk(2, dim=-1)
        window = torch.cat([conv_state, xi.unsqueeze(-1)], dim=-1)  # (B, Di, K)
        conv_state.copy_(window[:, :, 1:])
        xc = (window * self.conv1d.weight.squeeze(1)).sum(-1) + self.conv1d.bias
        xc = F.silu(xc)
        delta, Bm, Cm = self._ssm_inputs(xc)
        A = -torch.exp(self.A_log.float())
        y, h = selective_state_update(ssm_state, xc, delta, A, Bm, Cm, self.D)
        ssm_state.copy_(h)
        return x_BD + self.out_proj(y.to(z.dtype) * F.silu(z))


class EpisodicMemorySSM(nn.Module):
    """Mamba-1 stack that compresses up to `max_seq_len` tokens per call into a
    (B, d_state) summary; see the module docstring for the state's definition.

    `EpisodicMemorySSM(d_model, d_state, n_blocks, max_seq_len)` as in the design, or
    `EpisodicMemorySSM(d_model, config=cfg.ssm)` from an `SSMConfig`. `backend` picks
    the scan ("auto", "chunked", "ref", "cuda"; see hmst.kernels.scan).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int | None = None,
        n_blocks: int | None = None,
        max_seq_len: int | None = None,
        *,
        expand: int | None = None,
        d_conv: int | None = None,
        dt_rank: int | None = None,
        backend: str = "auto",
        config: SSMConfig | None = None,
    ):
        super().__init__()
        given = dict(
            d_state=d_state,
            n_blocks=n_blocks,
            max_seq_len=max_seq_len,
            expand=expand,
            d_conv=d_conv,
        )
        if config is not None and any(v is not None for v in given.values()):
            raise ValueError("pass either a config or keyword arguments, not both")
        if config is None:
            config = SSMConfig(**{k: v for k, v in given.items() if v is not None})
        if config.d_conv < 2:
            raise ValueError(f"d_conv must be >= 2, got {config.d_conv}")
        self.config = config
        self.d_model, self.d_state = d_model, config.d_state
        self.max_seq_len = config.max_seq_len
        self.blocks = nn.ModuleList(
            MambaBlock(
                d_model, config.d_state, config.expand, config.d_conv, dt_rank, backend
            )
            for _ in range(config.n_blocks)
        )
        self.norm_f = nn.RMSNorm(d_model)
        self.d_inner = self.blocks[0].d_inner

    def allocate_inference_cache(self, batch_size: int, dtype=None) -> SSMCache:
        p = self.blocks[0].in_proj.weight
        k = self.config.d_conv - 1
        conv = [
            p.new_zeros(batch_size, self.d_inner, k, dtype=dtype or p.dtype)
            for _ in self.blocks
        ]
        ssm = [
            p.new_zeros(batch_size, self.d_inner, self.d_state, dtype=torch.float32)
            for _ in self.blocks
        ]
        return SSMCache(conv, ssm, 0)

    @staticmethod
    def summary(cache: SSMCache) -> torch.Tensor:
        """(B, N): mean over channels of the last block's SSM state."""
        return cache.ssm_states[-1].mean(dim=1)

    def forward(
        self,
        x_BLD: torch.Tensor,
        return_state: bool = True,
        cache: SSMCache | None = None,
    ):
        """x (B, L, d_model) -> (y (B, L, d_model), state (B, d_state)), or y alone
        when return_state is False. With `cache`, start from it and update it in
        place (the tokens continue the cached sequence)."""
        L = x_BLD.shape[1]
        if L > self.max_seq_len:
            raise ValueError(
                f"sequence length {L} exceeds max_seq_len {self.max_seq_len}"
            )
        x, states = x_BLD, []
        for i, block in enumerate(self.blocks):
            conv0 = cache.conv_states[i] if cache is not None else None
            h0 = cache.ssm_states[i] if cache is not None else None
            x, conv, h = block(x, conv0, h0)
            states.append(h)
            if cache is not None:
                cache.conv_states[i] = conv.detach().clone()
                cache.ssm_states[i] = h.detach().clone()
        if cache is not None:
            cache.seqlen_offset += L
        y = self.norm_f(x)
        if not return_state:
            return y
        return y, states[-1].mean(dim=1)

    @torch.no_grad()
    def step(self, x_BD: torch.Tensor, cache: SSMCache):
        """One token for every sequence: x (B, d_model) -> (y (B, d_model),
        state (B, d_state)); `cache` is updated in place."""
        x = x_BD
        for i, block in enumerate(self.blocks):
            x = block.step(x, cache.conv_states[i], cache.ssm_states[i])
        cache.seqlen_offset += 1
        return self.norm_f(x), self.summary(cache)
