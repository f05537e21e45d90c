"""The meta-controller's environment: fact-QA turns with measured outcomes.

Every turn is one question of the QA world (`hmst.qa`): `known`, `semantic`,
`episodic` or `unanswerable`, in equal shares. Before the question the recent-
interaction buffer holds 1-4 statements told earlier in the conversation (other
people's facts), plus, for an `episodic` question, the statement that answers it.

The policy takes four binary decisions per turn (DECISIONS order): early_exit,
episodic, semantic, verification. Their outcomes are not simulated: `build_table`
runs the real engine on every question under each of the 8 (memories x early exit)
configurations, with the critic scoring every answer, and records what happened
(answer right or wrong, critic score, measured latency of each part, FLOPs). A turn's
reward is then read off that table for whatever the policy decided, so PPO can run
thousands of episodes per second on the engine's measured behaviour.

Reward per turn (the design's weights; each term defined and normalised here):

    R = 1.0 accuracy - 0.3 latency - 0.2 compute + 0.5 calibration

    accuracy     +1 the output is right: the correct answer, or an abstention on an
                    unanswerable question
                  0 an abstention on an answerable question
                 -1 a wrong answer (a hallucination)
    latency      the turn's measured wall time (probe, controller excluded: the
                 same for every policy) / the mean wall time of the do-everything
                 configuration (both memories + verification, no early exit)
    compute      the turn's FLOPs (LM forward passes at the blocks actually run +
                 critic) / the do-everything configuration's mean FLOPs
    calibration  1 - (p - y)^2: p = the engine's stated confidence that its output
                 is right (critic score if verified, else the LM's first-token
                 probability), y = 1 if it is right (Brier score, in [0, 1])

Actions do not change later turns (the buffer of each turn is scripted), so the
controller's problem is per-turn; episodes of `episode_len` turns exist for the PPO
machinery (GAE over a trajectory, gamma defaulting to 0; see rl_train).
"""

from __future__ import annotations

import json
import os
import random
import statistics
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from hmst.inference.engine import DECISIONS
from hmst.qa import CATEGORIES, exact_match, make_world

WEIGHTS = dict(accuracy=1.0, latency=0.3, compute=0.2, calibration=0.5)
N_CONFIGS = 8  # (episodic, semantic) x early_exit; index = (epi + 2 * sem) * 2 + ee
ALL_ACTIONS = torch.tensor(
    [[(a >> i) & 1 for i in range(4)] for a in range(16)], dtype=torch.float32
)  # (16, 4) in DECISIONS order
REFERENCE = torch.tensor([0.0, 1.0, 1.0, 1.0])  # do everything, no early exit
ALWAYS_RETRIEVE = torch.tensor([0.0, 1.0, 1.0, 0.0])  # both memories, nothing else


def config_index(actions_N4: torch.Tensor) -> torch.Tensor:
    a = actions_N4.long()
    return (a[:, 1] + 2 * a[:, 2]) * 2 + a[:, 0]


@dataclass
class OutcomeTable:
    qfeat: torch.Tensor  # (N, 2D) query features (the controller's query_emb)
    features: torch.Tensor  # (N, F) state features
    expert_target: torch.Tensor  # (N, E) mean router distribution of the probe
    category: torch.Tensor  # (N,) index into CATEGORIES
    correct: torch.Tensor  # (N, 8) raw answer is right
    empty: torch.Tensor  # (N, 8) nothing generated
    critic: torch.Tensor  # (N, 8) critic score of the raw answer
    first_p: torch.Tensor  # (N, 8) LM probability of the answer's first token
    latency: torch.Tensor  # (N, 8) seconds: retrieval + generation
    critic_latency: torch.Tensor  # (N, 8) seconds of the critic
    flops: torch.Tensor  # (N, 8) LM FLOPs
    critic_flops: torch.Tensor  # (N, 8)
    blocks: torch.Tensor  # (N, 8) blocks per generated token
    critic_threshold: float = 0.5

    FIELDS = (
        "qfeat features expert_target category correct empty critic first_p latency "
        "critic_latency flops critic_flops blocks"
    ).split()

    def __len__(self) -> int:
        return len(self.category)

    def subset(self, rows: torch.Tensor) -> "OutcomeTable":
        """The table of these rows (questions) only."""
        return OutcomeTable(
            **{k: getattr(self, k)[rows] for k in self.FIELDS},
            critic_threshold=self.critic_threshold,
        )

    def split(self, fraction: float, seed: int = 0):
        """(rest, held-out): a seeded random `fraction` of the questions held out,
        for choosing PPO settings without the test table."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
        n_val = round(len(self) * fraction)
        if not 0 < n_val < len(self):
            raise ValueError(f"{len(self)} questions are too few to hold {fraction}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[n_val:].sort().values), self.subset(
            perm[:n_val].sort().values
        )

    def policy_summary(self, actions_N4: torch.Tensor) -> dict:
        """Mean reward of taking `actions` on every row, next to always-retrieve's
        and the oracle's (the best of the 16 action sets per row), and the share of
        the oracle's gain over always-retrieve that `actions` reach. Rewards are
        normalised by this table's own do-everything reference."""
        rows = torch.arange(len(self))
        reward = float(self.outcome(rows, actions_N4)["reward"].mean())
        always = ALWAYS_RETRIEVE.expand(len(self), 4)
        base = float(self.outcome(rows, always)["reward"].mean())
        oracle = float(self.all_outcomes().max(1).values.mean())
        return dict(
            reward=reward,
            always_retrieve=base,
            oracle=oracle,
            gain=(reward - base) / (oracle - base) if oracle > base else None,
        )

    def save(self, path: str, meta: dict) -> None:
        tmp = f"{path}.tmp"
        save_file(
            {k: getattr(self, k).contiguous() for k in self.FIELDS},
            tmp,
            metadata={
                "meta": json.dumps({**meta, "critic_threshold": self.critic_threshold})
            },
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> tuple["OutcomeTable", dict]:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        t = load_file(path)
        return (
            cls(
                **{k: t[k] for k in cls.FIELDS},
                critic_threshold=meta["critic_threshold"],
            ),
            meta,
        )

    # -- rewards ----------------------------------------------------------------------

    def reference(self) -> tuple[float, float]:
        c = int(config_index(REFERENCE[None])[0])
        lat = float((self.latency[:, c] + self.critic_latency[:, c]).mean())
        fl = float((self.flops[:, c] + self.critic_flops[:, c]).mean())
        return lat, fl

    def outcome(self, rows: torch.Tensor, actions_N4: torch.Tensor, ref=None) -> dict:
        """Reward terms of taking `actions` on table `rows`."""
        ref_lat, ref_fl = ref or self.reference()
        c = config_index(actions_N4)
        g = lambda x: x[rows, c]  # noqa: E731
        verify = actions_N4[:, 3].bool()
        answerable = self.category[rows] != CATEGORIES.index("unanswerable")
        score = g(self.critic)
        abstain = verify & ((score < self.critic_threshold) | g(self.empty))
        answered_right = ~abstain & g(self.correct) & answerable
        right = answered_right | (abstain & ~answerable)
        accuracy = right.float() - (~abstain & ~right).float()
        vf = verify.float()
        latency = (g(self.latency) + vf * g(self.critic_latency)) / ref_lat
        compute = (g(self.flops) + vf * g(self.critic_flops)) / ref_fl
        p = torch.where(verify, torch.where(abstain, 1 - score, score), g(self.first_p))
        calibration = 1 - (p - right.float()) ** 2
        reward = (
            WEIGHTS["accuracy"] * accuracy
            - WEIGHTS["latency"] * latency
            - WEIGHTS["compute"] * compute
            + WEIGHTS["calibration"] * calibration
        )
        return dict(
            reward=reward,
            accuracy=accuracy,
            latency=latency,
            compute=compute,
            calibration=calibration,
            abstain=abstain.float(),
            right=right.float(),
        )

    def all_outcomes(self) -> torch.Tensor:
        """(N, 16) reward of each of the 16 action combinations (ALL_ACTIONS rows)."""
        rows = torch.arange(len(self))
        ref = self.reference()
        return torch.stack(
            [
                self.outcome(rows, a.expand(len(self), 4), ref)["reward"]
                for a in ALL_ACTIONS
            ],
            1,
        )


class QAEnv:
    """Vectorised episodes over an OutcomeTable (the protocol rl_train expects)."""

    def __init__(self, table: OutcomeTable, episode_len: int = 8):
        from hmst.models.meta_controller import Obs

        self._Obs = Obs
        self.table = table
        self.episode_len = episode_len
        self.query_dim = table.qfeat.shape[1]
        self.num_features = table.features.shape[1]
        self.n_experts = table.expert_target.shape[1]
        self._ref = table.reference()
        self._rows = None
        self._t = 0

    def _obs(self):
        r = self._rows[:, self._t]
        return self._Obs(
            query_emb=self.table.qfeat[r],
            features=self.table.features[r],
            expert_target=self.table.expert_target[r],
            correct_if_answered=self.table.correct[r, 0],  # the bare LM's answer
        )

    def reset(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self._rows = torch.randint(
            0, len(self.table), (n, self.episode_len), generator=g
        )
        self._t = 0
        return self._obs()

    def step(self, actions: torch.Tensor):
        rows = self._rows[:, self._t]
        out = self.table.outcome(rows, actions.float(), self._ref)
        self._t += 1
        done_flag = self._t >= self.episode_len
        n = len(rows)
        done = torch.full((n,), done_flag, dtype=torch.bool)
        if done_flag:
            self._t = 0  # the caller resets; keep a valid observation meanwhile
        info = {k: out[k] for k in ("accuracy", "latency", "compute", "calibration")}
        return self._obs(), out["reward"], done, info


# -- building the table: the real engine on every question ----------------------------


def sample_questions(world, part: str, per_category: int, seed: int):
    """[(category, fact, buffer statements)] with `per_category` of each category."""
    rng = random.Random(seed)
    pool = world.part("episodic", part)
    items = []
    for cat in CATEGORIES:
        facts = world.part(cat, part) if cat != "known" else world["known"]
        facts = rng.sample(facts, min(per_category, len(facts)))
        for f in facts:
            others = [
                g.statement for g in rng.sample(pool, 4) if g.subject != f.subject
            ]
            buffer = others[: rng.randint(1, 4)]
            if cat == "episodic":
                buffer.insert(rng.randint(0, len(buffer)), f.statement)
            items.append((cat, f, buffer))
    rng.shuffle(items)
    return items


def set_conversation(engine, statements) -> None:
    """The engine's recent-interaction buffer holds exactly these statements (a
    question's scripted conversation, from `sample_questions`)."""
    engine.clear_episodic()
    for s in statements:
        engine.remember(s)


def critic_flops(critic) -> float:
    model, _ = critic
    return 2.0 * sum(p.numel() for p in model.parameters())


@torch.no_grad()
def build_table(engine, items, log=print, timing_repeats: int = 3) -> OutcomeTable:
    if engine.critic is None:
        raise ValueError("the environment needs a system with a critic")
    if timing_repeats < 1:
        raise ValueError(f"timing_repeats must be >= 1, got {timing_repeats}")
    L = engine.model.config.n_layers
    active = engine.model.config.num_params(active=True)
    per_token = 2.0 * active
    c_flops = critic_flops(engine.critic)
    rows = {k: [] for k in OutcomeTable.FIELDS}
    for n, (cat, fact, buffer) in enumerate(items):
        set_conversation(engine, buffer)
        qfeat, vec, _, probe = engine.state_features(fact.question)
        rec = {k: [] for k in OutcomeTable.FIELDS[4:]}
        for c in range(N_CONFIGS):
            ee, epi, sem = c % 2, (c // 2) % 2, c // 4
            decisions = dict(
                early_exit=bool(ee),
                episodic=bool(epi),
                semantic=bool(sem),
                verification=True,
            )
            # Outcomes are deterministic (greedy); wall times are not: each is the
            # median of `timing_repeats` runs, so that a per-question best-of-16 (the
            # oracle) is not picking lucky timings.
            runs = [
                engine.answer(fact.question, decisions=decisions)
                for _ in range(timing_repeats)
            ]
            res = runs[0]
            rec["correct"].append(exact_match(res.raw_answer, fact.answer))
            rec["empty"].append(not res.raw_answer)
            rec["critic"].append(res.critic["score"])
            rec["first_p"].append(res.lm_confidence)
            rec["latency"].append(
                statistics.median(
                    sum(
                        v
                        for k, v in r.timings.items()
                        if k not in ("probe", "controller", "critic")
                    )
                    for r in runs
                )
            )
            rec["critic_latency"].append(
                statistics.median(r.timings.get("critic", 0.0) for r in runs)
            )
            lm_tokens = res.prompt_tokens + sum(b + 1 for b in res.exit_layers) / L
            rec["flops"].append(per_token * lm_tokens)
            rec["critic_flops"].append(c_flops * res.critic["tokens"])
            rec["blocks"].append(res.blocks_per_token)
        rows["qfeat"].append(qfeat)
        rows["features"].append(vec)
        rows["expert_target"].append(probe["router"])
        rows["category"].append(CATEGORIES.index(cat))
        for k, v in rec.items():
            rows[k].append(v)
        if log and (n + 1) % 100 == 0:
            log(f"table: {n + 1}/{len(items)} questions")
    engine.clear_episodic()
    out = {}
    for k, v in rows.items():
        if k in ("qfeat", "features", "expert_target"):
            out[k] = torch.stack(v).float()
        elif k == "category":
            out[k] = torch.tensor(v)
        elif k in ("correct", "empty"):
            out[k] = torch.tensor(v, dtype=torch.bool)
        else:
            out[k] = torch.tensor(v, dtype=torch.float32)
    return OutcomeTable(**out, critic_threshold=engine.config.critic_threshold)


def table_path(checkpoint: str, split: str) -> str:
    return os.path.join(checkpoint, f"rl_table_{split}.safetensors")


def load_table(
    checkpoint: str,
    split: str = "train",
    per_category: int | None = 150,
    seed: int = 0,
    log=print,
    timing_repeats: int = 3,
):
    """The outcome table of `split` ("train" or "test"), built once with the engine
    and cached beside the system (rl_table_<split>.safetensors). `per_category` None:
    whatever table is cached (150 per category if none is)."""
    from hmst.inference.engine import FEATURES, HMSTInferenceEngine

    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    path = table_path(checkpoint, split)
    want = dict(
        split=split,
        per_category=per_category,
        seed=seed,
        timing_repeats=timing_repeats,
        features=list(FEATURES),  # a table of other state features is stale
    )
    if per_category is None:
        want.pop("per_category")
        per_category = 150
    if os.path.isfile(path):
        table, meta = OutcomeTable.load(path)
        if all(meta.get(k) == v for k, v in want.items()):
            return table
    if not os.path.isfile(os.path.join(checkpoint, "manifest.json")):
        raise ValueError(
            f"{checkpoint} is not a saved HMST system (no manifest.json): build one "
            "with python -m hmst.inference.build"
        )
    engine = HMSTInferenceEngine.from_pretrained(checkpoint, policy="fixed")
    w = engine.manifest_extra.get("world")
    if not w:
        raise ValueError(
            f"{checkpoint} was not built for the QA world (no 'world' in its manifest)"
        )
    world = make_world(w["num_subjects"], w["seed"])
    items = sample_questions(
        world, split, per_category, seed + (0 if split == "train" else 1)
    )
    log(
        f"building the {split} outcome table: {len(items)} questions x "
        f"{N_CONFIGS} configurations"
    )
    table = build_table(engine, items, log, timing_repeats)
    table.save(path, want)
    return table


def load_env(
    checkpoint: str,
    split: str = "train",
    seed: int = 0,
    episode_len: int = 8,
    per_category: int = 150,
):
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"no such checkpoint directory: {checkpoint}")
    return QAEnv(load_table(checkpoint, split, per_category, seed=seed), episode_len)


__all__ = [
    "QAEnv",
    "OutcomeTable",
    "load_env",
    "load_table",
    "build_table",
    "DECISIONS",
    "WEIGHTS",
]
