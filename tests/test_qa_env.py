"""The fact-QA world, the retriever's parts, the controller's reward, the SFT batch."""

import pytest
import torch

from hmst.inference.env import ALL_ACTIONS, OutcomeTable, QAEnv, config_index
from hmst.memory.retriever import (
    Retriever,
    RetrieverConfig,
    fit_min_score,
    fit_size_floors,
    load_retriever,
    save_retriever,
    train_retriever,
)
from hmst.qa import (
    CATEGORIES,
    GROUPS,
    exact_match,
    format_prompt,
    make_world,
    reading_facts,
    training_corpus,
)
from hmst.training.qa_sft import collate


def test_world_groups_are_disjoint_by_person_and_stable():
    w = make_world(200, seed=0)
    people = {g: {f.subject for f in w[g]} for g in GROUPS}
    for a in GROUPS:
        for b in GROUPS:
            if a < b:
                assert not people[a] & people[b], (a, b)
    assert all(w[g] for g in GROUPS)
    assert [f.statement for f in make_world(200, 0)["semantic"]] == [
        f.statement for f in w["semantic"]
    ]
    for g in ("semantic", "unanswerable"):
        train, test = w.part(g, "train"), w.part(g, "test")
        assert not {f.subject for f in train} & {f.subject for f in test}
        assert len(train) + len(test) == len(w[g])


def test_training_text_never_holds_held_out_facts():
    w = make_world(200, seed=0)
    text = "\n".join(training_corpus(w, known_repeats=2, num_reading=600))
    for g in ("semantic", "episodic", "unanswerable"):
        assert not any(f.subject in text for f in w[g]), g
    assert all(f.question in text for f in w["known"])
    fresh = reading_facts(w, 600)
    world_people = {f.subject for g in GROUPS for f in w[g]}
    assert not {f.subject for f in fresh[len(w["reading"]) :]} & world_people


def test_prompt_format_and_exact_match():
    p = format_prompt("Where was X born?", ["X was born in Oslo.", " "])
    assert p == "Context: X was born in Oslo.\nQuestion: Where was X born?\nAnswer:"
    with pytest.raises(ValueError, match="empty question"):
        format_prompt("  ")
    assert exact_match(" navy  blue. ", "Navy blue")
    assert not exact_match("blue", "navy blue")


def test_fit_min_score_keeps_the_required_recall():
    pos = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.3])
    neg = torch.tensor([0.1, 0.2, 0.45, 0.5, 0.65])
    # may drop one positive: cut 0.55 is right on 4 + 4 of 10 (0.25 only on 5 + 2)
    assert fit_min_score(pos, neg, min_recall=0.8) == pytest.approx(0.55)
    # must keep all: the best cut under 0.3 is 0.25 (5 + 2 right)
    assert fit_min_score(pos, neg, min_recall=1.0) == pytest.approx(0.25)


def test_retriever_learns_to_pair_questions_with_their_statements():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 16, generator=g)
    q = torch.cat([base, torch.randn(64, 16, generator=g)], 1)  # 2D = 32 features
    d = torch.cat([torch.randn(64, 16, generator=g), base], 1)  # shared part swapped
    r = Retriever(RetrieverConfig(d_model=16, dim=8, temperature=0.1))

    def top1():
        with torch.no_grad():
            s = r.embed_features(q, "query") @ r.embed_features(d, "doc").T
        return float((s.argmax(1) == torch.arange(64)).float().mean())

    before = top1()
    losses = train_retriever(r, q, d, steps=200, batch_size=32, lr=1e-2)
    assert losses[-1] < losses[0] and top1() > max(0.9, before + 0.5)
    with pytest.raises(ValueError, match="negatives"):
        train_retriever(r, q, d, steps=1, negatives="some")


def test_size_floors_fit_each_store_size_and_are_looked_up_by_size():
    g = torch.Generator().manual_seed(0)
    pos = 0.5 + 0.5 * torch.rand(300, generator=g)
    neg = 0.8 * torch.rand(100, 64, generator=g)
    floors = fit_size_floors(pos, neg, [64, 1, 16, 1000])
    assert [n for n, _ in floors] == [1, 16, 64]  # sorted, capped at the entries
    # the whole store: each question's best entry
    assert floors[-1][1] == fit_min_score(pos, neg.max(1).values)
    # rows of one repeated value: the best of any n entries is that value
    flat = neg[:, :1].expand(100, 64).contiguous()
    one = fit_size_floors(pos, flat, [1, 8])
    assert one[0][1] == one[1][1] == fit_min_score(pos, flat[:, 0])
    cuts = [c for _, c in floors]
    cfg = RetrieverConfig(d_model=4, min_score=0.5, size_floors=floors)
    assert cfg.floor(0) == cfg.floor(1) == cuts[0]
    assert cfg.floor(15) == cuts[0] and cfg.floor(16) == cuts[1]
    assert cfg.floor(63) == cuts[1] and cfg.floor(10**6) == cuts[2]
    assert RetrieverConfig(d_model=4, min_score=0.5).floor(7) == 0.5


def test_sif_pooling_weights_rare_tokens_and_round_trips(tmp_path):
    cfg = RetrieverConfig(d_model=4, dim=8, sif_a=0.1, vocab_size=5)
    r = Retriever(cfg)
    assert cfg.num_features == 16
    r.fit_token_weights([[0, 0, 0, 1], [0, 0, 0, 2]])  # p = 6/8, 1/8, 1/8, 0, 0
    want = torch.tensor([0.1 / 0.85, 0.1 / 0.225, 0.1 / 0.225, 1.0, 1.0])
    torch.testing.assert_close(r.token_weight, want)
    ids = torch.tensor([[0, 1, 3]])
    emb = torch.randn(1, 3, 4)
    hid = torch.randn(1, 3, 4)
    f = r.pool(ids, emb, hid)
    w = want[ids[0]] / want[ids[0]].sum()
    torch.testing.assert_close(f[0, :4], emb[0].mean(0))
    torch.testing.assert_close(f[0, 8:12], (w[:, None] * emb[0]).sum(0))
    torch.testing.assert_close(f[0, 12:], (w[:, None] * hid[0]).sum(0))
    # padding (valid = 0) changes neither part
    pad = r.pool(
        torch.tensor([[0, 1, 3, 2]]),
        torch.cat([emb, torch.randn(1, 1, 4)], 1),
        torch.cat([hid, torch.randn(1, 1, 4)], 1),
        torch.tensor([[[1.0], [1.0], [1.0], [0.0]]]),
    )
    torch.testing.assert_close(pad, f)
    save_retriever(str(tmp_path / "r"), r)
    back = load_retriever(str(tmp_path / "r"))
    assert back.config == cfg
    torch.testing.assert_close(back.token_weight, r.token_weight)
    with pytest.raises(ValueError, match="vocab_size"):
        RetrieverConfig(d_model=4, sif_a=0.1)
    with pytest.raises(ValueError, match="sif_a = 0"):
        Retriever(RetrieverConfig(d_model=4)).fit_token_weights([[1]])


def _table():
    """Two questions: a known one (row 0) and an unanswerable one (row 1)."""
    n = 2
    z = torch.zeros(n, 8)
    correct = torch.zeros(n, 8, dtype=torch.bool)
    correct[0] = True
    critic = torch.full((n, 8), 0.1)
    critic[0, 0] = 0.9
    return OutcomeTable(
        qfeat=torch.zeros(n, 4),
        features=torch.zeros(n, 3),
        expert_target=torch.full((n, 2), 0.5),
        category=torch.tensor(
            [CATEGORIES.index("known"), CATEGORIES.index("unanswerable")]
        ),
        correct=correct,
        empty=torch.zeros(n, 8, dtype=torch.bool),
        critic=critic,
        first_p=torch.full((n, 8), 0.8),
        latency=torch.ones(n, 8) + z,
        critic_latency=torch.full((n, 8), 0.5),
        flops=torch.full((n, 8), 10.0),
        critic_flops=torch.full((n, 8), 5.0),
        blocks=torch.full((n, 8), 4.0),
    )


def test_reward_terms_by_hand():
    t = _table()
    assert t.reference() == (1.5, 15.0)  # do-everything: latency 1 + 0.5, flops 10 + 5
    rows = torch.tensor([0, 1])
    plain = torch.zeros(2, 4)  # no memory, no critic
    o = t.outcome(rows, plain)
    # row 0 answered right: acc 1, calib 1-(0.8-1)^2; row 1 answered (wrong): acc -1
    assert o["accuracy"].tolist() == [1.0, -1.0]
    assert torch.allclose(o["latency"], torch.tensor([1 / 1.5] * 2))
    assert torch.allclose(o["compute"], torch.tensor([10 / 15] * 2))
    assert torch.allclose(o["calibration"], torch.tensor([1 - 0.04, 1 - 0.64]))
    want = 1.0 * o["accuracy"] - 0.3 * o["latency"] - 0.2 * o["compute"]
    assert torch.allclose(o["reward"], want + 0.5 * o["calibration"])
    verify = torch.tensor([[0.0, 0, 0, 1]] * 2)
    o = t.outcome(rows, verify)
    # critic 0.9 accepts row 0; 0.1 < 0.5 makes row 1 abstain: the right output
    assert o["abstain"].tolist() == [0.0, 1.0] and o["accuracy"].tolist() == [1.0, 1.0]
    assert torch.allclose(o["latency"], torch.tensor([1.0, 1.0]))
    assert torch.allclose(o["calibration"], torch.tensor([1 - 0.01, 1 - 0.01]))
    assert t.all_outcomes().shape == (2, 16)


def test_split_and_policy_summary():
    t = _table()
    big = t.subset(torch.arange(10) % 2)  # 10 rows alternating the two questions
    rest, val = big.split(0.3, seed=0)
    assert (len(rest), len(val)) == (7, 3)
    assert torch.equal(big.split(0.3, seed=0)[1].category, val.category)  # seeded
    counts = torch.bincount(torch.cat([rest.category, val.category]))
    assert counts.tolist() == torch.bincount(big.category).tolist()
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        big.split(1.0)
    R = t.all_outcomes()
    best = ALL_ACTIONS[R.argmax(1)]
    s = t.policy_summary(best)
    assert s["reward"] == pytest.approx(s["oracle"]) and s["gain"] == pytest.approx(1)
    s = t.policy_summary(torch.tensor([[0.0, 1, 1, 0]] * 2))
    assert s["reward"] == pytest.approx(s["always_retrieve"]) and s["gain"] == 0


def test_config_index_and_env_protocol():
    assert config_index(ALL_ACTIONS).tolist() == [
        (int(a[1]) + 2 * int(a[2])) * 2 + int(a[0]) for a in ALL_ACTIONS
    ]
    env = QAEnv(_table(), episode_len=3)
    obs = env.reset(5, seed=0)
    assert obs.query_emb.shape == (5, 4) and obs.features.shape == (5, 3)
    for t in range(3):
        obs, r, done, info = env.step(torch.zeros(5, 4))
        assert r.shape == (5,) and set(info) == {
            "accuracy", "latency", "compute", "calibration",
        }  # fmt: skip
        assert bool(done.all()) == (t == 2)


def test_sft_batch_trains_only_the_answer():
    ids, tgt = collate([([5, 6, 7], [8, 9]), ([5], [3])], "cpu")
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 3, 0, 0, 0]]
    # position t predicts token t + 1: only the answer tokens are targets
    assert tgt.tolist() == [[-100, -100, 8, 9, -100], [3, -100, -100, -100, -100]]


def test_near_namesake_is_one_syllable_edit_per_word():
    import random

    from hmst.facts import _SYLLABLE, _make_name, near_namesake

    rng = random.Random(0)
    for _ in range(200):
        name = _make_name(rng)
        other = near_namesake(name, rng)
        assert other != name and len(other.split()) == 2
        for a, b in zip(name.split(), other.split()):
            sa = [m.group(0).lower() for m in _SYLLABLE.finditer(a)]
            sb = [m.group(0).lower() for m in _SYLLABLE.finditer(b)]
            assert "".join(sb) == b.lower()  # still made of the name syllables
            assert abs(len(sa) - len(sb)) <= 1 and len(sb) >= 2
            # one replace / insert / delete: everything else is a shared prefix+suffix
            pre = next(
                (i for i, (x, y) in enumerate(zip(sa, sb)) if x != y),
                min(len(sa), len(sb)),
            )
            post = next(
                (i for i, (x, y) in enumerate(zip(sa[::-1], sb[::-1])) if x != y),
                min(len(sa), len(sb)),
            )
            assert pre + post >= max(len(sa), len(sb)) - 1
    assert near_namesake("Alice Smith", rng) != "Alice Smith"


def test_sft_sampler_shows_near_namesake_lines_never_world_people():
    import re

    from hmst.training.qa_sft import make_sampler

    class Chars:  # a stand-in tokenizer: one id per character
        def encode(self, s):
            return [ord(c) for c in s]

    w = make_world(200, seed=0)
    world_names = {f.subject for g in w.groups.values() for f in g}
    known = {f.subject for f in w["known"]}

    def namesake_lines(namesakes: bool) -> int:
        """Context lines whose person shares the asked surname's first syllable."""
        sample = make_sampler(w, Chars(), seed=0, replay=1.0, namesakes=namesakes)
        n = 0
        for _ in range(400):
            text = "".join(map(chr, sample()[0]))
            name = re.search(r"Question: .*?([A-Z][a-z]+ [A-Z][a-z]+)", text).group(1)
            assert name in known
            for line in re.findall(r"Context: (.*)", text):
                other = re.search(r"([A-Z][a-z]+ [A-Z][a-z]+)", line).group(1)
                assert other != name and other not in world_names
                n += other.split()[1][:2] == name.split()[1][:2]
        return n

    assert namesake_lines(True) > 20 > 5 > namesake_lines(False)


def test_build_table_times_each_configuration_as_a_median():
    from types import SimpleNamespace

    from hmst.inference.env import build_table

    class FakeEngine:
        """Answers right with deterministic outcomes; wall times vary per call."""

        def __init__(self):
            self.model = SimpleNamespace(
                config=SimpleNamespace(n_layers=2, num_params=lambda active: 10)
            )
            self.critic = (torch.nn.Linear(2, 1), None)
            self.config = SimpleNamespace(critic_threshold=0.5)
            self.calls = 0

        def clear_episodic(self):
            pass

        def remember(self, text):
            pass

        def state_features(self, question):
            probe = dict(router=torch.full((2,), 0.5))
            return torch.zeros(4), torch.zeros(3), {}, probe

        def answer(self, question, decisions):
            self.calls += 1
            wall = [0.5, 0.1, 0.2][(self.calls - 1) % 3]  # median 0.2, first 0.5
            return SimpleNamespace(
                raw_answer="Paris", critic=dict(score=0.9, tokens=4),
                lm_confidence=0.7, prompt_tokens=5, exit_layers=[1],
                blocks_per_token=2.0,
                timings=dict(probe=9.0, generate=wall, critic=wall / 10),
            )  # fmt: skip

    fact = SimpleNamespace(question="Where?", answer="Paris")
    engine = FakeEngine()
    t = build_table(engine, [("known", fact, [])], log=None, timing_repeats=3)
    assert engine.calls == 8 * 3
    assert torch.allclose(t.latency, torch.full((1, 8), 0.2))  # probe excluded
    assert torch.allclose(t.critic_latency, torch.full((1, 8), 0.02))
    assert t.correct.all() and torch.allclose(t.first_p, torch.full((1, 8), 0.7))
    with pytest.raises(ValueError, match="timing_repeats"):
        build_table(FakeEngine(), [("known", fact, [])], log=None, timing_repeats=0)


def test_answer_accuracy_is_greedy_exact_match():
    from hmst.training.qa_sft import answer_accuracy

    class Chars:
        def encode(self, s):
            return [ord(c) for c in s]

    class Reads(torch.nn.Module):
        """Predicts the next token of its input, except `wrong` wherever it sits."""

        def __init__(self, wrong=None):
            super().__init__()
            self.embed = torch.nn.Embedding(1, 1)
            self.wrong = wrong

        def forward(self, ids):
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
            if self.wrong is not None:
                nxt = torch.where(nxt == self.wrong, nxt + 1, nxt)
            return {"logits": torch.nn.functional.one_hot(nxt, 256).float()}

    items = [("Who?", [], "Bo"), ("Where?", ["Context line."], "Oslo")]
    assert answer_accuracy(Reads(), Chars(), items) == 1.0
    # a wrong answer token ("B" of "Bo") fails that item; prompt tokens do not count
    assert answer_accuracy(Reads(ord("B")), Chars(), items) == 0.5
    assert answer_accuracy(Reads(ord("W")), Chars(), items) == 1.0
