"""Synthetic fact base: people, relations and typed values, generated from a seed.

Shared by the critic (correct vs corrupted answers) and the meta-controller's fact-QA
environment (issue #5). Everything is a pure function of `seed`: no files, no network.

    facts = make_fact_base(2000, seed=0)           # list[Fact]
    facts[0].question, facts[0].answer, facts[0].statement
    train, val, test = split_by_subject(facts, (0.8, 0.1, 0.1))
    pairs = make_critic_pairs(test, facts, seed=1)  # list[CriticPair]

A fact is (subject, relation, value); every relation has a value type (city,
profession, company, animal, colour, year, person). `statement` is the evidence
sentence that states it, `question` asks for the value, `answer` is the value.
Corruptions replace the value by another value *of the same type*, so many corrupted
answers have exactly the length of the correct one; the hard kind takes a same-typed
value that also appears in the evidence passage (another relation of the subject, or
the same relation of a distractor subject), so word overlap with the evidence can't
tell it apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass

CITIES = (
    "Paris Lyon Berlin Munich Madrid Lisbon Porto Rome Milan Vienna Prague Warsaw Oslo "
    "Bergen Dublin Cork Athens Sofia Riga Tallinn Zagreb Kyoto Osaka Seoul Lima Quito "
    "Denver Austin Boston Chicago Toronto Ottawa Perth Sydney Nairobi Accra Cairo"
).split() + [
    "New York",
    "San Diego",
    "Buenos Aires",
    "Cape Town",
    "Hong Kong",
    "Rio de Janeiro",
    "Mexico City",
    "Kuala Lumpur",
]
PROFESSIONS = (
    "baker chemist pilot nurse lawyer architect carpenter teacher painter surgeon "
    "librarian plumber journalist farmer dentist translator sculptor geologist "
    "electrician pharmacist photographer economist firefighter veterinarian"
).split() + ["software engineer", "bus driver", "marine biologist", "tax advisor"]
COMPANIES = [
    f"{a} {b}"
    for a in "Norvel Tamsin Brightwater Kestrel Orvane Halden Quillon Vastra".split()
    for b in ("Systems", "Foods", "Motors", "Labs")
]
ANIMALS = (
    "cat dog parrot rabbit hamster tortoise goldfish ferret canary iguana horse "
    "goat lizard"
).split() + ["guinea pig", "bearded dragon"]
COLOURS = (
    "red blue green yellow purple orange teal crimson amber violet indigo maroon"
).split() + ["navy blue", "olive green"]
YEARS = [str(y) for y in range(1931, 2006)]


@dataclass(frozen=True)
class Relation:
    name: str
    value_type: str
    question: str  # "{s}" = subject
    statement: str  # "{s}", "{v}"


RELATIONS = (
    Relation("born_in", "city", "Where was {s} born?", "{s} was born in {v}."),
    Relation("lives_in", "city", "In which city does {s} live?", "{s} lives in {v}."),
    Relation(
        "profession", "profession", "What does {s} do for a living?", "{s} is a {v}."
    ),
    Relation("employer", "company", "Which company employs {s}?", "{s} works for {v}."),
    Relation("pet", "animal", "What pet does {s} keep?", "{s} keeps a {v} as a pet."),
    Relation(
        "colour",
        "colour",
        "What is the favourite colour of {s}?",
        "The favourite colour of {s} is {v}.",
    ),
    Relation(
        "birth_year", "year", "In what year was {s} born?", "{s} was born in {v}."
    ),
    Relation(
        "mentor", "person", "Who was the mentor of {s}?", "{s} was mentored by {v}."
    ),
    Relation(
        "sibling", "person", "Who is the sibling of {s}?", "{s} is a sibling of {v}."
    ),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}
VALUE_POOLS = {
    "city": CITIES,
    "profession": PROFESSIONS,
    "company": COMPANIES,
    "animal": ANIMALS,
    "colour": COLOURS,
    "year": YEARS,
}


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    value: str
    value_type: str
    question: str
    answer: str
    statement: str


@dataclass(frozen=True)
class CriticPair:
    """One question with its evidence, the correct answer and a corrupted one."""

    question: str
    evidence: str
    correct: str
    corrupted: str
    kind: str  # "random_swap" | "evidence_swap" (value also present in the evidence)


def _make_name(rng: random.Random) -> str:
    def word(n_syll):
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n_syll))

    return (
        f"{word(rng.randint(2, 3)).capitalize()} {word(rng.randint(2, 3)).capitalize()}"
    )


_ONSETS = "b d f g k l m n p r s t v z br dr gr kr st tr".split()
_VOWELS = "a e i o u ai ei ou".split()
_SYLLABLE = re.compile(
    "(br|dr|gr|kr|st|tr|[bdfgklmnprstvz])(ai|ei|ou|[aeiou])", re.IGNORECASE
)


def near_namesake(name: str, rng: random.Random) -> str:
    """A different name one syllable edit away in each word (replaced, added or
    removed: "Stosti Loboukrou" -> "Stodusti Lobou"), the kind of name a dense search
    confuses. A word not made of `_make_name` syllables counts as one syllable."""

    def syllable():
        return rng.choice(_ONSETS) + rng.choice(_VOWELS)

    words = []
    for word in name.split():
        syl = [m.group(0).lower() for m in _SYLLABLE.finditer(word)]
        if "".join(syl) != word.lower() or not syl:
            syl = [word.lower()]
        i, op = rng.randrange(len(syl)), rng.choice("rdi" if len(syl) > 2 else "ri")
        if op == "r":
            syl[i] = syllable()
        elif op == "d":
            del syl[i]
        else:
            syl.insert(i, syllable())
        words.append("".join(syl).capitalize())
    out = " ".join(words)
    return out if out != name else near_namesake(name, rng)


def namesake_fact(fact: Fact, rng: random.Random, taken=frozenset()) -> Fact:
    """The same relation of a `near_namesake` of the fact's subject (a name not in
    `taken`), with another value of the relation's pool: a distractor line a reader
    must not answer from."""
    name = near_namesake(fact.subject, rng)
    while name in taken:
        name = near_namesake(fact.subject, rng)
    values = [v for v in VALUE_POOLS[fact.value_type] if v != fact.value]
    return make_fact(name, RELATION_BY_NAME[fact.relation], rng.choice(values))


def make_fact(subject: str, relation: Relation, value: str) -> Fact:
    return Fact(
        subject=subject,
        relation=relation.name,
        value=value,
        value_type=relation.value_type,
        question=relation.question.format(s=subject),
        answer=value,
        statement=relation.statement.format(s=subject, v=value),
    )


def make_fact_base(
    n: int,
    seed: int = 0,
    relations_per_subject: int = 4,
    relations: tuple[Relation, ...] = RELATIONS,
) -> list[Fact]:
    """`n` facts about ceil(n / relations_per_subject) generated people, each with
    distinct relations drawn from `relations`; person-valued relations point at other
    people of the base."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 1 <= relations_per_subject <= len(relations):
        raise ValueError(f"relations_per_subject must be in [1, {len(relations)}]")
    rng = random.Random(seed)
    num_subjects = -(-n // relations_per_subject)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < num_subjects:
        name = _make_name(rng)
        if name not in seen:
            seen.add(name)
            names.append(name)
    facts: list[Fact] = []
    for subject in names:
        for relation in rng.sample(relations, relations_per_subject):
            if relation.value_type == "person":
                value = rng.choice([p for p in rng.sample(names, 2) if p != subject])
            else:
                value = rng.choice(VALUE_POOLS[relation.value_type])
            facts.append(make_fact(subject, relation, value))
            if len(facts) == n:
                return facts
    return facts


def _bucket(subject: str) -> float:
    """A stable number in [0, 1) from the subject name (split key)."""
    return int(hashlib.sha1(subject.encode()).hexdigest()[:8], 16) / 16**8


def split_by_subject(
    facts: list[Fact], fractions: tuple[float, ...] = (0.8, 0.1, 0.1)
) -> list[list[Fact]]:
    """Deterministic split by subject: no person appears in two parts."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    edges = [sum(fractions[: i + 1]) for i in range(len(fractions))]
    parts: list[list[Fact]] = [[] for _ in fractions]
    for f in facts:
        b = _bucket(f.subject)
        parts[
            next(i for i, e in enumerate(edges) if b < e or i == len(edges) - 1)
        ].append(f)
    return parts


def _pool(fact: Fact, base: list[Fact]) -> list[str]:
    if fact.value_type == "person":
        return sorted({f.subject for f in base})
    return list(VALUE_POOLS[fact.value_type])


def make_critic_pairs(
    facts: list[Fact],
    base: list[Fact],
    seed: int = 0,
    num_distractors: int = 3,
    hard_fraction: float = 0.5,
    sentence_fraction: float = 0.5,
) -> list[CriticPair]:
    """One (question, evidence, correct, corrupted) pair per fact in `facts`.

    Evidence = the fact's statement + `num_distractors` other statements from `base`
    (the subject's other facts and same-relation facts of other people), shuffled.
    The answer is the bare value or, with probability `sentence_fraction`, the full
    statement. The corruption swaps the value for another of the same type: with
    probability `hard_fraction` one that appears in the evidence, else a random one."""
    rng = random.Random(seed)
    by_subject: dict[str, list[Fact]] = {}
    by_relation: dict[str, list[Fact]] = {}
    for f in base:
        by_subject.setdefault(f.subject, []).append(f)
        by_relation.setdefault(f.relation, []).append(f)
    pairs = []
    for fact in facts:
        own = [f for f in by_subject.get(fact.subject, []) if f != fact]
        same_rel = by_relation[fact.relation]
        others = [f for f in rng.sample(same_rel, min(4, len(same_rel))) if f != fact]
        candidates = own + others
        distractors = rng.sample(candidates, min(num_distractors, len(candidates)))
        statements = [fact.statement] + [d.statement for d in distractors]
        rng.shuffle(statements)
        # same-typed values in the evidence that would be wrong answers
        in_evidence = [
            d.value
            for d in distractors
            if d.value_type == fact.value_type and d.value != fact.value
        ]
        if in_evidence and rng.random() < hard_fraction:
            wrong, kind = rng.choice(in_evidence), "evidence_swap"
        else:
            wrong = rng.choice([v for v in _pool(fact, base) if v != fact.value])
            kind = "random_swap"
        relation = RELATION_BY_NAME[fact.relation]
        if rng.random() < sentence_fraction:
            correct = fact.statement
            corrupted = relation.statement.format(s=fact.subject, v=wrong)
        else:
            correct, corrupted = fact.value, wrong
        pairs.append(
            CriticPair(fact.question, " ".join(statements), correct, corrupted, kind)
        )
    return pairs


def fact_to_dict(fact: Fact) -> dict:
    return dataclasses.asdict(fact)
