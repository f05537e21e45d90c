"""Stage 1 pretraining: one Accelerate code path for 1 CPU process, 1 GPU or N ranks.

    prepare data -> build model/optimizer -> (resume) -> loop:
        sample the global batch -> per micro-batch: forward, backward (accumulate)
        -> clip -> step -> log -> eval + checkpoint every `eval_every` steps

Exactness across process counts: every rank draws the same global batch from the
sampler's own generator and takes its slice; the load-balancing loss uses the
expert counts summed over ranks, so N processes follow the 1-process trajectory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, gather_object, set_seed
from tqdm.auto import tqdm

from hmst import checkpoint as ckpt
from hmst.configs.model_config import HMSTConfig
from hmst.data import (
    BatchSampler,
    TokenData,
    eval_windows,
    load_pretokenized,
    read_documents,
    split_documents_tail,
    tokenize_documents,
)
from hmst.models.base_moe import BaseMoEModel
from hmst.models.moe import load_balance_loss
from hmst.observe.audit import ProbeAudit, RoutingStats
from hmst.tokenizer import HMSTTokenizer
from hmst.training.optim import build_optimizer, build_scheduler


@dataclass
class DataArgs:
    """Where the data, tokenizer and outputs live (the non-hyperparameter flags)."""

    inputs: list[str]
    output_dir: str = "checkpoints/run"
    pretokenized: bool = False
    val_file: list[str] | None = None
    tokenizer_path: str | None = None
    resume: str | None = None
    """'auto' (output_dir/last if present) or a checkpoint directory."""
    extra_meta: dict = field(default_factory=dict)


def pick_mixed_precision(requested: bool) -> str:
    """bf16 only where it is fast; fp16 (with loss scaling) on older GPUs; else fp32."""
    if not requested:
        return "no"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    print(
        "warning: --mixed-precision ignored on CPU (bf16 matmul is far slower than "
        "fp32 on CPUs without bf16 units); training in fp32",
        file=sys.stderr,
    )
    return "no"


# -- data ---------------------------------------------------------------------------


def load_tokenizer_for_run(acc, cfg, args: DataArgs, resume_dir, texts):
    """--tokenizer-path, else the resumed checkpoint's, else the pre-tokenized data's,
    else a new one trained on the training text (by rank 0, then loaded by all)."""
    if args.tokenizer_path:
        return HMSTTokenizer.load(args.tokenizer_path)
    if resume_dir:
        return ckpt.load_tokenizer(resume_dir)
    if args.pretokenized:
        return HMSTTokenizer.load(args.inputs[0])
    path = os.path.join(args.output_dir, "tokenizer.json")
    if acc.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        HMSTTokenizer.train(texts, cfg.model.vocab_size).save(path)
    acc.wait_for_everyone()
    return HMSTTokenizer.load(path)


def prepare_data(acc, cfg: HMSTConfig, args: DataArgs, resume_dir: str | None):
    """(tokenizer, train TokenData, val TokenData | None)."""
    if args.pretokenized:
        tokenizer = load_tokenizer_for_run(acc, cfg, args, resume_dir, None)
        train = TokenData(
            [s for d in args.inputs for s in load_pretokenized(d, tokenizer).segments]
        )
        val = None
        if args.val_file:
            val = TokenData(
                [
                    s
                    for d in args.val_file
                    for s in load_pretokenized(d, tokenizer).segments
                ]
            )
        elif cfg.train.val_split:
            train, val = train.split_tail(cfg.train.val_split)
        return tokenizer, train, val

    docs = read_documents(args.inputs)
    val_docs = None
    if args.val_file:
        val_docs = read_documents(args.val_file)
    elif cfg.train.val_split:
        docs, val_docs = split_documents_tail(docs, cfg.train.val_split)
    tokenizer = load_tokenizer_for_run(acc, cfg, args, resume_dir, docs)
    train = TokenData([tokenize_documents(tokenizer, docs)])
    val = TokenData([tokenize_documents(tokenizer, val_docs)]) if val_docs else None
    return tokenizer, train, val


# -- evaluation -----------------------------------------------------------------------


@torch.no_grad()
def evaluate(acc, model, windows, byte_len, batch_size) -> dict:
    """Validation loss (nats/token), perplexity and bits-per-byte over `windows`,
    split across ranks and summed."""
    model.eval()
    mine = windows[acc.process_index :: acc.num_processes]
    nats = torch.zeros((), dtype=torch.float64, device=acc.device)
    count = torch.zeros((), dtype=torch.float64, device=acc.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=acc.device)
    for i in range(0, len(mine), batch_size):
        w = torch.from_numpy(np.stack(mine[i : i + batch_size]).astype(np.int64))
        x, y = w[:, :-1].to(acc.device), w[:, 1:].to(acc.device)
        with acc.autocast():
            logits = model(x)["logits"]
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), reduction="sum"
        )
        nats += ce.double()
        count += y.numel()
        nbytes += byte_len[y].sum().double()
    totals = acc.reduce(torch.stack([nats, count, nbytes]), "sum")
    model.train()
    loss = (totals[0] / totals[1]).item()
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50)),
        "val_bpb": (totals[0] / math.log(2) / totals[2]).item(),
        "val_tokens": int(totals[1].item()),
    }


# -- checkpointing --------------------------------------------------------------------


def save_training_checkpoint(
    acc, path, model, cfg, tokenizer, optimizer, sched, sampler, meta
):
    """Every rank calls this (the RNG gather is a collective); rank 0 writes."""
    rng = gather_object([torch.get_rng_state()])
    cuda_rng = gather_object(
        [torch.cuda.get_rng_state() if torch.cuda.is_available() else None]
    )
    if acc.is_main_process:
        tensors = {
            "optimizer": optimizer.state_dict(),
            "scheduler": sched.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": rng,
        }
        if cuda_rng[0] is not None:
            tensors["cuda_rng"] = cuda_rng
        ckpt.save_checkpoint(
            path, acc.unwrap_model(model), cfg, tokenizer, dict(meta), tensors
        )
    acc.wait_for_everyone()


def resolve_resume(args: DataArgs) -> str | None:
    if not args.resume:
        return None
    if args.resume == "auto":
        last = os.path.join(args.output_dir, "last")
        try:
            return ckpt.resolve(last)
        except FileNotFoundError:
            return None
    return ckpt.resolve(args.resume)


# -- the loop -----------------------------------------------------------------------


def run(cfg: HMSTConfig, args: DataArgs) -> dict:
    """Train; returns a summary dict (final/best val metrics, steps, tokens, time)."""
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    # cpu=True on GPU-less machines: without it Accelerate does not form the gloo group
    # under torchrun and every rank trains alone.
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=pick_mixed_precision(tc.mixed_precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=tc.gradient_accumulation_steps, sync_with_dataloader=False
        ),
    )
    set_seed(tc.seed)  # identical init on every rank
    resume_dir = resolve_resume(args)
    meta = {"step": 0, "epoch": 0, "best_val_loss": None, "bad_evals": 0, "tokens": 0}
    if resume_dir:
        # The checkpoint's model config wins; only its vocab may differ from the preset
        # (a trained tokenizer can have fewer merges than asked for).
        saved_model = ckpt.load_config(resume_dir).model

        def arch(m):
            return dataclasses.replace(m, vocab_size=1, n_kv_heads=m.kv_heads)

        if arch(saved_model) != arch(cfg.model):
            raise ValueError(
                f"--resume {resume_dir}: its model config differs from this run's "
                "(use the same --model-size / --config)"
            )
        cfg.model = saved_model

    tokenizer, train_data, val_data = prepare_data(acc, cfg, args, resume_dir)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        if resume_dir:
            raise ValueError(
                f"tokenizer vocab {tokenizer.vocab_size} does not match the "
                f"checkpoint's model vocab {cfg.model.vocab_size}"
            )
        cfg.model.vocab_size = tokenizer.vocab_size  # the tokenizer defines the vocab
    seq = cfg.model.max_seq_len
    sampler = BatchSampler(train_data, seq, tc.seed)
    val_windows = (
        eval_windows(val_data, seq, tc.eval_batches * tc.batch_size)
        if val_data
        else None
    )
    byte_len = torch.tensor(tokenizer.token_byte_lengths(), device=acc.device)

    global_batch = tc.batch_size * acc.num_processes
    step_tokens = global_batch * tc.gradient_accumulation_steps * seq
    steps_per_epoch = tc.steps_per_epoch or max(1, train_data.num_tokens // step_tokens)
    # As in HF Trainer: max_steps, when given, overrides epochs.
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch

    model = BaseMoEModel(config=cfg.model)
    if resume_dir:
        model = ckpt.load_model(resume_dir, config=cfg)
    model.gradient_checkpointing_enable(tc.gradient_checkpointing)
    model.to(acc.device)
    optimizer = build_optimizer(
        model, tc.learning_rate, tc.weight_decay, tc.betas, tc.use_8bit_optimizer
    )
    sched = build_scheduler(optimizer, tc.warmup_steps, total_steps, tc.min_lr_ratio)
    model, optimizer = acc.prepare(model, optimizer)

    if resume_dir:
        saved_meta, tensors = ckpt.load_trainer_state(resume_dir)
        meta.update(saved_meta)
        optimizer.load_state_dict(tensors["optimizer"])
        sched.load_state_dict(tensors["scheduler"])
        sampler.load_state_dict(tensors["sampler"])
        if len(tensors["rng"]) == acc.num_processes:
            torch.set_rng_state(tensors["rng"][acc.process_index])
            if "cuda_rng" in tensors and torch.cuda.is_available():
                torch.cuda.set_rng_state(tensors["cuda_rng"][acc.process_index])

    main = acc.is_main_process
    routing = RoutingStats(cfg.model.n_layers, cfg.model.n_experts, acc.device)
    audit_every = tc.eval_every if tc.audit_every is None else tc.audit_every
    probe = None
    if audit_every and main and val_windows is not None:
        probe_ids = torch.from_numpy(np.stack(val_windows[:4]).astype(np.int64))
        probe = ProbeAudit(acc.unwrap_model(model), probe_ids[:, :-1], tc.audit_layers)
    if main:
        os.makedirs(args.output_dir, exist_ok=True)
        cfg.save(os.path.join(args.output_dir, "config.json"))
        n_total, n_active = cfg.model.num_params(), cfg.model.num_params(active=True)
        print(
            f"hmst: {cfg.name} model {n_total / 1e6:.2f}M params "
            f"({n_active / 1e6:.2f}M "
            f"active) | vocab {tokenizer.vocab_size} | train {train_data.num_tokens:,} "
            f"tokens, val {val_data.num_tokens if val_data else 0:,} | "
            f"{acc.num_processes} "
            f"process(es) on {acc.device}, {acc.mixed_precision} precision | "
            f"{total_steps} steps x {step_tokens:,} tokens"
            + (
                f" | resumed at step {meta['step']} from {resume_dir}"
                if resume_dir
                else ""
            ),
            flush=True,
        )
    metrics_f = (
        open(os.path.join(args.output_dir, "metrics.jsonl"), "a") if main else None
    )

    def log(record):
        if main:
            metrics_f.write(json.dumps(record) + "\n")
            metrics_f.flush()

    def checkpoint_and_eval(final=False) -> bool:
        """Evaluate, save last (+best). Returns True when patience is exhausted."""
        stop = False
        if val_windows is not None:
            ev = evaluate(
                acc, acc.unwrap_model(model), val_windows, byte_len, tc.batch_size
            )
            ev.update(step=meta["step"], kind="eval", time=time.time() - t_start)
            meta["last_eval"] = ev
            improved = (
                meta["best_val_loss"] is None or ev["val_loss"] < meta["best_val_loss"]
            )
            meta["bad_evals"] = 0 if improved else meta["bad_evals"] + 1
            if improved:
                meta["best_val_loss"] = ev["val_loss"]
            log(ev)
            if main:
                bar.write(
                    f"step {meta['step']}: val loss {ev['val_loss']:.4f} | ppl "
                    f"{ev['val_ppl']:.2f} | bpb {ev['val_bpb']:.4f}"
                    + (" *" if improved else "")
                )
            if improved:
                # `best` serves inference: weights, config, tokenizer; no optimizer.
                if acc.is_main_process:
                    ckpt.save_checkpoint(
                        os.path.join(args.output_dir, "best"),
                        acc.unwrap_model(model),
                        cfg,
                        tokenizer,
                        state_meta={**meta, "best_of_run": True},
                    )
                acc.wait_for_everyone()
            stop = tc.patience is not None and meta["bad_evals"] >= tc.patience
        save("last")
        return stop

    def save(name):
        save_training_checkpoint(
            acc, os.path.join(args.output_dir, name), model, cfg, tokenizer, optimizer,
            sched, sampler, meta,
        )  # fmt: skip

    bar = tqdm(
        total=total_steps, initial=meta["step"], disable=not main, dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0, desc="train",
    )  # fmt: skip
    t_start = time.time()
    t_log, tokens_since_log, loss_sum, loss_n = time.time(), 0, 0.0, 0
    model.train()
    stop_reason = "completed"
    n_exits, accum = cfg.model.n_layers - 1, tc.gradient_accumulation_steps
    exit_sums, exit_counts = {}, {}
    while meta["step"] < total_steps:
        step_loss = torch.zeros((), device=acc.device)
        step_exit = torch.zeros((), device=acc.device)
        step_counts = 0  # expert assignments of the global batch, summed over micro
        # early-exit loss: one intermediate block per step, rotating (resume-exact)
        exit_layer = None
        if tc.early_exit_loss > 0 and n_exits > 0:
            exit_layer = meta["step"] % n_exits
        for x, y in sampler.next_batches(
            global_batch,
            tc.gradient_accumulation_steps,
            acc.process_index,
            acc.num_processes,
        ):
            x, y = x.to(acc.device), y.to(acc.device)
            with acc.accumulate(model):
                with acc.autocast():
                    out = model(
                        x, targets=y, exit_layer=exit_layer, return_logits=False
                    )
                # Balance statistics over the global batch (exact across ranks).
                counts = acc.reduce(out["expert_counts"].detach(), "sum")
                lb = torch.stack(
                    [
                        load_balance_loss(c, p)
                        for c, p in zip(counts, out["router_probs"])
                    ]
                ).mean()
                loss = out["loss"] + (
                    cfg.model.load_balance_coef * lb
                    + cfg.model.router_z_coef * out["router_z_loss"]
                )
                if exit_layer is not None:
                    loss = loss + tc.early_exit_loss * out["exit_loss"]
                    step_exit += out["exit_loss"].detach() / accum
                routing.update(counts, out["router_entropy"], lb, out["router_z_loss"])
                step_counts = step_counts + counts
                acc.backward(loss)
                if acc.sync_gradients and tc.grad_clip > 0:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += out["loss"].detach() / tc.gradient_accumulation_steps
        sched.step()
        acc.unwrap_model(model).update_balance_bias(step_counts)
        meta["step"] += 1
        meta["tokens"] += step_tokens
        tokens_since_log += step_tokens
        step_loss = acc.reduce(step_loss, "mean").item()
        if exit_layer is not None:
            v = acc.reduce(step_exit, "mean").item()
            exit_sums[exit_layer] = exit_sums.get(exit_layer, 0.0) + v
            exit_counts[exit_layer] = exit_counts.get(exit_layer, 0) + 1
        loss_sum, loss_n = loss_sum + step_loss, loss_n + 1
        bar.update(1)
        if meta["step"] % tc.log_every == 0 or meta["step"] == total_steps:
            dt = time.time() - t_log
            rec = {
                "step": meta["step"],
                "kind": "train",
                "loss": loss_sum / loss_n,
                "step_loss": step_loss,
                "lr": sched.get_last_lr()[0],
                "grad_norm": float(grad_norm) if tc.grad_clip > 0 else None,
                **routing.summary(),
                "tokens": meta["tokens"],
                "tokens_per_s": tokens_since_log / dt,
                "time": time.time() - t_start,
            }
            if exit_counts:  # mean early-exit CE per block since the last record
                rec["exit_loss"] = {
                    str(i): exit_sums[i] / exit_counts[i] for i in sorted(exit_counts)
                }
                exit_sums, exit_counts = {}, {}
            log(rec)
            bar.set_postfix(
                loss=f"{rec['loss']:.3f}",
                lr=f"{rec['lr']:.2e}",
                tok_s=f"{rec['tokens_per_s']:.0f}",
            )
            t_log, tokens_since_log, loss_sum, loss_n = time.time(), 0, 0.0, 0
        new_epoch = meta["step"] % steps_per_epoch == 0
        if new_epoch:
            meta["epoch"] += 1
        # Every rank must take the same stop decision: rank 0's clock decides.
        out_of_time = torch.tensor(
            float(tc.max_time is not None and time.time() - t_start >= tc.max_time),
            device=acc.device,
        )
        out_of_time = acc.reduce(out_of_time, "sum").item() > 0
        if (
            meta["step"] % tc.eval_every == 0
            or meta["step"] == total_steps
            or out_of_time
        ):
            if checkpoint_and_eval():
                stop_reason = f"early stop: no improvement in {tc.patience} evals"
                break
        if probe is not None and meta["step"] % audit_every == 0:
            log(
                {
                    "step": meta["step"],
                    "kind": "audit",
                    **probe.run(acc.unwrap_model(model)),
                }
            )
        if new_epoch and tc.save_every and meta["epoch"] % tc.save_every == 0:
            save(f"epoch_{meta['epoch']}")
        if out_of_time:
            stop_reason = f"max time {tc.max_time:.0f}s reached"
            break
    bar.close()
    summary = {
        "kind": "summary",
        "stop_reason": stop_reason,
        "step": meta["step"],
        "tokens": meta["tokens"],
        "train_time_s": time.time() - t_start,
        "best_val_loss": meta["best_val_loss"],
        **{k: v for k, v in meta.get("last_eval", {}).items() if k.startswith("val_")},
    }
    log(summary)
    if main:
        metrics_f.close()
        print(
            f"hmst: {stop_reason} at step {meta['step']}; "
            f"checkpoints in {args.output_dir}"
        )
    acc.end_training()
    return summary
