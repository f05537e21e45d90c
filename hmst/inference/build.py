"""Assemble a complete HMST system around a trained LM, for the fact-QA world.

    python -m hmst.inference.build --model checkpoints/qa/lm --out checkpoints/qa/system

Steps (each one's numbers are printed and stored in the manifest's `extra`):
  1. retriever   InfoNCE on (prompt of a `reading` question, its statement); the
                 valid-hit threshold `min_score` fitted on held-out reading subjects
                 (own statement vs best hit for a subject that is not stored), and
                 per store size (`size_floors`: a small buffer needs a lower cut)
  2. semantic    FAISS memory of every `semantic` fact's statement
  3. episodic    an empty recent-interaction buffer keyed by the same embeddings
  4. critic      CriticModel on (question, evidence, answer) from `reading` facts:
                 correct vs same-typed wrong answers, and answers with no supporting
                 evidence (evidence about other people, or none) as unsupported
  5. early exit  exit heads trained on the QA corpus (hmst.training.early_exit_train,
                 which tunes a threshold for <= 1% higher corpus perplexity), then
                 the threshold re-tuned on answers (`tune_exit_threshold`): the
                 lowest one whose early-exit answers equal the full model's on
                 >= `--exit-agreement` of held-out train-part questions. On the QA
                 corpus the perplexity rule picks 0 (every token exits at block 0:
                 the adapted head fits the templated text better than the full
                 model), which changed 39% of answers; 0.95 changes none of
                 the 200 and still exits (3.57 blocks per decoded token)
  6. save        `HMSTInferenceEngine.save_pretrained(out)` (no controller yet: that
                 is `python -m hmst.training.rl_train --checkpoint OUT`)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

from hmst.models.early_exit import NEVER
from hmst.qa import GROUPS, format_prompt, make_world, write_corpus

PROG = "hmst.inference.build"


def fail(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _split(facts, frac: float, salt: str):
    from hmst.qa import _hash01

    a = [f for f in facts if _hash01(f.subject, salt) >= frac]
    b = [f for f in facts if _hash01(f.subject, salt) < frac]
    return a, b


def build_retriever(
    model, tok, world, steps: int, num_facts: int = 12000, sif_a=1e-3, log=print
):
    """Train on `num_facts` reading facts of people outside every world group (90%),
    fit `min_score` on the rest: half their people stored, the other half's questions
    have nothing stored (their best hit is a negative); `size_floors` the same way
    against stores of 1..256 of those statements. `sif_a`: SIF pooling (see
    `hmst.memory.retriever`; 0 = plain means)."""
    from hmst.memory.retriever import (
        Retriever,
        RetrieverConfig,
        fit_min_score,
        fit_size_floors,
        train_retriever,
    )
    from hmst.qa import reading_facts

    held = {
        f.subject
        for g in ("known", "semantic", "episodic", "unanswerable")
        for f in world[g]
    }
    facts = [
        f for f in reading_facts(world, num_facts, seed=3) if f.subject not in held
    ]
    train, val = _split(facts, 0.1, "retriever")
    cfg = RetrieverConfig(
        d_model=model.config.d_model, sif_a=sif_a, vocab_size=model.config.vocab_size
    )
    r = Retriever(cfg)
    if sif_a > 0:  # token frequencies of the training questions and statements
        texts = [format_prompt(f.question) for f in train]
        r.fit_token_weights(tok.encode(t) for t in texts + [f.statement for f in train])
    feats = {}
    for name, part in (("train", train), ("val", val)):
        q = r.features(model, tok, [format_prompt(f.question) for f in part])
        d = r.features(model, tok, [f.statement for f in part])
        feats[name] = (q, d)
    t0 = time.time()
    losses = train_retriever(r, *feats["train"], steps=steps)
    with torch.no_grad():
        q = r.embed_features(feats["val"][0], "query")
        d = r.embed_features(feats["val"][1], "doc")
        subjects = sorted({f.subject for f in val})
        stored_subj = set(subjects[::2])
        stored = torch.tensor([f.subject in stored_subj for f in val])
        store_rows = stored.nonzero().squeeze(1)
        sims = q @ d[store_rows].T  # (val questions, stored statements)
        own_col = torch.full((len(val),), -1, dtype=torch.long)
        own_col[store_rows] = torch.arange(len(store_rows))
        pos = sims[stored, own_col[stored]]
        neg = sims[~stored].max(1).values
        top1 = (sims[stored].argmax(1) == own_col[stored]).float().mean()
    min_score = fit_min_score(pos, neg)
    r.config.min_score = min_score
    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, len(store_rows)]
    r.config.size_floors = fit_size_floors(pos, sims[~stored], sizes)
    stats = dict(
        train_facts=len(train),
        val_facts=len(val),
        steps=steps,
        loss_first=sum(losses[:10]) / 10,
        loss_last=sum(losses[-10:]) / 10,
        seconds=round(time.time() - t0, 1),
        val_top1=float(top1),
        min_score=min_score,
        val_pos_above=float((pos >= min_score).float().mean()),
        val_neg_below=float((neg < min_score).float().mean()),
        size_floors=r.config.size_floors,
    )
    log(f"retriever: {json.dumps(stats)}")
    return r.eval(), stats


def critic_examples(facts, base, seed: int):
    """Critic training examples from `facts` (see the module docstring)."""
    from hmst.facts import make_critic_pairs
    from hmst.training.critic_train import Example, _pair_examples

    rng = random.Random(seed)
    out, pid = [], 0
    for p in make_critic_pairs(facts, base, seed=seed, sentence_fraction=0.0):
        out += _pair_examples(
            pid, p.question, p.evidence, p.correct, p.corrupted, p.kind
        )
        pid += 1
    # unsupported: a plausible answer with evidence about other people, or none
    for f in facts:
        others = [rng.choice(base).statement for _ in range(rng.randint(0, 2))]
        others = [s for s in others if f.subject not in s]
        wrong = rng.choice([g.value for g in base if g.value_type == f.value_type])
        answer = f.value if rng.random() < 0.5 else wrong
        out.append(
            Example(f.question, " ".join(others), answer, 0, pid, True, "unsupported")
        )
        pid += 1
    return out


def build_critic(world, steps: int, seed: int, log=print):
    from hmst.configs.model_config import CriticConfig
    from hmst.eval_metrics import auroc
    from hmst.models.critic import CriticModel
    from hmst.training.critic_train import (
        encode_all,
        evaluate,
        features_and_logits,
        fit_temperature,
        train_correctness,
        train_tokenizer,
    )

    train_f, val_f = _split(world["reading"], 0.1, "critic")
    base = world["reading"]
    train = critic_examples(train_f, base, seed)
    val = critic_examples(val_f, base, seed + 1)
    tok = train_tokenizer(train, 2048)
    cfg = CriticConfig(vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    model = CriticModel(cfg)
    enc_tr, enc_va = encode_all(tok, train, cfg), encode_all(tok, val, cfg)
    y_tr, y_va = [e.label for e in train], [e.label for e in val]
    train_correctness(model, enc_tr, y_tr, enc_va, y_va, steps, seed=seed, log=log)
    _, val_logits = features_and_logits(model, enc_va)
    temperature = fit_temperature(model, val_logits, y_va)
    metrics = evaluate(model, enc_va, val)
    metrics["temperature"] = temperature
    s = features_and_logits(model, enc_va)[1].numpy()
    unsup = [i for i, e in enumerate(val) if e.kind == "unsupported"]
    pos = [i for i, e in enumerate(val) if e.label == 1]
    metrics["auroc_supported_vs_unsupported"] = auroc(
        s[pos + unsup], [1] * len(pos) + [0] * len(unsup)
    )
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    log(f"critic: {json.dumps(scalars)}")
    return (model.eval(), tok), metrics


def build_early_exit(model_dir: str, corpus: str, out_dir: str, steps: int):
    from hmst.training import early_exit_train

    meta = early_exit_train.main(
        ["--checkpoint", model_dir, "--output", out_dir, "--data", corpus,
         "--steps", str(steps), "--val-split", "0.05", "--tune-on", "train-tail",
         "--tune-fraction", "0.05", "--tune-windows", "48", "--test-windows", "48"]
    )  # fmt: skip
    return meta


EXIT_GRID = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


@torch.no_grad()
def tune_exit_threshold(engine, items, min_agreement: float, log=print) -> dict:
    """Set `engine.early_exit`'s threshold to the lowest of EXIT_GRID whose answers
    (both memories read, no verification, greedy) equal the full model's on at least
    `min_agreement` of `items` ((category, fact, buffer) from `sample_questions`);
    none: never exit. Returns the agreement and block count per threshold."""
    from hmst.inference.env import set_conversation

    heads = engine.early_exit
    decide = dict(episodic=True, semantic=True, verification=False)

    def answers(early_exit: bool):
        out, blocks = [], []
        for _, fact, buffer in items:
            set_conversation(engine, buffer)
            r = engine.answer(
                fact.question, decisions=dict(decide, early_exit=early_exit)
            )
            out.append(r.raw_answer)
            blocks.append(r.blocks_per_token)
        engine.clear_episodic()
        return out, sum(blocks) / len(blocks)

    full, _ = answers(False)
    grid, chosen = {}, None
    for t in EXIT_GRID:
        heads.config.threshold = t
        got, blocks = answers(True)
        agree = sum(a == b for a, b in zip(got, full)) / len(full)
        grid[str(t)] = dict(agreement=agree, blocks_per_token=blocks)
        log(f"exit threshold {t}: answers equal to the full model's {agree:.1%}, "
            f"{blocks:.2f} blocks per token")  # fmt: skip
        if agree >= min_agreement:
            chosen = t
            break
    heads.config.threshold = NEVER if chosen is None else chosen
    log(f"early exit threshold: {heads.config.threshold} (answers agree >= "
        f"{min_agreement:.0%} on {len(items)} questions)")  # fmt: skip
    return dict(threshold=heads.config.threshold, questions=len(items), grid=grid)


def build(args, log=print) -> dict:
    from hmst.checkpoint import load_pretrained, resolve
    from hmst.inference.engine import EngineConfig, HMSTInferenceEngine
    from hmst.memory.episodic import EpisodicMemory
    from hmst.memory.semantic import SemanticMemory
    from hmst.training.early_exit_train import load_heads

    torch.manual_seed(args.seed)
    model_dir = resolve(args.model)
    model, tok, _ = load_pretrained(model_dir)
    model.eval().requires_grad_(False)
    world = make_world(args.num_subjects, args.world_seed)
    log(f"world: {json.dumps({g: len(world[g]) for g in GROUPS})}")
    retriever, r_stats = build_retriever(
        model, tok, world, args.retriever_steps, sif_a=args.sif_a, log=log
    )
    semantic = SemanticMemory(dimension=retriever.dim, max_entries=1_000_000)
    episodic = EpisodicMemory(None, max_entries=64, d_model=retriever.dim)
    critic, c_stats = build_critic(world, args.critic_steps, args.seed, log)
    heads, ee_stats = None, None
    if args.early_exit_steps > 0:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = os.path.join(tmp, "qa_corpus.txt")
            write_corpus(world, corpus, seed=args.world_seed + 7, known_repeats=4)
            meta = build_early_exit(
                model_dir, corpus, os.path.join(tmp, "ee"), args.early_exit_steps
            )
            heads = load_heads(os.path.join(tmp, "ee"), model)
            ee_stats = dict(threshold=heads.config.threshold, test=meta["test"])
    engine = HMSTInferenceEngine(
        model, tok, retriever=retriever, semantic=semantic, episodic=episodic,
        critic=critic, early_exit=heads, config=EngineConfig(), policy="fixed",
    )  # fmt: skip
    facts = world["semantic"]
    t0 = time.time()
    engine.add_knowledge(
        [f.statement for f in facts],
        [{"subject": f.subject, "relation": f.relation} for f in facts],
    )
    log(f"semantic memory: {len(semantic)} statements in {time.time() - t0:.1f}s")
    if heads is not None:
        from hmst.inference.env import sample_questions

        items = sample_questions(world, "train", args.exit_questions // 4, seed=99)
        ee_stats["corpus_threshold"] = ee_stats.pop("threshold")
        ee_stats.update(tune_exit_threshold(engine, items, args.exit_agreement, log))
    extra = dict(
        world=dict(num_subjects=args.num_subjects, seed=args.world_seed),
        retriever=r_stats,
        critic={k: v for k, v in c_stats.items() if not isinstance(v, (list, dict))},
        early_exit=ee_stats,
        base_model=model_dir,
    )
    engine.save_pretrained(args.out, extra=extra)
    log(f"wrote {args.out}")
    return extra


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="trained LM checkpoint (train.py)")
    p.add_argument("--out", required=True, help="system directory to write")
    p.add_argument("--num-subjects", type=int, default=1600)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--retriever-steps", type=int, default=600)
    p.add_argument("--sif-a", type=float, default=1e-3,
                   help="retriever SIF pooling weight a (0: plain means)")  # fmt: skip
    p.add_argument("--critic-steps", type=int, default=800)
    p.add_argument("--early-exit-steps", type=int, default=200, help="0: no exit heads")
    p.add_argument("--exit-agreement", type=float, default=0.99,
                   help="early exit: least share of answers equal to the full "
                   "model's (tunes the exit threshold)")  # fmt: skip
    p.add_argument(
        "--exit-questions",
        type=int,
        default=200,
        help="train-part questions the exit threshold is tuned on",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=None)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if not os.path.isdir(args.model):
        fail(f"no such model checkpoint: {args.model}")
    if not 0.0 < args.exit_agreement <= 1.0:
        fail(f"--exit-agreement must be in (0, 1], got {args.exit_agreement}")
    if args.exit_questions < 4:
        fail(f"--exit-questions must be >= 4, got {args.exit_questions}")
    try:
        return build(args)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
