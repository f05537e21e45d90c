"""HMSTLM: the MoE transformer with windowed attention, fed by the episodic SSM.

    ids (B, T) -> e = embed(ids) (B, T, D) -> x = e + inject(SSM(e))
               -> N blocks, attention limited to the last `window` tokens -> logits

Attention with window W over N layers carries information at most N * (W - 1) tokens
back; anything older reaches a position only through the SSM's recurrent state (the
episodic memory). Without an SSM (`ssm_config=None`) the model is the same windowed
transformer: the control in bench/bench_passkey.py.

The SSM enters through the embedding module (`MemoryEmbedding` replaces
`base.embed`, keeping the tied weight), so `BaseMoEModel.forward` runs unchanged with
the window as its `attn_mask`. Training/evaluation forward only: incremental decoding
(KV cache + `EpisodicMemorySSM.step`) is not wired yet, and `forward` refuses caches.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hmst.configs.model_config import ModelConfig, SSMConfig
from hmst.models.base_moe import BaseMoEModel
from hmst.models.ssm import EpisodicMemorySSM


def sliding_window_mask(T: int, window: int, device=None) -> torch.Tensor:
    """(1, 1, T, T) bool, True = attend: query i sees key j iff 0 <= i - j < window."""
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]
    return ((diff >= 0) & (diff < window))[None, None]


class MemoryEmbedding(nn.Module):
    """Token embedding plus a projection of the SSM's per-position output."""

    def __init__(self, tok: nn.Embedding, ssm: EpisodicMemorySSM, init_std: float):
        super().__init__()
        self.tok, self.ssm = tok, ssm
        self.inject = nn.Linear(ssm.d_model, ssm.d_model, bias=False)
        nn.init.normal_(self.inject.weight, 0.0, init_std)

    @property
    def weight(self) -> torch.Tensor:  # the tied output head reads embed.weight
        return self.tok.weight

    def forward(self, ids_BT):
        e_BTD = self.tok(ids_BT)
        s_BTD = self.ssm(e_BTD, return_state=False)
        return e_BTD + self.inject(s_BTD)


class HMSTLM(nn.Module):
    """`HMSTLM(model_config, ssm_config, window)`; `forward(ids, targets)` returns
    BaseMoEModel's dict (logits, loss, aux_loss, router statistics)."""

    def __init__(
        self,
        model_config: ModelConfig,
        ssm_config: SSMConfig | None = None,
        window: int | None = None,
    ):
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.base = BaseMoEModel(config=model_config)
        if ssm_config is not None:
            ssm = EpisodicMemorySSM(model_config.d_model, config=ssm_config)
            self.base.embed = MemoryEmbedding(
                self.base.embed, ssm, model_config.init_std
            )

    @property
    def ssm(self) -> EpisodicMemorySSM | None:
        embed = self.base.embed
        return embed.ssm if isinstance(embed, MemoryEmbedding) else None

    def forward(self, input_ids, targets=None, **kwargs):
        if "kv_caches" in kwargs:
            raise NotImplementedError("HMSTLM has no incremental decoding yet")
        T = input_ids.shape[1]
        mask = None
        if self.window is not None:
            mask = sliding_window_mask(T, self.window, input_ids.device)
        return self.base(input_ids, targets, attn_mask=mask, **kwargs)
