"""Fact-QA world for the inference engine, the controller's environment and its bench.

Every question asks for one fact of a generated person (`hmst.facts`). The subjects
are split (by a hash of the name, so the split is stable) into five disjoint groups:

    known         in the LM's training text as bare Q/A: the model's own knowledge
    reading       in the LM's training text only with the fact in its context: teaches
                  the model to read evidence (and trains the retriever and critic)
    semantic      held out from training; stored in semantic memory (FAISS)
    episodic      held out from training; stated earlier in the same conversation
    unanswerable  held out everywhere: no source has them

So a `semantic` question can be answered only by reading semantic memory, an
`episodic` one only by reading the recent-interaction buffer, a `known` one from the
weights, and an `unanswerable` one not at all (the right move is to abstain). Each
held-out group is split again into a part the controller trains on and a test part.

Prompt format (the LM is trained on exactly this; evidence lines are optional):

    Context: Bolaro Keitu lives in Oslo.
    Question: In which city does Bolaro Keitu live?
    Answer: Oslo
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from hmst.facts import RELATIONS, Fact, make_fact_base

VALUE_RELATIONS = tuple(r for r in RELATIONS if r.value_type != "person")
CATEGORIES = ("known", "semantic", "episodic", "unanswerable")
GROUPS = ("known", "reading", "semantic", "episodic", "unanswerable")
DEFAULT_FRACTIONS = (0.08, 0.52, 0.14, 0.12, 0.14)
ABSTAIN = "I don't know."


def _hash01(text: str, salt: str) -> float:
    return int(hashlib.sha1(f"{salt}:{text}".encode()).hexdigest()[:8], 16) / 16**8


@dataclass
class QAWorld:
    groups: dict[str, list[Fact]]
    seed: int

    def __getitem__(self, group: str) -> list[Fact]:
        return self.groups[group]

    def part(self, group: str, part: str) -> list[Fact]:
        """`part` "train" (the controller's) or "test" (the bench's): half of each
        group by a second hash of the subject."""
        if part not in ("train", "test", "all"):
            raise ValueError(f"part must be train, test or all, not {part!r}")
        facts = self.groups[group]
        if part == "all":
            return list(facts)
        want_train = part == "train"
        return [f for f in facts if (_hash01(f.subject, "part") < 0.5) == want_train]


def make_world(
    num_subjects: int = 1600,
    seed: int = 0,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    relations_per_subject: int = 4,
) -> QAWorld:
    if len(fractions) != len(GROUPS) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be {len(GROUPS)} numbers summing to 1")
    facts = make_fact_base(
        num_subjects * relations_per_subject,
        seed=seed,
        relations_per_subject=relations_per_subject,
        relations=VALUE_RELATIONS,
    )
    edges = [sum(fractions[: i + 1]) for i in range(len(fractions))]
    groups: dict[str, list[Fact]] = {g: [] for g in GROUPS}
    for f in facts:
        b = _hash01(f.subject, f"group{seed}")
        i = next(i for i, e in enumerate(edges) if b < e or i == len(edges) - 1)
        groups[GROUPS[i]].append(f)
    return QAWorld(groups, seed)


def format_prompt(question: str, evidence: list[str] | tuple[str, ...] = ()) -> str:
    question = question.strip()
    if not question:
        raise ValueError("empty question")
    lines = [f"Context: {e.strip()}" for e in evidence if e.strip()]
    return "\n".join(lines + [f"Question: {question}", "Answer:"])


def format_example(question: str, answer: str, evidence=()) -> str:
    return f"{format_prompt(question, evidence)} {answer}\n"


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def reading_facts(world: QAWorld, n: int, seed: int = 0) -> list[Fact]:
    """`n` facts for reading practice: the world's `reading` group, then fresh people
    (generated from another seed, no name shared with the world). Each is shown once
    with its evidence, so copying from the context is the only way to learn them."""
    names = {f.subject for g in world.groups.values() for f in g}
    out = list(world["reading"])
    extra = make_fact_base(
        4 * max(0, n - len(out)) + 4,
        seed=world.seed + 1000 + seed,
        relations=VALUE_RELATIONS,
    )
    out += [f for f in extra if f.subject not in names]
    return out[:n]


def training_corpus(
    world: QAWorld,
    seed: int = 0,
    known_repeats: int = 24,
    num_reading: int = 120000,
) -> list[str]:
    """The LM's training examples, shuffled.

    known    every `known` fact `known_repeats` times as a bare Q/A; a third of them
             with 1-3 context lines about other people (some with the same
             relation), so retrieved evidence about someone else never overrides
             what the model knows
    reading  `num_reading` facts (`reading_facts`) once each, their statement in
             context among up to three distractors: another fact of the same person
             (match the relation), the same relation of another person (match the
             person), and any other fact
    """
    rng = random.Random(seed)
    reading = reading_facts(world, num_reading, seed)
    by_subject: dict[str, list[Fact]] = {}
    by_relation: dict[str, list[Fact]] = {}
    for f in reading:
        by_subject.setdefault(f.subject, []).append(f)
        by_relation.setdefault(f.relation, []).append(f)

    def other_person(f: Fact) -> str:
        g = rng.choice(by_relation[f.relation])
        return g.statement if g.subject != f.subject else rng.choice(reading).statement

    out = []
    for f in world["known"]:
        for r in range(known_repeats):
            ev = []
            if r % 3 == 2:
                ev = [other_person(f)] + [
                    rng.choice(reading).statement for _ in range(rng.randint(0, 2))
                ]
            out.append(format_example(f.question, f.answer, ev))
    for f in reading:
        same = [g for g in by_subject[f.subject] if g != f]
        ev = [f.statement]
        if same and rng.random() < 0.5:
            ev.append(rng.choice(same).statement)
        if rng.random() < 0.5:
            ev.append(other_person(f))
        if rng.random() < 0.3:
            ev.append(rng.choice(reading).statement)
        rng.shuffle(ev)
        out.append(format_example(f.question, f.answer, ev))
    rng.shuffle(out)
    return out


def write_corpus(world: QAWorld, path: str, seed: int = 0, **kw) -> int:
    """Write `training_corpus` as one text file (examples separated by a blank
    line), atomically. Returns the number of examples."""
    import os

    examples = training_corpus(world, seed=seed, **kw)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(examples))
    os.replace(tmp, path)
    return len(examples)


def main(argv=None) -> None:
    """`python scripts/make_qa_corpus.py --out DIR`: the LM's training and validation
    text."""
    import argparse
    import os

    p = argparse.ArgumentParser(prog="make_qa_corpus.py", description=main.__doc__)
    p.add_argument("--out", required=True, help="directory for train.txt and val.txt")
    p.add_argument("--num-subjects", type=int, default=1600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--known-repeats", type=int, default=24)
    p.add_argument("--num-reading", type=int, default=120000)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    world = make_world(args.num_subjects, args.seed)
    n = write_corpus(
        world,
        os.path.join(args.out, "train.txt"),
        known_repeats=args.known_repeats,
        num_reading=args.num_reading,
    )
    val = training_corpus(world, seed=1, known_repeats=1, num_reading=3000)[-1500:]
    tmp = os.path.join(args.out, "val.txt.tmp")
    with open(tmp, "w") as fh:
        fh.write("\n".join(val))
    os.replace(tmp, os.path.join(args.out, "val.txt"))
    print(f"wrote {n} training and {len(val)} validation examples to {args.out}")
