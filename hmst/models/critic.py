"""CriticModel: does the evidence support the answer to the question?

A small bidirectional transformer encoder over one sequence laid out as
[question tokens | evidence tokens | answer tokens], with segment ids 0 / 1 / 2.

    forward(input_ids_BT, segment_ids_BT) -> (correctness_B, confidence_B) in [0, 1]

correctness  P(the answer is correct given question and evidence): sigmoid of the
             correctness logit divided by a temperature fitted on held-out data.
confidence   P(the thresholded verdict (correctness > 0.5) is right) = max(c, 1 - c),
             which is exactly that probability when c is calibrated; c is made
             calibrated by the temperature fitted on held-out data after training
             (`fit_temperature` in hmst.training.critic_train; ECE is reported). A
             separately trained error-predictor head was tried and dropped: a
             near-perfect critic leaves it too few held-out errors to learn from.

Inputs per token t: token + segment + position embeddings + a *match* embedding.
match_t says in which of the two other segments the same token id occurs (2 bits ->
4 rows): e.g. for an answer token, "also in the evidence" / "also in the question".
A critic's job is checking support; giving it the exact-match signal as an input
feature (computed from input_ids in forward, so the signature stays ids-only) lets a
2-layer encoder learn it from ~10k pairs instead of discovering copy-attention.

Padding: positions with input_ids == config.pad_id (or attention_mask == 0) are
masked as keys and excluded from pooling, so they never change real tokens' outputs.

Legend: B batch, T sequence, D d_model, H heads.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from hmst.configs.model_config import CriticConfig

QUESTION, EVIDENCE, ANSWER = 0, 1, 2
NUM_POOLED = 4  # pooled feature vectors per example (see CriticModel.encode)
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


class EncoderBlock(nn.Module):
    """Pre-LN block: x + LocalConv(LN(x)), x + Attn(LN(x)), then x + MLP(LN(x));
    attention is bidirectional.

    Attention logits get two learned per-head biases: a relative-position bias
    (T5-style, distances clipped to +-rel_window) so local "which sentence am I in"
    aggregation is easy, and a same-token bias (key token id == query token id) so an
    answer token can find where it occurs in the evidence: the copy/lookup step of
    checking support, which random-init attention learns slowly from ~10k examples."""

    def __init__(self, cfg: CriticConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff),
            nn.GELU(),
            nn.Linear(cfg.d_ff, cfg.d_model),
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.rel_bias_HR = nn.Parameter(
            torch.zeros(cfg.n_heads, 2 * cfg.rel_window + 1)
        )
        self.same_bias_H = nn.Parameter(torch.zeros(cfg.n_heads))
        self.conv = None
        if cfg.conv_kernel:
            self.ln0 = nn.LayerNorm(cfg.d_model)
            self.conv = nn.Conv1d(
                cfg.d_model,
                cfg.d_model,
                cfg.conv_kernel,
                padding=cfg.conv_kernel // 2,
                groups=cfg.d_model,
            )
            self.conv_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def local_mix(self, x_BTD: torch.Tensor, keep_BT: torch.Tensor) -> torch.Tensor:
        """Depthwise conv over the sequence (Conformer-style): every token sees its
        +-k//2 neighbours' features, e.g. "the subject next to me occurs in the
        question". Padded positions are zeroed first, so right-padding looks exactly
        like the conv's own zero padding and never changes real tokens."""
        h_BDT = (self.ln0(x_BTD) * keep_BT[..., None]).transpose(1, 2)
        return self.conv_proj(F.gelu(self.conv(h_BDT).transpose(1, 2)))

    def attn_bias(
        self, rel_TT: torch.Tensor, same_BTT: torch.Tensor, keep_BT: torch.Tensor
    ) -> torch.Tensor:
        """(B, H, T, T) additive logits bias; -inf on padded keys."""
        # rel_TT: bucket index of (key - query); same_BTT: float 1.0 where ids match
        bias_BHTT = (
            self.rel_bias_HR[:, rel_TT][None]
            + self.same_bias_H[None, :, None, None] * same_BTT[:, None]
        )
        return bias_BHTT.masked_fill(~keep_BT[:, None, None, :], float("-inf"))

    def forward(
        self,
        x_BTD: torch.Tensor,
        rel_TT: torch.Tensor,
        same_BTT: torch.Tensor,
        keep_BT: torch.Tensor,
    ) -> torch.Tensor:
        B, T, D = x_BTD.shape
        if self.conv is not None:
            x_BTD = x_BTD + self.drop(self.local_mix(x_BTD, keep_BT))
        q, k, v = self.qkv(self.ln1(x_BTD)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        bias_BHTT = self.attn_bias(rel_TT, same_BTT, keep_BT).to(q.dtype)
        y_BHTd = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_BHTT)
        y_BTD = y_BHTd.transpose(1, 2).reshape(B, T, D)
        x_BTD = x_BTD + self.drop(self.proj(y_BTD))
        return x_BTD + self.drop(self.mlp(self.ln2(x_BTD)))


def match_features(
    input_ids_BT: torch.Tensor, segment_ids_BT: torch.Tensor, valid_BT: torch.Tensor
) -> torch.Tensor:
    """(B, T) int in 0..3: bit 0 = the token id also occurs in segment (s+1) % 3, bit 1
    = also in segment (s+2) % 3, where s is the token's own segment."""
    same_BTT = input_ids_BT[:, :, None] == input_ids_BT[:, None, :]
    same_BTT = same_BTT & valid_BT[:, None, :]
    in_seg = [
        (same_BTT & (segment_ids_BT == s)[:, None, :]).any(-1) for s in range(3)
    ]  # in_seg[s]_BT: token occurs somewhere in segment s
    in_BT3 = torch.stack(in_seg, dim=-1)
    seg = segment_ids_BT.clamp(0, 2)
    nxt = in_BT3.gather(-1, ((seg + 1) % 3)[..., None]).squeeze(-1)
    nxt2 = in_BT3.gather(-1, ((seg + 2) % 3)[..., None]).squeeze(-1)
    return (nxt.long() + 2 * nxt2.long()) * valid_BT.long()


class CriticModel(nn.Module):
    def __init__(self, config: CriticConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.seg_emb = nn.Embedding(cfg.n_segments, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.match_emb = nn.Embedding(4, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.correctness_head = nn.Sequential(
            nn.Linear(NUM_POOLED * cfg.d_model, cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.d_model, 1),
        )
        # fitted on held-out data after training (`fit_temperature`); 1.0 = identity
        self.register_buffer("temperature", torch.ones(()))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def encode(
        self,
        input_ids_BT: torch.Tensor,
        segment_ids_BT: torch.Tensor,
        attention_mask_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled features (B, 4D): mean and max over answer tokens, mean over all
        tokens, max over evidence tokens. The evidence max lets "some evidence window
        supports the answer" (an existential test) pass straight to the heads."""
        B, T = input_ids_BT.shape
        if T > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {T} > max_seq_len {self.config.max_seq_len}"
            )
        valid_BT = (
            input_ids_BT != self.config.pad_id
            if attention_mask_BT is None
            else attention_mask_BT.bool()
        )
        pos_T = torch.arange(T, device=input_ids_BT.device)
        seg_BT = segment_ids_BT.clamp(0, self.config.n_segments - 1)
        x_BTD = (
            self.tok_emb(input_ids_BT)
            + self.seg_emb(seg_BT)
            + self.pos_emb(pos_T)[None]
            + self.match_emb(match_features(input_ids_BT, seg_BT, valid_BT))
        )
        x_BTD = self.drop(x_BTD)
        # a padded query row still attends to the real keys, so no row is all -inf
        w = self.config.rel_window
        rel_TT = (pos_T[None, :] - pos_T[:, None]).clamp(-w, w) + w
        same_BTT = (input_ids_BT[:, :, None] == input_ids_BT[:, None, :]).to(
            x_BTD.dtype
        )
        for block in self.blocks:
            x_BTD = block(x_BTD, rel_TT, same_BTT, valid_BT)
        h_BTD = self.ln_f(x_BTD)
        answer_BT = valid_BT & (seg_BT == ANSWER)
        answer_BT = torch.where(answer_BT.any(-1, keepdim=True), answer_BT, valid_BT)
        a_BT1 = answer_BT[..., None].to(h_BTD.dtype)
        v_BT1 = valid_BT[..., None].to(h_BTD.dtype)
        mean_a = (h_BTD * a_BT1).sum(1) / a_BT1.sum(1).clamp_min(1)
        max_a = h_BTD.masked_fill(~answer_BT[..., None], float("-inf")).amax(1)
        mean_all = (h_BTD * v_BT1).sum(1) / v_BT1.sum(1).clamp_min(1)
        evid_BT = valid_BT & (seg_BT == EVIDENCE)
        evid_BT = torch.where(evid_BT.any(-1, keepdim=True), evid_BT, valid_BT)
        max_e = h_BTD.masked_fill(~evid_BT[..., None], float("-inf")).amax(1)
        return torch.cat([mean_a, max_a, mean_all, max_e], dim=-1)

    def correctness_logit(self, feats_BF: torch.Tensor) -> torch.Tensor:
        """Raw logit (B,), before the fitted temperature: what training optimises."""
        return self.correctness_head(feats_BF).squeeze(-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(correctness_B, confidence_B), both in [0, 1]."""
        feats_BF = self.encode(input_ids, segment_ids, attention_mask)
        correctness = torch.sigmoid(self.correctness_logit(feats_BF) / self.temperature)
        confidence = torch.maximum(correctness, 1.0 - correctness)
        return correctness, confidence

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -- input encoding -------------------------------------------------------------------


def encode_example(
    tokenizer, question: str, evidence: str, answer: str, config: CriticConfig
) -> tuple[list[int], list[int]]:
    """Token ids and segment ids for one triple. Each part is encoded with a leading
    space so a word has the same BPE ids wherever it appears (start of the answer or
    mid-evidence); the question and answer are capped, evidence gets the rest."""
    q = tokenizer.encode(" " + question.strip())[: config.max_question_len]
    a = tokenizer.encode(" " + answer.strip())[: config.max_answer_len]
    e = tokenizer.encode(" " + evidence.strip())[: config.max_seq_len - len(q) - len(a)]
    ids = q + e + a
    segs = [QUESTION] * len(q) + [EVIDENCE] * len(e) + [ANSWER] * len(a)
    return ids, segs


def collate(
    examples: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: (input_ids_BT, segment_ids_BT)."""
    T = max(len(ids) for ids, _ in examples)
    ids_BT = torch.full((len(examples), T), pad_id, dtype=torch.long)
    seg_BT = torch.full((len(examples), T), ANSWER, dtype=torch.long)
    for i, (ids, segs) in enumerate(examples):
        ids_BT[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        seg_BT[i, : len(segs)] = torch.tensor(segs, dtype=torch.long)
    return ids_BT, seg_BT


@torch.no_grad()
def score_triples(
    model: CriticModel, tokenizer, triples: list[tuple[str, str, str]], batch_size=64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correctness, confidence) for (question, evidence, answer) strings."""
    model.eval()
    out_c, out_f = [], []
    for i in range(0, len(triples), batch_size):
        enc = [
            encode_example(tokenizer, *t, model.config)
            for t in triples[i : i + batch_size]
        ]
        c, f = model(*collate(enc, model.config.pad_id))
        out_c.append(c)
        out_f.append(f)
    return torch.cat(out_c), torch.cat(out_f)


# -- save / load (same directory layout as hmst.checkpoint, written atomically) --------


def save_critic(path: str, model: CriticModel, tokenizer, extra: dict | None = None):
    """config.json ({"critic": CriticConfig, ...extra}), model.safetensors,
    tokenizer.json; via hmst.checkpoint.write_dir_atomic."""
    from hmst.checkpoint import write_dir_atomic  # checkpoint imports the LM model

    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"tokenizer vocab {tokenizer.vocab_size} != critic vocab "
            f"{model.config.vocab_size}"
        )
    meta = {"critic": model.config.__dict__.copy(), **(extra or {})}

    def write(tmp):
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        st_save_model(model, os.path.join(tmp, MODEL_FILE))
        tokenizer.save(os.path.join(tmp, TOKENIZER_FILE))

    write_dir_atomic(path, write)


def load_critic(path: str, device: str = "cpu"):
    """(CriticModel in eval mode, HMSTTokenizer, the config.json dict)."""
    from hmst.checkpoint import resolve
    from hmst.tokenizer import HMSTTokenizer

    path = resolve(path)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    if "critic" not in meta:
        raise ValueError(f"{path} is not a critic checkpoint (no 'critic' config)")
    model = CriticModel(CriticConfig(**meta["critic"]))
    missing, unexpected = st_load_model(
        model, os.path.join(path, MODEL_FILE), strict=False, device=device
    )
    if missing or unexpected:
        raise ValueError(
            f"critic checkpoint {path} does not match its config: missing "
            f"{sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    return model.to(device).eval(), HMSTTokenizer.load(path), meta
