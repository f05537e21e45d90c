"""BaseMoEModel: embedding -> N x (attention + sparse MoE) -> RMSNorm -> tied head.

Shape legend: B batch, T tokens, D d_model, V vocab, L layers, E experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hmst.configs.model_config import ModelConfig
from hmst.models.layers import Attention, KVCache, rope_tables
from hmst.models.moe import MoE, load_balance_loss, update_balance_bias
from hmst.models.loss import linear_cross_entropy


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.moe_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.moe = MoE(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache=None, pos=0, mask=None, expert_bias=None):
        a = self.attn(self.attn_norm(x), cos, sin, cache, pos, mask)
        x = x + self._drop(a)
        y, router = self.moe(self.moe_norm(x), expert_bias)
        return x + self._drop(y), router

    def _drop(self, y):
        """Residual dropout (nanoGPT's: each sublayer's output, in training only)."""
        if self.dropout and self.training:
            return F.dropout(y, self.dropout, training=True)
        return y


class BaseMoEModel(nn.Module):
    """Sparse MoE decoder-only transformer.

    Build from keyword arguments as in the design
    (`BaseMoEModel(vocab_size, d_model, n_layers, n_heads, d_ff, n_experts,
    max_seq_len)`, plus any other `ModelConfig` field) or from a config
    (`BaseMoEModel(config=cfg.model)`).

    `forward(input_ids)` returns a dict with `logits` (B, T, V), `load_balance_loss`,
    `router_z_loss`, `expert_counts` (L, E), `router_probs` (L, E) and
    `router_entropy` (L,: mean per-token entropy of the router); with `targets`
    also `loss` (mean next-token cross-entropy, ignore_index -100) and `aux_loss` (the
    weighted router losses to add to it).
    """

    def __init__(
        self,
        vocab_size=None,
        d_model=None,
        n_layers=None,
        n_heads=None,
        d_ff=None,
        n_experts=None,
        max_seq_len=None,
        *,
        config: ModelConfig | None = None,
        **kwargs,
    ):
        super().__init__()
        if config is None:
            given = dict(
                vocab_size=vocab_size,
                d_model=d_model,
                n_layers=n_layers,
                n_heads=n_heads,
                d_ff=d_ff,
                n_experts=n_experts,
                max_seq_len=max_seq_len,
                **kwargs,
            )
            config = ModelConfig(**{k: v for k, v in given.items() if v is not None})
        elif any(v is not None for v in (vocab_size, d_model, n_layers)) or kwargs:
            raise ValueError("pass either a config or keyword arguments, not both")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self._init_rope()
        self.apply(self._init_weights)
        # GPT-2 style: residual-branch outputs scaled down by depth.
        std_out = config.init_std / math.sqrt(2 * config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, 0.0, std_out)

    def _init_rope(self):
        # Recomputed, never persisted: a loaded checkpoint cannot carry stale tables.
        cos, sin = rope_tables(
            self.config.max_seq_len, self.config.head_dim, self.config.rope_theta
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)

    # -- public API -----------------------------------------------------------------

    def gradient_checkpointing_enable(self, enable: bool = True):
        self.gradient_checkpointing = enable

    def num_params(self, active: bool = False) -> int:
        return self.config.num_params(active=active)

    def allocate_kv_cache(
        self, batch_size: int, max_seq_len: int | None = None, dtype=None
    ):
        """One `KVCache` per layer, on the model's device."""
        p = self.embed.weight
        n = max_seq_len or self.config.max_seq_len
        if n > self.config.max_seq_len:
            raise ValueError(
                f"cache length {n} exceeds max_seq_len {self.config.max_seq_len}"
            )
        c = self.config
        return [
            KVCache(batch_size, n, c.kv_heads, c.head_dim, dtype or p.dtype, p.device)
            for _ in range(c.n_layers)
        ]

    def forward(
        self,
        input_ids,
        targets=None,
        kv_caches=None,
        pos: int = 0,
        attn_mask=None,
        expert_bias=None,
        return_hidden: bool = False,
        last_only: bool = False,
        exit_layer: int | None = None,
        return_logits: bool = True,
    ):
        """input_ids (B, T). `kv_caches` from `allocate_kv_cache`: the T tokens sit at
        positions [pos, pos+T). `attn_mask` (bool, True = attend) broadcastable to
        (B, 1, T, pos+T) overrides the causal mask. `expert_bias` (E,) or (L, E) biases
        expert selection. `exit_layer` i with `targets`: also return `exit_loss`, the
        cross-entropy of the final norm and LM head read at block i's output (the
        early-exit training loss, LayerSkip-style). `return_logits=False` with
        `targets` (the trainers): the loss comes from the fused head + cross-entropy
        (`hmst.models.loss`), which never materialises the logits, and the output has
        no "logits"."""
        B, T = input_ids.shape
        if pos + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence end {pos + T} exceeds max_seq_len {self.config.max_seq_len}"
            )
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        if exit_layer is not None and not 0 <= exit_layer < self.config.n_layers - 1:
            raise ValueError(
                f"exit_layer must be an intermediate block in [0, "
                f"{self.config.n_layers - 2}], got {exit_layer}"
            )
        x = self.embed(input_ids)
        routers, x_exit = [], None
        for i, layer in enumerate(self.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            bias = (
                expert_bias[i]
                if expert_bias is not None and expert_bias.dim() == 2
                else expert_bias
            )
            if self.gradient_checkpointing and self.training:
                x, r = checkpoint(
                    layer, x, cos, sin, cache, pos, attn_mask, bias, use_reentrant=False
                )
            else:
                x, r = layer(x, cos, sin, cache, pos, attn_mask, bias)
            routers.append(r)
            if i == exit_layer:
                x_exit = x
        h = self.norm(x)
        if last_only:  # generation needs only the last position's logits
            h = h[:, -1:]
        head = self.embed.weight if self.config.tie_embeddings else self.lm_head.weight
        fused_loss = targets is not None and not return_logits
        counts = torch.stack([r.counts_E for r in routers])
        probs = torch.stack([r.probs_mean_E for r in routers])
        lb = torch.stack(
            [load_balance_loss(r.counts_E, r.probs_mean_E) for r in routers]
        ).mean()
        z = torch.stack([r.z_loss for r in routers]).mean()
        ent = [r.entropy for r in routers if r.entropy is not None]
        out = dict(
            load_balance_loss=lb,
            router_z_loss=z,
            expert_counts=counts,
            router_probs=probs,
        )
        if not fused_loss:
            out["logits"] = F.linear(h, head)
        if ent:
            out["router_entropy"] = torch.stack(ent)
        if return_hidden:
            out["hidden_states"] = h
        if targets is not None:
            if fused_loss:
                out["loss"] = linear_cross_entropy(h, head, targets)
            else:
                out["loss"] = F.cross_entropy(
                    out["logits"].flatten(0, 1).float(),
                    targets.flatten(),
                    ignore_index=-100,
                )
            out["aux_loss"] = (
                self.config.load_balance_coef * lb + self.config.router_z_coef * z
            )
            if x_exit is not None:
                out["exit_loss"] = linear_cross_entropy(
                    self.norm(x_exit), head, targets
                )
        return out

    def update_balance_bias(self, counts_LE: torch.Tensor) -> None:
        """After an optimizer step: move the routers' balance biases by the step's
        expert counts (L, E), global batch (no-op unless `balance_bias_rate` > 0)."""
        if self.config.balance_bias_rate > 0:
            routers = [layer.moe.router for layer in self.layers]
            update_balance_bias(routers, counts_LE, self.config.balance_bias_rate)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 50, **sampling):
        """HF-style: ids (B, T) in, ids (B, T + new) out. See hmst.generation."""
        from hmst.generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **sampling)

    def save_pretrained(self, path: str, tokenizer=None) -> None:
        """Write `config.json` + `model.safetensors` (+ `tokenizer.json`) atomically."""
        from hmst.checkpoint import save_model_dir

        save_model_dir(path, self, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, path: str, device=None) -> "BaseMoEModel":
        from hmst.checkpoint import load_model

        return load_model(path, device=device)
