"""`train.py` flags -> HMSTConfig + DataArgs -> `pretrain.run`.

Precedence: preset (--model-size) < --config FILE < --set section.field=value < flags.
"""

from __future__ import annotations

import argparse
import os
import sys

from hmst.configs.model_config import (
    PRESETS,
    apply_overrides,
    get_config,
    load_yaml_overrides,
)

# flag -> config field, applied only when the flag is given
FLAG_FIELDS = {
    "epochs": "train.epochs",
    "steps_per_epoch": "train.steps_per_epoch",
    "max_steps": "train.max_steps",
    "max_time": "train.max_time",
    "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate",
    "warmup_steps": "train.warmup_steps",
    "eval_every": "train.eval_every",
    "eval_batches": "train.eval_batches",
    "patience": "train.patience",
    "save_every": "train.save_every",
    "log_every": "train.log_every",
    "audit_every": "train.audit_every",
    "audit_layers": "train.audit_layers",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "use_8bit_optimizer": "train.use_8bit_optimizer",
    "mixed_precision": "train.mixed_precision",
    "seed": "train.seed",
    "early_exit_loss": "train.early_exit_loss",
    "val_split": "train.val_split",
    "num_threads": "train.num_threads",
    "seq_len": "model.max_seq_len",
    "vocab_size": "model.vocab_size",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Pretrain the HMST MoE language model (Accelerate: 1 CPU, 1 GPU "
        "or N processes via torchrun / accelerate launch).",
    )
    p.add_argument("data", nargs="+", help="text files/dirs, or --pretokenized dirs")
    p.add_argument("--model-size", default="micro", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--config", help="YAML/JSON file of config sections to override")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable), e.g. --set model.d_ff=512",
    )  # fmt: skip
    p.add_argument("--output-dir", default="checkpoints/run")
    p.add_argument(
        "--pretokenized", action="store_true", help="data are preprocess_data.py dirs"
    )
    val = p.add_mutually_exclusive_group()
    val.add_argument(
        "--val-split", type=float, help="hold out this fraction (the tail)"
    )
    val.add_argument(
        "--val-file", nargs="+", help="separate validation text files/dirs"
    )
    p.add_argument(
        "--tokenizer-path", help="reuse a tokenizer.json (or a checkpoint dir)"
    )
    p.add_argument(
        "--resume", help="'auto' (OUTPUT_DIR/last if present) or a checkpoint dir"
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument(
        "--max-time", type=float, help="seconds; then evaluate, save and stop"
    )
    p.add_argument(
        "--batch-size", type=int, help="sequences per micro-batch per process"
    )
    p.add_argument("--gradient-accumulation-steps", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--eval-every", type=int, help="optimizer steps between evals/saves")
    p.add_argument("--eval-batches", type=int)
    p.add_argument(
        "--patience", type=int, help="evals without improvement before stopping"
    )
    p.add_argument(
        "--save-every", type=int, help="keep an epoch_N snapshot every N epochs"
    )
    p.add_argument("--log-every", type=int)
    p.add_argument(
        "--audit-every", type=int,
        help="probe-set audit every N steps (default: at each eval; 0: never)",
    )  # fmt: skip
    p.add_argument(
        "--audit-layers", nargs="+", metavar="PATH",
        help="module paths the audit summarises (default layers[0].moe layers[-1].moe)",
    )  # fmt: skip
    p.add_argument("--seq-len", type=int, help="context length (model.max_seq_len)")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary to train")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--early-exit-loss", type=float,
        help="weight of a LayerSkip-style loss at one intermediate block per step",
    )  # fmt: skip
    p.add_argument("--num-threads", type=int, help="torch CPU threads per process")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--use-8bit-optimizer", action="store_true", default=None)
    p.add_argument("--mixed-precision", action="store_true", default=None)
    p.add_argument(
        "--gpu-ids", type=int, nargs="+", help="restrict to these CUDA devices"
    )
    return p


def config_from_args(args):
    cfg = get_config(args.model_size)
    name = cfg.name
    overrides = load_yaml_overrides(args.config) if args.config else {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        overrides[key.strip()] = value.strip()
    for flag, key in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    cfg = apply_overrides(cfg, overrides)
    cfg.name = name
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from hmst.training.pretrain import DataArgs, run

    try:
        if args.gpu_ids is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, args.gpu_ids))
        cfg = config_from_args(args)
        data = DataArgs(
            inputs=args.data,
            output_dir=args.output_dir,
            pretokenized=args.pretokenized,
            val_file=args.val_file,
            tokenizer_path=args.tokenizer_path,
            resume=args.resume,
        )
        run(cfg, data)
    except (ValueError, OSError, ImportError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0
