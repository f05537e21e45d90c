"""Early exit: exit heads on intermediate blocks and a learned confidence, so easy
tokens skip the remaining blocks (CALM, Schuster et al. 2022, "copy states" K/V fill).

Glossary (shape legend: B batch, T tokens, D d_model, V vocab, L blocks, N rows):
  l         block index 0..L-1; a token that exits after block l used l + 1 blocks
  head_l    RMSNorm_l -> optional low-rank adapter (x + U_l D_l x) -> the model's own
            tied LM head (`model.embed.weight`): D + 2 r D parameters per head
  c_l(x)    learned confidence in (0, 1): sigmoid(MLP_l(rms_norm(x))) (or a linear
            probe), fitted so that its logit predicts logit(q), q = exp(-KL(p_L ||
            p_l)): how close head_l is to the full model, on a log-KL scale
            (q >= tau <=> KL <= -ln tau nats; tau 0.99 ~ 0.01 nats)
  tau       exit after block l when c_l >= tau; tau > 1 never exits
  a         `depth_bonus`: the test is logit(c_l) + a ln(L-1-l) >= logit(tau), i.e.
            roughly predicted KL <= KL_tau (L-1-l)^a: an exit that saves more
            blocks may cost more (a Lagrangian trade of ppl for blocks; 0: one
            threshold for every layer)
  K/V fill  a token that exits after block l still owes keys/values to blocks
            l+1..L-1 (later tokens attend to them). Block l+1's are exact: its input
            is the exit state. For blocks j >= l+2, `kv_fill="copy"` (CALM) runs
            the exit state through block j's attn_norm + k_proj/v_proj;
            `kv_fill="learned"` maps it with one linear map per (l, j), fitted by
            ridge regression to block j's true keys/values (the same cost: one
            D x 2 Hkv Dh matmul). No query, no attention, no MoE either way. Counted
            apart from block evaluations.

Why a learned confidence and not the head's max-prob: at micro size the tied head
(D x V = 256 x 8192) costs more than a whole block, so testing max-prob at every exit
layer costs more than the skipped blocks save. c_l costs D*H MACs; the vocabulary
projection runs once, at the layer where the token exits, in place of the final head.
The max-prob rule is kept (`rule="max_prob"`) as the comparison.

`early_exit_forward` is the teacher-forced evaluation. It runs block by block over
all positions at once and is *exactly* what token-by-token decoding with the KV cache
computes: position t's decision at block l depends only on blocks <= l at positions
<= t, all known once block l has run for every position, and an exited position's
keys/values in later blocks are the same K/V fill. `decode_step` is that decoding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hmst.configs.model_config import ModelConfig
from hmst.models.layers import apply_rope
from hmst.models.moe import grouped_experts, select_experts

RULES = ("learned", "max_prob")
KV_FILLS = ("copy", "learned")
NEVER = 2.0  # a threshold above any confidence: the model runs every block


@dataclass
class EarlyExitConfig:
    exit_layers: tuple[int, ...]
    """Blocks with an exit head (intermediate ones: 0..L-2)."""
    adapter_rank: int = 64
    """Rank r of each head's low-rank adapter (0: RMSNorm + tied head only)."""
    conf_hidden: int = 0
    """Hidden width of each confidence MLP (0: a linear probe, the cheapest check;
    it ranked tokens as well as a 64-wide MLP in our tuning runs)."""
    threshold: float = NEVER
    """Exit when confidence >= threshold (tuned by early_exit_train)."""
    depth_bonus: float = 0.0
    """a >= 0: the learned rule's score gets + a ln(blocks saved) (tuned with it)."""
    rule: str = "learned"
    """"learned" (c_l) or "max_prob" (max softmax of head_l)."""
    kv_fill: str = "copy"
    """How an exited token's K/V for blocks j >= l+2 are made: "copy" or "learned"."""

    def __post_init__(self):
        self.exit_layers = tuple(int(i) for i in self.exit_layers)
        if not self.exit_layers or list(self.exit_layers) != sorted(
            set(self.exit_layers)
        ):
            raise ValueError(f"exit_layers must be sorted, unique: {self.exit_layers}")
        if self.adapter_rank < 0 or self.conf_hidden < 0 or self.depth_bonus < 0:
            raise ValueError("adapter_rank, conf_hidden, depth_bonus must be >= 0")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.kv_fill not in KV_FILLS:
            raise ValueError(f"kv_fill must be one of {KV_FILLS}, got {self.kv_fill!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exit_layers"] = list(self.exit_layers)
        return d


class LowRankAdapter(nn.Module):
    """x + up(down(x)); `up` starts at zero so a fresh head is the logit lens."""

    def __init__(self, d_model: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, d_model, bias=False)
        nn.init.normal_(self.down.weight, 0.0, d_model**-0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return x + self.up(self.down(x))


def confidence_mlp(d_model: int, hidden: int) -> nn.Module:
    """D -> 1 score. ReLU, not GELU: at batch 1 on this CPU a 64-wide GELU measured
    ~100 us per call, as much as a third of a block's attention."""
    if hidden == 0:
        return nn.Linear(d_model, 1)
    return nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class EarlyExitHeads(nn.Module):
    """One exit head and one confidence MLP per exit layer; the LM head is borrowed."""

    def __init__(self, model_cfg: ModelConfig, cfg: EarlyExitConfig):
        super().__init__()
        bad = [i for i in cfg.exit_layers if not 0 <= i < model_cfg.n_layers - 1]
        if bad:
            raise ValueError(
                f"exit layers {bad} are not intermediate blocks of a "
                f"{model_cfg.n_layers}-block model (0..{model_cfg.n_layers - 2})"
            )
        self.config, self.model_config = cfg, model_cfg
        D, n = model_cfg.d_model, len(cfg.exit_layers)
        self.slot = {layer: i for i, layer in enumerate(cfg.exit_layers)}
        self.norms = nn.ModuleList(
            nn.RMSNorm(D, eps=model_cfg.norm_eps) for _ in range(n)
        )
        self.adapters = nn.ModuleList(
            LowRankAdapter(D, cfg.adapter_rank) if cfg.adapter_rank else nn.Identity()
            for _ in range(n)
        )
        self.conf = nn.ModuleList(confidence_mlp(D, cfg.conf_hidden) for _ in range(n))
        L, kv = model_cfg.n_layers, 2 * model_cfg.kv_heads * model_cfg.head_dim
        self.kv_maps = nn.ModuleDict(
            {
                f"{i}_{j}": nn.Linear(D, kv)
                for i in cfg.exit_layers
                for j in range(i + 2, L)
                if cfg.kv_fill == "learned"
            }
        )

    @torch.no_grad()
    def init_from(self, model) -> "EarlyExitHeads":
        """Start every head's RMSNorm from the model's final norm (the logit lens)."""
        for norm in self.norms:
            norm.weight.copy_(model.norm.weight)
        return self

    @property
    def threshold(self) -> float:
        return self.config.threshold

    def hidden(self, layer: int, x_ND: torch.Tensor) -> torch.Tensor:
        i = self.slot[layer]
        return self.adapters[i](self.norms[i](x_ND))

    def logits(self, model, layer: int, x_ND: torch.Tensor) -> torch.Tensor:
        """(N, D) residual stream after block `layer` -> (N, V) exit logits."""
        return F.linear(self.hidden(layer, x_ND), head_weight(model))

    def confidence_logit(self, layer: int, x_ND: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) pre-sigmoid confidence. Its own parameter-free norm, so
        training it never moves the exit head."""
        x = F.rms_norm(x_ND, (x_ND.shape[-1],), eps=self.model_config.norm_eps)
        return self.conf[self.slot[layer]](x).squeeze(-1)

    def learned_fill(self, layer: int, block: int) -> bool:
        """Whether block `block`'s K/V of a token that exited after `layer` come from
        a learned map (else from the exit state through the block's own k/v)."""
        return f"{layer}_{block}" in self.kv_maps

    def fill(self, layer: int, block: int, x_ND: torch.Tensor):
        """Learned K/V fill: exit state (N, D) after `layer` -> block `block`'s keys
        and values (N, Hkv Dh) each, before RoPE."""
        x = F.rms_norm(x_ND, (x_ND.shape[-1],), eps=self.model_config.norm_eps)
        return self.kv_maps[f"{layer}_{block}"](x).chunk(2, dim=-1)

    def bonus(self, layer: int) -> float:
        """a ln(blocks saved) of an exit after `layer` (see `depth_bonus`)."""
        return self.config.depth_bonus * math.log(
            self.model_config.n_layers - 1 - layer
        )

    def score(self, layer: int, x_ND: torch.Tensor) -> torch.Tensor:
        """(N,) float64 exit score of the learned rule: logit(c_l) + bonus."""
        return self.confidence_logit(layer, x_ND).double() + self.bonus(layer)

    def confidence(self, model, layer: int, x_ND: torch.Tensor, rule: str):
        """(N,) confidence (with the depth bonus) and, for max_prob, the (N, V) logits
        it had to compute."""
        if rule == "learned":
            return torch.sigmoid(self.score(layer, x_ND)), None
        logits = self.logits(model, layer, x_ND)
        return logits.float().softmax(-1).amax(-1), logits

    def decide(self, model, layer: int, x_ND: torch.Tensor, tau: float, rule: str):
        """(N,) bool exit mask (confidence >= tau) and max_prob's logits. The learned
        rule compares the pre-sigmoid score with logit(tau) in float64: the same
        decision as sigmoid(score) >= tau, two ops fewer on the decode path, and
        bit-identical between `early_exit_forward` and `decode_step`."""
        if rule != "learned":
            conf, logits = self.confidence(model, layer, x_ND, rule)
            return conf.double() >= tau, logits
        return self.score(layer, x_ND) >= _logit(tau), None


def _logit(tau: float) -> float:
    if tau <= 0.0:
        return -math.inf
    if tau >= 1.0:
        return math.inf
    return math.log(tau / (1.0 - tau))


def head_weight(model) -> torch.Tensor:
    return model.embed.weight if model.config.tie_embeddings else model.lm_head.weight


def moe_forward(moe, x_TD: torch.Tensor) -> torch.Tensor:
    """`MoE.forward` without its statistics (same maths: fp32 router, top-k, grouped
    dispatch); every token is routed on its own, so any subset of rows may run."""
    router = moe.router
    _, _, topk_idx_TK, gates_TK = select_experts(router, x_TD)
    counts_E = torch.bincount(topk_idx_TK.flatten(), minlength=router.n_experts)
    return grouped_experts(x_TD, topk_idx_TK, gates_TK, counts_E, moe.experts)


def block_forward(layer, x_BTD, cos, sin, cache=None, pos: int = 0, mask=None):
    x = x_BTD + layer.attn(layer.attn_norm(x_BTD), cos, sin, cache, pos, mask)
    B, T, D = x.shape
    return x + moe_forward(layer.moe, layer.moe_norm(x).reshape(B * T, D)).view_as(x)


def fill_kv(layer, x_BTD, cos, sin, cache, pos: int, kv=None) -> None:
    """K/V fill of a skipped block: keys/values from the exit hidden state through
    the block's attn_norm + k/v, or `kv` = (k, v) (B, T, Hkv Dh) from a learned map."""
    attn = layer.attn
    B, T, _ = x_BTD.shape
    if kv is None:
        h = layer.attn_norm(x_BTD)
        kv = attn.k_proj(h), attn.v_proj(h)
    k = kv[0].reshape(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = kv[1].reshape(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    cache.update(pos, apply_rope(k, cos, sin), v)


@torch.no_grad()
def base_hidden_states(model, ids_BT):
    """Residual stream after every block [(B, T, D)] * L and the final logits (B, T, V)
    of the full model (for training the heads)."""
    T = ids_BT.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x, hs = model.embed(ids_BT), []
    for layer in model.layers:
        x = block_forward(layer, x, cos, sin)
        hs.append(x)
    return hs, F.linear(model.norm(x), head_weight(model))


@torch.no_grad()
def early_exit_forward(
    model,
    heads: EarlyExitHeads | None,
    ids_BT: torch.Tensor,
    threshold: float | None = None,
    rule: str | None = None,
    exit_from: int = 0,
):
    """Teacher-forced early exit over whole windows (positions 0..T-1).

    Returns `logits` (B, T, V): each position's emitted distribution, and `exit_layer`
    (B, T): the block it exited after (L-1: ran every block). Positions < `exit_from`
    (a prompt) never exit. Equal to decoding the same ids one by one with
    `decode_step` (see the module docstring); with no exit, equal to the model.
    """
    tau = heads.threshold if threshold is None and heads is not None else threshold
    rule = rule or (heads.config.rule if heads is not None else "learned")
    B, T = ids_BT.shape
    L, V = model.config.n_layers, model.config.vocab_size
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = model.embed(ids_BT)
    D = x.shape[-1]
    active_N = torch.ones(B * T, dtype=torch.bool, device=x.device)
    may_exit_N = (torch.arange(T, device=x.device) >= exit_from).repeat(B)
    exit_N = torch.full((B * T,), L - 1, dtype=torch.long, device=x.device)
    logits_NV = torch.empty(B * T, V, dtype=x.dtype, device=x.device)
    for blk, layer in enumerate(model.layers):
        if not bool(active_N.any()):  # everything exited: later blocks have no query
            break
        # Attention over every position: an exited position's keys/values come from
        # its frozen exit state (the K/V fill; see the module docstring).
        a = layer.attn(
            layer.attn_norm(x),
            cos,
            sin,
            kv_fn=kv_filler(heads, blk, x, exit_N, active_N),
        )
        x_ND = torch.where(active_N.view(B, T, 1), x + a, x).reshape(B * T, D)
        idx = active_N.nonzero().squeeze(1)
        rows = x_ND.index_select(0, idx)
        rows = rows + moe_forward(layer.moe, layer.moe_norm(rows))
        x_ND = x_ND.index_copy(0, idx, rows)
        if heads is not None and blk in heads.slot and tau is not None:
            cand = (active_N & may_exit_N).nonzero().squeeze(1)
            go, lg = heads.decide(model, blk, x_ND.index_select(0, cand), tau, rule)
            out = cand[go]
            if out.numel():
                lg = lg[go] if lg is not None else None
                logits_NV[out] = (
                    lg if lg is not None else heads.logits(model, blk, x_ND[out])
                )
                exit_N[out] = blk
                active_N[out] = False
        x = x_ND.view(B, T, D)
    idx = active_N.nonzero().squeeze(1)
    logits_NV[idx] = F.linear(model.norm(x.reshape(B * T, D)[idx]), head_weight(model))
    return dict(logits=logits_NV.view(B, T, V), exit_layer=exit_N.view(B, T))


def kv_filler(heads, blk: int, x_BTD, exit_N, active_N):
    """For `early_exit_forward` at block `blk`: None (every K/V from the states), or
    the `kv_fn` that puts the learned fill of each exited position (exit layer l <=
    blk - 2) in place of its projected keys/values."""
    if heads is None or not heads.kv_maps:
        return None
    B, T, D = x_BTD.shape
    groups = []
    for layer in heads.config.exit_layers:
        if heads.learned_fill(layer, blk):
            rows = ((exit_N == layer) & ~active_N).nonzero().squeeze(1)
            if rows.numel():
                groups.append(
                    (rows, heads.fill(layer, blk, x_BTD.reshape(-1, D)[rows]))
                )
    if not groups:
        return None

    def kv_fn(k, v):
        k, v = k.reshape(B * T, -1).clone(), v.reshape(B * T, -1).clone()
        for rows, (k_fill, v_fill) in groups:
            k[rows], v[rows] = k_fill.to(k.dtype), v_fill.to(v.dtype)
        return k.view(B, T, -1), v.view(B, T, -1)

    return kv_fn


def layer_counts(exit_layer: torch.Tensor, n_layers: int) -> dict:
    """Exact costs of exit decisions: block evaluations (exit after l -> l + 1) and
    K/V fills (exit after l -> n_layers - 1 - l K/V-only projections)."""
    n = exit_layer.numel()
    blocks = int((exit_layer + 1).sum())
    return dict(
        tokens=n,
        block_evals=blocks,
        kv_fills=n * n_layers - blocks,
        layers_per_token=blocks / max(n, 1),
        saved_fraction=1.0 - blocks / max(n * n_layers, 1),
    )


@torch.no_grad()
def prefill(model, ids_BT, caches) -> torch.Tensor:
    """The prompt through every block (prompts never exit); logits (B, V) of its last
    position."""
    T = ids_BT.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = model.embed(ids_BT)
    for layer, cache in zip(model.layers, caches):
        x = block_forward(layer, x, cos, sin, cache, 0)
    return F.linear(model.norm(x[:, -1]), head_weight(model))


@torch.no_grad()
def decode_step(model, heads, tok_B, caches, pos: int, threshold=None, rule=None):
    """One token per row at position `pos` against the KV cache: (logits (B, V),
    exit layer). A batch exits only when every row is confident (one branch per
    batch; at batch 1 that is the per-token rule). `heads=None`: the full model."""
    tau = heads.threshold if threshold is None and heads is not None else threshold
    rule = rule or (heads.config.rule if heads is not None else "learned")
    cos, sin = model.rope_cos[pos : pos + 1], model.rope_sin[pos : pos + 1]
    x = model.embed(tok_B[:, None])
    L = len(model.layers)
    checks = heads is not None and tau is not None and tau <= 1.0  # else: never
    B, thr = tok_B.shape[0], _logit(tau) if checks else math.inf
    for blk, (layer, cache) in enumerate(zip(model.layers, caches)):
        x = block_forward(layer, x, cos, sin, cache, pos)
        if not checks or blk not in heads.slot:
            continue
        if rule == "learned" and B == 1:  # fewest ops: score.item() vs logit(tau)
            lg, go = None, heads.score(blk, x[:, 0]).item() >= thr
        else:
            go, lg = heads.decide(model, blk, x[:, 0], tau, rule)
            go = bool(go.all())
        if go:
            for j in range(blk + 1, L):
                kv = heads.fill(blk, j, x[:, 0]) if heads.learned_fill(blk, j) else None
                fill_kv(model.layers[j], x, cos, sin, caches[j], pos, kv)
            return (lg if lg is not None else heads.logits(model, blk, x[:, 0])), blk
    return F.linear(model.norm(x[:, 0]), head_weight(model)), L - 1


@torch.no_grad()
def greedy_decode(
    model, heads, prompt_BT, max_new_tokens: int, threshold=None, rule=None
):
    """Greedy ids (B, max_new_tokens) and the exit layer of every decode step (the
    first new token comes from the full-depth prefill: exit layer L-1)."""
    B, T = prompt_BT.shape
    caches = model.allocate_kv_cache(B, T + max_new_tokens)
    logits = prefill(model, prompt_BT, caches)
    toks, exits = [], [model.config.n_layers - 1]
    for step in range(max_new_tokens):
        tok = logits.argmax(-1)
        toks.append(tok)
        if step == max_new_tokens - 1:
            break
        logits, layer = decode_step(
            model, heads, tok, caches, T + step, threshold, rule
        )
        exits.append(layer)
    return torch.stack(toks, 1), exits


@torch.no_grad()
def forced_decode(model, heads, ids_BT, prompt_len: int, threshold=None, rule=None):
    """Decoding along given ids: prefill ids[:, :prompt_len], then feed the rest one
    token at a time against the KV cache. Logits (B, T - prompt_len + 1, V) of
    positions prompt_len - 1 .. T - 1 and their exit layers: what
    `early_exit_forward(..., exit_from=prompt_len)` computes in one pass."""
    B, T = ids_BT.shape
    caches = model.allocate_kv_cache(B, T)
    logits = [prefill(model, ids_BT[:, :prompt_len], caches)]
    exits = [model.config.n_layers - 1]
    for pos in range(prompt_len, T):
        lg, layer = decode_step(
            model, heads, ids_BT[:, pos], caches, pos, threshold, rule
        )
        logits.append(lg)
        exits.append(layer)
    return torch.stack(logits, 1), exits
