"""Supervised fine-tuning of the fact-QA LM: loss on the answer tokens only.

    python -m hmst.training.qa_sft --model checkpoints/qa/lm_run/best \
        --out checkpoints/qa/lm

Pretraining (train.py on `scripts/make_qa_corpus.py` text) spends most of its loss on
tokens nobody can predict (generated names, the question); the answer is a few tokens.
This stage trains only those: each batch is a mix of
  reading  a fresh person's fact (never seen before) with its statement in context
           among distractors: 0-3 other facts of the same person (what a search of a
           memory holding all of them returns) and the same relation of another
           person, so the only way to the answer is reading the context
  replay   `known` facts, bare or with an irrelevant context line, so what the model
           knows is not forgotten (without replay, known-fact EM fell from 97% to 15%
           in 400 steps; with 30% replay it stays at 98%)
  namesake half of the other-person lines (reading and replay) are the same relation
           of a near-namesake (`hmst.facts.near_namesake`: "Stosti Loboukrou" vs
           "Stodusti Lobou"), the line a dense search of memory confuses with the
           asked person. Measured on the QA LM, every known fact asked with one such
           line in context: 75.0% exact match after the SFT without them, 98.7%
           after 1400 more steps with them (bare: 100% both; `evaluate_reader`)
and the loss is cross-entropy on " answer\\n" given the prompt. Measured on the QA LM
(400 steps): reading with the right statement in context 94.3% -> 97.7% exact match.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from hmst.facts import make_fact_base, namesake_fact
from hmst.qa import VALUE_RELATIONS, format_prompt, make_world, reading_facts

PROG = "qa_sft"


def make_sampler(
    world, tokenizer, seed: int = 0, replay: float = 0.3, namesakes: bool = True
):
    """A function returning one (prompt ids, answer ids) example per call."""
    rng = random.Random(seed)
    skip = {f.subject for f in world["reading"]}
    facts = [
        f for f in reading_facts(world, 200_000, seed=seed + 7) if f.subject not in skip
    ]
    by_rel: dict[str, list] = {}
    by_subj: dict[str, list] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
        by_subj.setdefault(f.subject, []).append(f)
    known = world["known"]
    taken = {f.subject for g in world.groups.values() for f in g} | set(by_subj)

    def other(f):
        """A statement of the same relation about someone else."""
        if not namesakes or rng.random() < 0.5:
            return rng.choice(by_rel[f.relation]).statement
        return namesake_fact(f, rng, taken).statement

    def sample():
        if rng.random() < replay:
            f = rng.choice(known)
            ev = [other(f)] if rng.random() < 0.4 else []
        else:
            f = rng.choice(facts)
            ev = [f.statement]
            same = [g for g in by_subj[f.subject] if g != f]
            # as a top-3 search of a memory holding every fact of the person returns
            ev += [g.statement for g in rng.sample(same, rng.randint(0, len(same)))]
            if rng.random() < 0.5:
                ev.append(other(f))
            rng.shuffle(ev)
        prompt = tokenizer.encode(format_prompt(f.question, ev))
        return prompt, tokenizer.encode(" " + f.answer + "\n")

    return sample


def collate(batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and targets (-100 everywhere but the answer tokens)."""
    T = max(len(p) + len(a) for p, a in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    tgt = torch.full((len(batch), T), -100, dtype=torch.long)
    for i, (p, a) in enumerate(batch):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        tgt[i, len(p) - 1 : len(seq) - 1] = torch.tensor(a)
    return ids.to(device), tgt.to(device)


def train_sft(
    model, sample, steps: int, batch_size: int = 32, lr: float = 3e-4, log=print
):
    """AdamW with linear warmup (5%) and cosine decay; returns the loss per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    device = model.embed.weight.device
    warm = max(1, steps // 20)
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        scale = (
            (step + 1) / warm
            if step < warm
            else 0.5
            * (
                1
                + torch.cos(
                    torch.tensor(torch.pi * (step - warm) / max(1, steps - warm))
                )
            ).item()
        )
        for g in opt.param_groups:
            g["lr"] = lr * scale
        ids, tgt = collate([sample() for _ in range(batch_size)], device)
        out = model(ids, targets=tgt, return_logits=False)
        loss = out["loss"] + out["aux_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out["loss"].item())
        if log and ((step + 1) % 100 == 0 or step + 1 == steps):
            recent = sum(losses[-100:]) / len(losses[-100:])
            log(
                f"step {step + 1}/{steps} answer loss {recent:.4f} "
                f"({time.time() - t0:.0f}s)"
            )
    model.eval()
    return losses


@torch.no_grad()
def answer_accuracy(model, tokenizer, items, batch_size: int = 64) -> float:
    """Greedy exact match of (question, evidence, answer) items, teacher-forced: an
    item counts when every token of " answer\n" is the argmax after the prompt and
    the answer's earlier tokens, which is when greedy decoding writes exactly it."""
    model.eval()
    right = 0
    for i in range(0, len(items), batch_size):
        batch = [
            (tokenizer.encode(format_prompt(q, ev)), tokenizer.encode(f" {a}\n"))
            for q, ev, a in items[i : i + batch_size]
        ]
        ids, tgt = collate(batch, model.embed.weight.device)
        pred = model(ids)["logits"].argmax(-1)
        right += ((pred == tgt) | (tgt == -100)).all(1).sum().item()
    return right / len(items)


def evaluate_reader(model, tokenizer, world, seed: int = 99) -> dict:
    """Exact match of the fine-tuned LM as a reader: its known facts bare and with a
    near-namesake's line in context; held-out people's facts (generated apart from the
    SFT's, never trained on) from their statement alone, with two more of the same
    person's, and with a near-namesake's line."""
    rng = random.Random(seed)
    fresh = make_fact_base(
        4000, seed=world.seed + 5000 + seed, relations=VALUE_RELATIONS
    )
    taken = {f.subject for g in world.groups.values() for f in g}
    fresh = [f for f in fresh if f.subject not in taken][:1000]
    taken |= {f.subject for f in fresh}
    by_subj: dict[str, list] = {}
    for f in fresh:
        by_subj.setdefault(f.subject, []).append(f)

    def item(f, lines):
        rng.shuffle(lines)
        return f.question, lines, f.answer

    known = world["known"]
    cases = {
        "known": [item(f, []) for f in known],
        "known + namesake line": [
            item(f, [namesake_fact(f, rng, taken).statement]) for f in known
        ],
        "held-out, own line": [item(f, [f.statement]) for f in fresh],
        "held-out + 2 same-person lines": [
            item(f, [g.statement for g in by_subj[f.subject][:3]])
            for f in fresh
            if f in by_subj[f.subject][:3]
        ],
        "held-out + namesake line": [
            item(f, [f.statement, namesake_fact(f, rng, taken).statement])
            for f in fresh
        ],
    }
    return {k: answer_accuracy(model, tokenizer, v) for k, v in cases.items()}


def main(argv=None):
    from hmst.checkpoint import load_pretrained, save_model_dir

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="pretrained QA LM checkpoint")
    p.add_argument("--out", help="directory for the fine-tuned model")
    p.add_argument("--eval-only", action="store_true",
                   help="only print the reader exact match of --model")  # fmt: skip
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--replay", type=float, default=0.3)
    p.add_argument("--no-namesakes", dest="namesakes", action="store_false",
                   help="no near-namesake distractor lines")  # fmt: skip
    p.add_argument("--num-subjects", type=int, default=1600)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.steps <= 0 or not (args.out or args.eval_only):
        what = "--steps must be positive" if args.steps <= 0 else "--out is required"
        print(f"{PROG}: error: {what}", file=sys.stderr)
        raise SystemExit(2)
    try:
        model, tok, _ = load_pretrained(args.model)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    torch.manual_seed(args.seed)
    world = make_world(args.num_subjects, args.world_seed)
    if not args.eval_only:
        sample = make_sampler(world, tok, args.seed, args.replay, args.namesakes)
        train_sft(model, sample, args.steps, args.batch_size, args.lr)
        save_model_dir(args.out, model, tok)
        print(f"wrote {args.out}")
    print(f"reader exact match: {json.dumps(evaluate_reader(model, tok, world))}")


if __name__ == "__main__":
    main()
