"""Meta-controller: per query, decide which parts of the system to use.

Four binary decisions (`DECISIONS`), each an independent Bernoulli:

    early_exit     let the LM stop at an early-exit head when it is confident
    episodic       read the episodic (SSM-keyed) memory
    semantic       retrieve from the semantic (FAISS) memory
    verification   run the critic on the answer

plus an expert preference (softmax over the LM's experts), an uncertainty estimate
(P(the LM's answer is wrong)) and a value estimate for PPO.

    encoder = StateSummaryEncoder(num_features, state_dim)
    state_BS = encoder(features_BF)          # LM entropy, memory sizes, turn, ...
    out = controller(query_emb, state_BS)    # query_emb (B, Dq) or (B, L, Dq)

The controller is a small pre-LN transformer encoder over
[Linear(state summary), Linear(query token) ...]; the state token's output is pooled
and feeds the heads. The state token is never masked, so a query whose tokens are all
padding still gives finite outputs.

Feature normalisation: the raw features have unrelated units (an entropy in nats, a
memory size in entries, a turn index), so the encoder standardises each feature with
running mean / variance buffers (`update_stats`, fed by the PPO trainer) before its
MLP. A LayerNorm across the feature vector would not do this: it mixes the units of
one sample (one large memory size squashes every other feature) and maps a single
feature to a constant.

Checkpoint: one directory, `controller.safetensors` + `controller_config.json`,
written by `hmst.checkpoint.write_dir_atomic`; nothing is pickled.

Legend: B batch, L query tokens, Dq query_dim, F num_features, S state_dim,
D d_model, E n_experts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_model as st_save_model

from hmst.configs.model_config import ControllerConfig  # noqa: E402,F401

DECISIONS = ("early_exit", "episodic", "semantic", "verification")
CONFIG_FILE = "controller_config.json"
MODEL_FILE = "controller.safetensors"


@dataclass
class Obs:
    """What the controller sees for N parallel queries (one env step)."""

    query_emb: torch.Tensor
    """(N, Dq) pooled query embedding."""
    features: torch.Tensor
    """(N, F) raw per-query features."""
    expert_target: torch.Tensor | None = None
    """(N, E) rows summing to 1: the LM's mean router distribution for the query
    (a supervised target for `expert_weights`)."""
    correct_if_answered: torch.Tensor | None = None
    """(N,) 1.0 where the LM's plain answer is correct. Never a policy input; the env
    scores with it and the trainer uses it as the label of `uncertainty`."""


class StateSummaryEncoder(nn.Module):
    """(B, F) raw features -> (B, S) state summary: per-feature standardisation with
    running statistics, then a 2-layer GELU MLP."""

    def __init__(self, num_features: int, state_dim: int, clip: float = 10.0):
        super().__init__()
        self.num_features, self.clip = num_features, clip
        self.register_buffer("feat_mean", torch.zeros(num_features))
        self.register_buffer("feat_var", torch.ones(num_features))
        self.register_buffer("feat_count", torch.zeros((), dtype=torch.float64))
        self.mlp = nn.Sequential(
            nn.Linear(num_features, state_dim),
            nn.GELU(),
            nn.Linear(state_dim, state_dim),
        )

    @torch.no_grad()
    def update_stats(self, features_NF: torch.Tensor) -> None:
        """Fold a batch into the running mean / variance (Chan et al. parallel merge;
        the first batch replaces the identity initialisation)."""
        x = features_NF.reshape(-1, self.num_features).to(torch.float64)
        n = float(x.shape[0])
        if n == 0:
            return
        b_mean, b_var = x.mean(0), x.var(0, unbiased=False)
        count = float(self.feat_count)
        if count == 0:
            mean, var = b_mean, b_var
        else:
            mean0 = self.feat_mean.to(torch.float64)
            var0 = self.feat_var.to(torch.float64)
            total = count + n
            delta = b_mean - mean0
            mean = mean0 + delta * n / total
            var = (var0 * count + b_var * n + delta**2 * count * n / total) / total
        self.feat_mean.copy_(mean)
        self.feat_var.copy_(var)
        self.feat_count.fill_(count + n)

    def normalize(self, features_BF: torch.Tensor) -> torch.Tensor:
        z = (features_BF - self.feat_mean) / torch.sqrt(self.feat_var + 1e-8)
        return z.clamp(-self.clip, self.clip)

    def forward(self, features_BF: torch.Tensor) -> torch.Tensor:
        if features_BF.shape[-1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} features, got {features_BF.shape[-1]}"
            )
        return self.mlp(self.normalize(features_BF))


class MetaController(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        n_experts: int,
        state_dim: int,
        query_dim: int | None = None,
        dropout: float = 0.0,
        use_query: bool = True,
    ):
        super().__init__()
        self.config: ControllerConfig | None = None  # set by from_config
        self.query_dim = query_dim or d_model
        self.use_query = use_query
        """False: the query tokens are left out (the state token alone is encoded);
        `query_emb` is still checked, so callers need not change."""
        self.state_dim, self.n_experts = state_dim, n_experts
        self.state_proj = nn.Linear(state_dim, d_model)
        self.query_proj = nn.Linear(self.query_dim, d_model)
        # a plain list of layers: nn.TransformerEncoder's nested-tensor path refuses
        # norm_first and warns
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, n_heads, d_ff, dropout, activation="gelu",
                batch_first=True, norm_first=True,
            )  # fmt: skip
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.decision_head = nn.Linear(d_model, len(DECISIONS))
        self.expert_head = nn.Linear(d_model, n_experts)
        self.uncertainty_head = nn.Linear(d_model, 1)
        self.value_head = nn.Linear(d_model, 1)
        # small policy init (cleanrl: std 0.01 on the actor's last layer): every
        # decision starts near p = 0.5, i.e. at maximum entropy; experts near uniform
        for head in (self.decision_head, self.expert_head, self.uncertainty_head):
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_config(cls, cfg: ControllerConfig) -> "MetaController":
        """The controller of `cfg`, with `.config` set (what save_controller writes)."""
        m = cls(
            cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.n_experts,
            cfg.state_dim, cfg.query_dim, cfg.dropout, cfg.use_query,
        )  # fmt: skip
        m.config = cfg
        return m

    def forward(
        self,
        query_emb: torch.Tensor,
        state_summary: torch.Tensor,
        query_mask: torch.Tensor | None = None,
    ) -> dict:
        if query_emb.dim() == 2:  # one pooled vector per query: a 1-token sequence
            query_emb = query_emb[:, None]
            if query_mask is not None and query_mask.dim() == 1:
                query_mask = query_mask[:, None]
        B, L, Dq = query_emb.shape
        if Dq != self.query_dim:
            raise ValueError(
                f"query_emb dim {Dq} != controller query_dim {self.query_dim}"
            )
        if state_summary.shape != (B, self.state_dim):
            raise ValueError(
                f"state_summary shape {tuple(state_summary.shape)} != "
                f"({B}, {self.state_dim})"
            )
        x_BLD = self.state_proj(state_summary)[:, None]
        if self.use_query:
            x_BLD = torch.cat([x_BLD, self.query_proj(query_emb)], 1)  # (B, 1 + L, D)
        pad_BL = None
        if query_mask is not None and self.use_query:
            if query_mask.shape != (B, L):
                raise ValueError(
                    f"query_mask shape {tuple(query_mask.shape)} != ({B}, {L})"
                )
            keep = torch.ones(B, 1, dtype=torch.bool, device=query_mask.device)
            pad_BL = ~torch.cat([keep, query_mask.bool()], 1)  # True = ignore
        for layer in self.layers:
            x_BLD = layer(x_BLD, src_key_padding_mask=pad_BL)
        h_BD = self.ln_f(x_BLD[:, 0])
        dec_B4 = self.decision_head(h_BD)
        expert_BE = self.expert_head(h_BD)
        unc_B = self.uncertainty_head(h_BD).squeeze(-1)
        logits = {d: dec_B4[:, i] for i, d in enumerate(DECISIONS)}
        logits.update(expert=expert_BE, uncertainty=unc_B)
        out = {d: torch.sigmoid(dec_B4[:, i]) for i, d in enumerate(DECISIONS)}
        out.update(
            expert_weights=F.softmax(expert_BE, dim=-1),
            uncertainty=torch.sigmoid(unc_B),
            logits=logits,
            value=self.value_head(h_BD).squeeze(-1),
        )
        return out

    @staticmethod
    def distribution(out: dict) -> torch.distributions.Bernoulli:
        """Independent Bernoullis over the decisions, (B, 4) in DECISIONS order."""
        logits_B4 = torch.stack([out["logits"][d] for d in DECISIONS], dim=-1)
        return torch.distributions.Bernoulli(logits=logits_B4)

    @torch.no_grad()
    def act(
        self,
        query_emb: torch.Tensor,
        state_summary: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
        query_mask: torch.Tensor | None = None,
    ):
        """(actions (B, 4) float 0/1, logp (B,), value (B,), out). Deterministic:
        p > 0.5; otherwise sampled from `generator`."""
        out = self(query_emb, state_summary, query_mask)
        dist = self.distribution(out)
        if deterministic:
            actions = (dist.logits > 0).to(dist.logits.dtype)
        else:
            actions = torch.bernoulli(dist.probs, generator=generator)
        return actions, dist.log_prob(actions).sum(-1), out["value"], out


def build_controller(cfg: ControllerConfig):
    """(StateSummaryEncoder, MetaController) of a config: the one way to build them."""
    encoder = StateSummaryEncoder(cfg.num_features, cfg.state_dim)
    return encoder, MetaController.from_config(cfg)


# -- checkpoint ------------------------------------------------------------------------


def save_controller(
    path: str,
    encoder: StateSummaryEncoder,
    controller: MetaController,
    config: ControllerConfig,
    extra: dict | None = None,
) -> None:
    """controller_config.json ({"controller": config, "extra": extra}) and
    controller.safetensors (encoder.* and controller.*), atomically."""
    from hmst.checkpoint import write_dir_atomic  # checkpoint imports the LM model

    meta = {"controller": config.to_dict(), "extra": extra or {}}
    bundle = nn.ModuleDict({"encoder": encoder, "controller": controller})

    def write(tmp):
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        st_save_model(bundle, os.path.join(tmp, MODEL_FILE))

    write_dir_atomic(path, write)


def _resolve(path: str) -> str:
    """`path`, or an interrupted swap's `<path>.old` (see write_dir_atomic)."""
    path = path.rstrip("/")
    for p in (path, path + ".old"):
        if os.path.isfile(os.path.join(p, CONFIG_FILE)):
            return p
    if os.path.isdir(path):
        raise FileNotFoundError(
            f"not a controller checkpoint (no {CONFIG_FILE}): {path}"
        )
    raise FileNotFoundError(f"controller checkpoint not found: {path}")


def load_controller(path: str, device="cpu"):
    """(encoder, controller, config, extra); both modules in eval mode."""
    path = _resolve(path)
    cfg_file, weights = os.path.join(path, CONFIG_FILE), os.path.join(path, MODEL_FILE)
    try:
        with open(cfg_file) as f:
            meta = json.load(f)
        config = ControllerConfig.from_dict(meta["controller"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt controller config {cfg_file}: {e}") from None
    except (KeyError, TypeError) as e:
        raise ValueError(f"bad controller config {cfg_file}: {e!r}") from None
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"controller checkpoint {path} has no {MODEL_FILE}")
    encoder, controller = build_controller(config)
    bundle = nn.ModuleDict({"encoder": encoder, "controller": controller})
    try:
        state = st_load_file(weights)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"corrupt controller weights {weights}: {e}") from None
    want = {k: tuple(v.shape) for k, v in bundle.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        missing, unexpected = sorted(want.keys() - have), sorted(have.keys() - want)
        shapes = sorted(k for k in want.keys() & have if want[k] != have[k])
        raise ValueError(
            f"controller weights {weights} do not match its config: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shape {shapes[:3]}"
        )
    bundle.load_state_dict(state)
    bundle.to(device).eval()
    return encoder, controller, config, meta.get("extra", {})
