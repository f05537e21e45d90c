"""Transformer building blocks: RoPE, causal attention with a KV cache, SwiGLU.

Shape legend: B batch, T new tokens, S cached + new tokens, H query heads,
Hkv key/value heads, Dh head dim, D d_model, F expert hidden width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hmst.configs.model_config import ModelConfig


def rope_tables(
    max_seq_len: int, head_dim: int, theta: float
) -> tuple[torch.Tensor, ...]:
    """cos/sin tables (max_seq_len, head_dim), rotate-half layout (as Llama/Mixtral)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    )
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (L, Dh/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, Dh)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh); cos/sin (T, Dh) or (B, 1, T, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def rope_matrix(cos_Dh: torch.Tensor, sin_Dh: torch.Tensor) -> torch.Tensor:
    """The (Dh, Dh) matrix R of one position's rotation: x @ R == apply_rope(x). A
    decode step (one position) builds it once and every layer's q and k take one
    matmul instead of six elementwise ops each (the sums add exact zeros)."""
    eye = torch.eye(cos_Dh.shape[-1], dtype=cos_Dh.dtype, device=cos_Dh.device)
    return apply_rope(eye, cos_Dh, sin_Dh)


class KVCache(nn.Module):
    """Preallocated per-layer key/value cache (gpt-fast shape).

    `update(pos, k, v)` writes the new keys/values at positions [pos, pos + T) and
    returns the valid prefix [0, pos + T) of the cache.
    """

    def __init__(
        self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device=None
    ):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor):
        end = pos + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(
                f"KV cache overflow: position {end} > capacity {self.max_seq_len}"
            )
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Causal self-attention. `qkv`: None, or a callable computing the three
    projections at once (x -> (..., (H + 2 Hkv) Dh)), set by `prepare_for_inference`
    over a fused copy of the same weights (not a submodule: the state dict is
    unchanged)."""

    qkv = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.n_heads,
            cfg.kv_heads,
            cfg.head_dim,
        )
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self,
        x,
        cos,
        sin,
        cache: KVCache | None = None,
        pos: int = 0,
        mask=None,
        rot: torch.Tensor | None = None,
        kv_fn=None,
    ):
        """`rot` (Dh, Dh): `rope_matrix` of the position, for one new token (T = 1);
        replaces cos/sin. `kv_fn`: None, or (k, v) -> (k, v) applied to the projected
        keys/values (B, T, Hkv Dh) before RoPE (early exit's learned K/V fill)."""
        B, T, _ = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv is not None:
            q, k, v = self.qkv(x).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if kv_fn is not None:
            k, v = kv_fn(k, v)
        q = q.view(B, T, H, Dh).transpose(1, 2)
        k = k.view(B, T, Hkv, Dh).transpose(1, 2)
        v = v.view(B, T, Hkv, Dh).transpose(1, 2)
        if rot is not None:
            q, k = q @ rot, k @ rot
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, Hkv, S, Dh)
        # Causal: a fresh sequence uses is_causal; new tokens after a cached prefix need
        # an explicit mask, unless it is one token (which may see everything cached).
        is_causal = mask is None and k.shape[2] == T and T > 1
        if mask is None and not is_causal and T > 1:
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """silu(x W1) * (x W3) W2, with W1 and W3 fused into one matmul (`w13`).
    `one_row`: None, or a callable for exactly one token (x of D elements) set by
    `prepare_for_inference` (the native kernel: both matmuls in one call)."""

    one_row = None

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        if self.one_row is not None and x.numel() == x.shape[-1]:
            return self.one_row(x)
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)
