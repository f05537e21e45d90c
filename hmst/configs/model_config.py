"""Configuration: one dataclass per component, nested in `HMSTConfig`.

Presets are named overrides of the defaults (`PRESETS`); `get_<size>_config()` builds
one.
Cross-field invariants are checked in `__post_init__` and raise `ValueError`.
Configs round-trip through JSON (`to_dict` / `from_dict`), and YAML files plus
dotted CLI overrides (`model.d_model=512`) are applied by `apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """The sparse MoE transformer (`BaseMoEModel`)."""

    vocab_size: int = 8192
    """Tokenizer vocabulary size (BOS/EOS/PAD included)."""
    d_model: int = 256
    """Residual stream width."""
    n_layers: int = 4
    """Number of transformer blocks (attention + MoE)."""
    n_heads: int = 8
    """Attention query heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain MHA)."""
    d_ff: int = 1024
    """Hidden width of one SwiGLU expert."""
    n_experts: int = 8
    """Routed experts per MoE layer."""
    num_experts_per_tok: int = 2
    """Experts each token is routed to (top-k)."""
    max_seq_len: int = 256
    """Training context length; also the KV-cache capacity by default."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    dropout: float = 0.0
    """Dropout (training only) on the attention probabilities and on each block's
    attention and expert outputs before they join the residual stream (0: none)."""
    load_balance_coef: float = 0.01
    """Weight of the Switch load-balancing loss in the training objective."""
    router_z_coef: float = 1e-3
    """Weight of the router z-loss (ST-MoE) in the training objective."""
    balance_bias_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): after each training step every
    expert's selection bias moves by this much toward an even load (0 disables it)."""
    gate_scale: float = 1.0
    """Routed scaling factor (DeepSeek-V2/V3): the top-k gates, renormalised to sum to
    1, are multiplied by this. At top_k, k experts of width d_ff then weigh like one
    dense SwiGLU of width k * d_ff instead of half (or 1/k) of it."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model {self.d_model} not divisible by n_heads {self.n_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} not divisible by n_kv_heads")
        if not 1 <= self.num_experts_per_tok <= self.n_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                f"[1, n_experts={self.n_experts}]"
            )
        for name in ("vocab_size", "d_model", "n_layers", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.balance_bias_rate < 0:
            raise ValueError(
                f"balance_bias_rate must be >= 0, got {self.balance_bias_rate}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.gate_scale <= 0:
            raise ValueError(f"gate_scale must be > 0, got {self.gate_scale}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_kv_heads, defaulting to n_heads)."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def num_params(self, active: bool = False) -> int:
        """Analytic parameter count. `active`: only the top-k experts of each layer."""
        d, hd = self.d_model, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.kv_heads * hd * 2  # q,o + k,v
        experts = self.num_experts_per_tok if active else self.n_experts
        moe = (
            d * self.n_experts + experts * 3 * d * self.d_ff
        )  # router + SwiGLU experts
        block = attn + moe + 2 * d  # two RMSNorms
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return emb + self.n_layers * block + d  # final norm


@dataclass
class SSMConfig:
    """Episodic memory SSM (`EpisodicMemorySSM`, issue #4)."""

    d_state: int = 16
    """SSM state size per channel."""
    n_blocks: int = 2
    """Number of Mamba blocks."""
    expand: int = 2
    """d_inner = expand * d_model."""
    d_conv: int = 4
    """Causal depthwise convolution width."""
    max_seq_len: int = 8192
    """Longest context compressed into the state."""


@dataclass
class MemoryConfig:
    """Episodic buffer and semantic (FAISS) memory (issue #4)."""

    episodic_max_entries: int = 128
    """Recent interactions kept in the episodic buffer."""
    semantic_dim: int = 256
    """Embedding dimension of semantic memory."""
    semantic_max_entries: int = 1_000_000
    """Capacity of the semantic store."""
    semantic_index_type: str = "flat"
    """FAISS index: flat | ivf | ivfpq | hnsw."""

    def __post_init__(self):
        if self.semantic_index_type not in ("flat", "ivf", "ivfpq", "hnsw"):
            raise ValueError(
                f"unknown semantic_index_type {self.semantic_index_type!r}"
            )


@dataclass
class ControllerConfig:
    """Meta-controller and its state-summary encoder (`hmst.models.meta_controller`,
    issue #5)."""

    d_model: int = 128
    """Transformer width."""
    n_layers: int = 2
    """Pre-LN transformer encoder layers."""
    n_heads: int = 4
    """Attention heads."""
    d_ff: int = 256
    """Feed-forward hidden width."""
    n_experts: int = 8
    """Experts of the LM that `expert_weights` ranges over."""
    state_dim: int = 64
    """Width of the state summary produced by `StateSummaryEncoder`."""
    query_dim: int = 256
    """Width of the query embedding (the LM's hidden size)."""
    num_features: int = 16
    """Per-query scalar features fed to `StateSummaryEncoder`."""
    dropout: float = 0.0
    """Dropout in the transformer layers (PPO training requires 0)."""
    use_query: bool = False
    """Feed the query embedding as tokens next to the state summary. Off by default:
    on the fact-QA environment (600 training questions) PPO with the query tokens
    memorised per-question outcomes (deterministic reward 1.085 on the training
    questions, 0.591 on held-out ones), while the state features alone (computed from
    the query by the LM: its confidence, the episodic probe) generalise (1.017 /
    0.981). Turn it on when the environment has enough distinct queries."""

    def __post_init__(self):
        for name in (
            "d_model", "n_layers", "n_heads", "d_ff", "n_experts", "state_dim",
            "query_dim", "num_features",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"controller {name} must be positive, got {getattr(self, name)}"
                )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"controller d_model {self.d_model} not divisible by "
                f"n_heads {self.n_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"controller dropout must be in [0, 1), got {self.dropout}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ControllerConfig":
        bad = set(d) - {f.name for f in dataclasses.fields(cls)}
        if bad:
            raise ValueError(f"unknown controller config field(s): {sorted(bad)}")
        return cls(**d)


@dataclass
class CriticConfig:
    """Critic / hallucination checker (`CriticModel`, issue #5): a bidirectional encoder
    over (question, evidence, answer) segments."""

    d_model: int = 128
    """Residual stream width."""
    n_layers: int = 2
    """Encoder blocks (local conv + bidirectional attention + GELU MLP)."""
    n_heads: int = 4
    """Attention heads."""
    d_ff: int = 256
    """MLP hidden width."""
    vocab_size: int = 4096
    """Tokenizer vocabulary size (BOS/EOS/PAD included)."""
    max_seq_len: int = 256
    """Longest question + evidence + answer sequence (evidence is truncated first)."""
    n_segments: int = 3
    """Segment ids: question = 0, evidence = 1, answer = 2."""
    pad_id: int = 2
    """Padding token id (HMSTTokenizer's <|pad|>); padded keys are masked out."""
    max_question_len: int = 64
    """Question tokens kept when encoding."""
    max_answer_len: int = 48
    """Answer tokens kept when encoding."""
    dropout: float = 0.1
    """Dropout on embeddings, attention output and MLP output (0 disables it)."""
    rel_window: int = 16
    """Relative-position attention bias covers distances up to +-rel_window."""
    conv_kernel: int = 7
    """Width of the depthwise conv (local mixing) in each block; 0 disables it."""

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(
                f"critic d_model {self.d_model} not divisible by n_heads {self.n_heads}"
            )
        for name in (
            "vocab_size", "d_model", "n_layers", "d_ff", "max_seq_len", "rel_window"
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"critic {name} must be positive")
        if self.conv_kernel < 0 or (self.conv_kernel and self.conv_kernel % 2 == 0):
            raise ValueError(
                f"critic conv_kernel must be 0 or odd, got {self.conv_kernel}"
            )
        if self.n_segments != 3:
            raise ValueError("critic n_segments must be 3 (question, evidence, answer)")
        if self.max_question_len + self.max_answer_len >= self.max_seq_len:
            raise ValueError(
                "critic max_question_len + max_answer_len must leave room for evidence "
                f"within max_seq_len {self.max_seq_len}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"critic dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    """Pretraining loop (`hmst.training.pretrain`). CLI flags map 1:1 onto fields."""

    epochs: int = 1
    """Passes of `steps_per_epoch` optimizer steps each."""
    steps_per_epoch: int | None = None
    """Optimizer steps per epoch; None means one pass over the training tokens."""
    max_steps: int | None = None
    """Total optimizer steps; overrides epochs * steps_per_epoch (as HF Trainer)."""
    max_time: float | None = None
    """Stop (and checkpoint) after this many seconds of training."""
    batch_size: int = 16
    """Sequences per micro-batch per process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of the peak."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not norms, biases or embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    eval_every: int = 200
    """Evaluate (and save `last`) every N optimizer steps."""
    eval_batches: int = 32
    """Upper bound on validation micro-batches per evaluation."""
    patience: int | None = None
    """Stop after this many evaluations without a new best val loss."""
    save_every: int | None = None
    """Keep a numbered snapshot every N epochs (`epoch_N/`)."""
    log_every: int = 10
    """Write a metrics.jsonl record every N optimizer steps."""
    audit_every: int | None = None
    """Probe-set audit (activations of `audit_layers`, routing stability) every N
    optimizer steps; None: at every evaluation; 0: never."""
    audit_layers: tuple[str, ...] = ("layers[0].moe", "layers[-1].moe")
    """Module paths whose activations the audit summarises (e.g. `layers[-1].attn`)."""
    early_exit_loss: float = 0.0
    """Weight of the early-exit loss (LayerSkip, Elhoushi et al. 2024): each step adds
    this times the cross-entropy of the final norm + LM head read at one intermediate
    block's output, rotating over blocks 0..L-2 by step, so that intermediate layers
    learn to predict and early exit (`hmst.models.early_exit`) can stop sooner."""
    gradient_checkpointing: bool = False
    use_8bit_optimizer: bool = False
    mixed_precision: bool = False
    """bf16 autocast where the device runs bf16 fast (CUDA with bf16); ignored with a
    warning elsewhere: on CPUs without bf16 units bf16 matmul is 60-400x slower."""
    seed: int = 1337
    val_split: float | None = None
    """Fraction of the tokens, taken from the end, held out for validation."""
    num_threads: int | None = None
    """torch intra-op threads on CPU (None: torch's default)."""

    def __post_init__(self):
        if self.val_split is not None and not 0.0 < self.val_split < 1.0:
            raise ValueError(f"--val-split must be in (0, 1), got {self.val_split}")
        for name in (
            "batch_size",
            "gradient_accumulation_steps",
            "epochs",
            "eval_every",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        if self.early_exit_loss < 0:
            raise ValueError(
                f"--early-exit-loss must be >= 0, got {self.early_exit_loss}"
            )
        self.betas = tuple(self.betas)
        self.audit_layers = tuple(self.audit_layers)
        if self.audit_every is not None and self.audit_every < 0:
            raise ValueError(f"audit_every must be >= 0, got {self.audit_every}")


@dataclass
class HMSTConfig:
    """The whole system: each component's config nested by name."""

    model: ModelConfig = field(default_factory=ModelConfig)
    ssm: SSMConfig = field(default_factory=SSMConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "custom"
    """Preset this config started from."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HMSTConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key not in sections:
                raise ValueError(f"unknown config section {key!r}")
            if isinstance(value, dict):
                sub = _SECTION_TYPES[key]
                known = {f.name for f in dataclasses.fields(sub)}
                bad = set(value) - known
                if bad:
                    raise ValueError(f"unknown field(s) in config.{key}: {sorted(bad)}")
                kwargs[key] = sub(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "HMSTConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"corrupt config file {path}: {e}") from None
        return cls.from_dict(d)


_SECTION_TYPES = {
    "model": ModelConfig,
    "ssm": SSMConfig,
    "memory": MemoryConfig,
    "controller": ControllerConfig,
    "critic": CriticConfig,
    "train": TrainConfig,
}

# Named overrides of the defaults. Only the model section differs between sizes; the
# other sections scale with d_model where it matters.
# Note (design correction): with top-2 of 8 experts the active parameters are at least a
# quarter of the expert parameters, so the design's "12B total, 2B active" is not
# reachable; `base` is ~12B total / ~3.3B active.
PRESETS: dict[str, dict[str, Any]] = {
    # the defaults (d256 L4 H8, 8 experts top-2, ff 1024) + aux-loss-free balancing:
    # at 200 steps it took expert load max/mean from 1.87 to 1.28 and val ppl from
    # 162.6 to 156.3 (rate 0.03: 1.30, 162.7); BENCHMARKS.md
    "micro": dict(model=dict(balance_bias_rate=0.01)),
    "tiny": dict(
        model=dict(
            vocab_size=32000,
            d_model=512,
            n_layers=8,
            n_heads=8,
            d_ff=768,
            max_seq_len=1024,
        ),
        ssm=dict(d_state=16),
        memory=dict(semantic_dim=512),
    ),
    "small": dict(
        model=dict(
            vocab_size=32000,
            d_model=1536,
            n_layers=16,
            n_heads=12,
            n_kv_heads=4,
            d_ff=1408,
            max_seq_len=2048,
        ),
        ssm=dict(d_state=64),
        memory=dict(semantic_dim=1024),
    ),
    "base": dict(
        model=dict(
            vocab_size=32000,
            d_model=2048,
            n_layers=24,
            n_heads=16,
            n_kv_heads=4,
            d_ff=9984,
            max_seq_len=8192,
        ),
        ssm=dict(d_state=256),
        memory=dict(semantic_dim=1024, semantic_index_type="ivfpq"),
    ),
    "large": dict(
        model=dict(
            vocab_size=32000,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            d_ff=9216,
            max_seq_len=8192,
        ),
        ssm=dict(d_state=256),
        memory=dict(semantic_dim=1024, semantic_index_type="ivfpq"),
    ),
}


def get_config(size: str) -> HMSTConfig:
    if size not in PRESETS:
        raise ValueError(
            f"unknown model size {size!r}; choose from {', '.join(PRESETS)}"
        )
    d = {k: dict(v) for k, v in PRESETS[size].items()}
    cfg = HMSTConfig.from_dict(d)
    cfg.name = size
    return cfg


def get_micro_config() -> HMSTConfig:
    """~28M total / ~9.4M active: every component runs on CPU in seconds."""
    return get_config("micro")


def get_tiny_config() -> HMSTConfig:
    """~100M total."""
    return get_config("tiny")


def get_small_config() -> HMSTConfig:
    """~1B total."""
    return get_config("small")


def get_base_config() -> HMSTConfig:
    """~12B total, ~3.3B active (top-2 of 8 experts)."""
    return get_config("base")


def get_large_config() -> HMSTConfig:
    """~30B total."""
    return get_config("large")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: HMSTConfig, overrides: dict[str, Any]) -> HMSTConfig:
    """Apply {"model.d_model": 512, ...} (values may be strings, parsed as JSON) and
    re-run every invariant check."""
    d = cfg.to_dict()
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if not name or section not in _SECTION_TYPES:
            raise ValueError(f"override {key!r} must look like section.field")
        if name not in {f.name for f in dataclasses.fields(_SECTION_TYPES[section])}:
            raise ValueError(f"unknown config field {key!r}")
        d[section][name] = _parse_value(value) if isinstance(value, str) else value
    return HMSTConfig.from_dict(d)


def load_yaml_overrides(path: str) -> dict[str, Any]:
    """A YAML (or JSON) file of nested sections -> flat dotted overrides."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections")
    flat = {}
    for section, fields_ in data.items():
        if section == "name":
            continue
        if not isinstance(fields_, dict):
            raise ValueError(
                f"config file {path}: section {section!r} must be a mapping"
            )
        for name, value in fields_.items():
            flat[f"{section}.{name}"] = value
    return flat
