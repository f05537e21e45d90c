"""Shared pieces of the benchmarks: peer models at a matched config, one training loop
for every peer, validation bits-per-byte, the machine's measured matmul peak."""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hmst.configs.model_config import ModelConfig  # noqa: E402
from hmst.data import (  # noqa: E402
    BatchSampler,
    TokenData,
    eval_windows,
    read_documents,
    split_documents_tail,
    tokenize_documents,
)
from hmst.models.base_moe import BaseMoEModel  # noqa: E402
from hmst.models.layers import SwiGLU  # noqa: E402
from hmst.models.moe import RouterOutput  # noqa: E402
from hmst.tokenizer import HMSTTokenizer  # noqa: E402
from hmst.training.optim import build_optimizer, build_scheduler  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "tinyshakespeare.txt")
HF_IMPLS = ("eager", "batched_mm", "grouped_mm")


class DenseFFN(nn.Module):
    """Stands in for a block's MoE: one SwiGLU of width top_k * d_ff (the MoE's active
    FLOPs), returning zero router statistics so BaseMoEModel runs unchanged."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn = SwiGLU(cfg.d_model, cfg.num_experts_per_tok * cfg.d_ff)
        self.n_experts = cfg.n_experts

    def forward(self, x, expert_bias=None):
        zero = x.new_zeros(())
        e = self.n_experts
        stats = RouterOutput(None, None, x.new_full((e,), 1 / e), x.new_ones(e), zero)
        return self.ffn(x), stats


def build_dense(cfg: ModelConfig) -> BaseMoEModel:
    model = BaseMoEModel(config=cfg)
    for block in model.layers:
        block.moe = DenseFFN(cfg)
    std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if "ffn.w13" in name:
            nn.init.normal_(p, 0.0, cfg.init_std)
        elif "ffn.w2" in name:
            nn.init.normal_(p, 0.0, std)
    return model


def build_mixtral(cfg: ModelConfig, impl: str, router_logits: bool = True):
    """HF transformers Mixtral at hmst's config. `router_logits` (needed for its aux
    loss in training) is turned off for generation, where it would only cost time."""
    from transformers import MixtralConfig, MixtralForCausalLM

    hf_cfg = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=True,
        rope_theta=cfg.rope_theta,
        initializer_range=cfg.init_std,
        router_aux_loss_coef=cfg.load_balance_coef,
        output_router_logits=router_logits,
    )
    return MixtralForCausalLM._from_config(
        hf_cfg, attn_implementation="sdpa", experts_implementation=impl
    )


def hmst_loss(model, x, y):
    out = model(x, targets=y, return_logits=False)
    return out["loss"], out["loss"] + out["aux_loss"], out["expert_counts"]


def mixtral_loss(model, x, y):
    out = model(input_ids=x)
    ce = nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
    return ce, ce + model.config.router_aux_loss_coef * out.aux_loss


def mixtral_logits(model, x):
    return model(input_ids=x).logits


def measure_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of this process (its thread count), process CPU time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        a @ b
        best = min(best, time.process_time() - t)
    return 2 * n**3 / best


def prepare_corpus(vocab_size: int, val_fraction: float = 0.1, corpus=None):
    """Tokenizer trained on the first 90% of `corpus` (default: the bundled
    tinyshakespeare); (tok, train, val)."""
    docs = read_documents([corpus or CORPUS])
    train_docs, val_docs = split_documents_tail(docs, val_fraction)
    tok = HMSTTokenizer.train(train_docs, vocab_size)
    train = TokenData([tokenize_documents(tok, train_docs)])
    val = TokenData([tokenize_documents(tok, val_docs)])
    return tok, train, val


@torch.no_grad()
def evaluate_bpb(
    logits_fn, tok, val, seq_len, batch=16, max_windows=512, counts_fn=None
):
    """Validation loss, perplexity, bits-per-byte (and expert counts via counts_fn)."""
    windows = eval_windows(val, seq_len, max_windows)
    byte_len = torch.tensor(tok.token_byte_lengths())
    nats = nbytes = ntok = 0.0
    counts = None
    for i in range(0, len(windows), batch):
        w = torch.from_numpy(np.stack(windows[i : i + batch]).astype(np.int64))
        x, y = w[:, :-1], w[:, 1:]
        logits = logits_fn(x)
        nats += nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), reduction="sum"
        ).item()
        nbytes += byte_len[y].sum().item()
        ntok += y.numel()
        if counts_fn is not None:
            c = counts_fn(x)
            counts = c if counts is None else counts + c
    loss = nats / ntok
    res = {
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_bpb": nats / math.log(2) / nbytes,
    }
    return res, counts


class Trainee:
    """One peer of a training race: its own sampler (same seed, so every peer sees the
    same batches), AdamW, cosine schedule, gradient clipping, and process-CPU-time
    account. Every peer is trained by this same code."""

    def __init__(self, name, model, loss_fn, train, cfg: ModelConfig, *, batch, lr,
                 warmup=50, seed=1337):  # fmt: skip
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.train, self.seq, self.batch, self.lr = train, cfg.max_seq_len, batch, lr
        self.warmup, self.seed = warmup, seed
        self.reset(planned_steps=1)
        self.cpu_s, self.losses = 0.0, []

    def reset(self, planned_steps: int):
        """Fresh sampler, optimizer and schedule (weights are kept)."""
        self.sampler = BatchSampler(self.train, self.seq, self.seed)
        self.opt = build_optimizer(self.model, self.lr, 0.1, (0.9, 0.95))
        self.sched = build_scheduler(self.opt, self.warmup, planned_steps, 0.1)
        self.planned, self.steps = planned_steps, 0

    def step(self) -> float:
        self.model.train()
        t = time.process_time()
        x, y = self.sampler.next_batches(self.batch, 1, 0, 1)[0]
        ce, total, *counts = self.loss_fn(self.model, x, y)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        if counts:  # an hmst model: its balance bias (if it uses one)
            self.model.update_balance_bias(counts[0])
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.cpu_s += time.process_time() - t
        self.steps += 1
        self.losses.append(ce.item())
        return self.losses[-1]

    def probe_step_cost(self, n: int = 4) -> float:
        """CPU seconds per step, measured at learning rate 0 (weights unchanged)."""
        for g in self.opt.param_groups:
            g["lr"] = 0.0
        t = time.process_time()
        for _ in range(n):
            self.step()
        return (time.process_time() - t) / n


def train_interleaved(trainees, *, steps=None, cpu_seconds=None, log_every=25):
    """Train peers step by step in turn, so machine noise hits them alike.

    Either `steps` optimizer steps each (equal tokens), or an equal budget of process
    CPU seconds each: then every peer's step count (and so its cosine schedule) is
    planned from its own measured step cost, and it stops at its budget.
    """
    for tr in trainees:
        planned = steps
        if cpu_seconds is not None:
            planned = max(10, int(cpu_seconds / tr.probe_step_cost()))
        tr.reset(planned)
        tr.cpu_s, tr.losses = 0.0, []
    t0 = time.time()
    active = list(trainees)
    while active:
        for tr in list(active):
            tr.step()
            over = cpu_seconds is not None and tr.cpu_s > cpu_seconds * 1.05
            if tr.steps >= tr.planned or over:
                active.remove(tr)
            if tr.steps % log_every == 0:
                print(f"  {tr.name:<12} step {tr.steps}/{tr.planned} loss "
                      f"{np.mean(tr.losses[-log_every:]):.3f} cpu {tr.cpu_s:.0f}s "
                      f"(wall {time.time() - t0:.0f}s)", flush=True)  # fmt: skip
    for tr in trainees:
        tr.model.eval()
    return {
        tr.name: {
            "steps": tr.steps,
            "planned_steps": tr.planned,
            "cpu_s": tr.cpu_s,
            "final_train_loss": float(np.mean(tr.losses[-log_every:])),
        }
        for tr in trainees
    }


def expert_counts_fn(model):
    def f(x):
        return model(x)["expert_counts"].double()

    return f


def load_stats(counts) -> dict:
    """Per-layer max/mean expert load and the smallest expert share, from (L, E)."""
    share = counts / counts.sum(dim=1, keepdim=True)
    return {
        "max_over_mean_per_layer": (counts.max(1).values / counts.mean(1)).tolist(),
        "min_share_per_layer": share.min(1).values.tolist(),
    }
