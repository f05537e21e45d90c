"""EpisodicMemory (FIFO buffer keyed by SSM states) and MemoryConsolidator (episodic ->
semantic with importance, model embeddings and duplicate merging)."""

import os
import threading
import time

import numpy as np
import pytest
import torch
from conftest import tiny_config

from hmst.memory import (
    CorruptFileError,
    EpisodicMemory,
    MemoryConsolidator,
    SemanticMemory,
)
from hmst.memory.consolidation import model_embed_and_surprise
from hmst.models.base_moe import BaseMoEModel
from hmst.models.ssm import EpisodicMemorySSM

D_MODEL, D_STATE = 32, 8


@pytest.fixture
def ssm():
    torch.manual_seed(0)
    return EpisodicMemorySSM(D_MODEL, D_STATE, 1, 64).eval()


def episode(i, length=12):
    g = torch.Generator().manual_seed(i)
    return list(range(i, i + length)), torch.randn(length, D_MODEL, generator=g)


def fill(mem, ids):
    for i in ids:
        tokens, emb = episode(i)
        mem.add(tokens, emb, {"i": i})


def test_fifo_eviction(ssm):
    mem = EpisodicMemory(ssm, max_entries=4)
    fill(mem, range(7))
    assert mem.size() == 4
    assert [e.id for e in mem.entries()] == [3, 4, 5, 6]
    assert [e.metadata["i"] for e in mem.entries()] == [3, 4, 5, 6]
    hits = mem.retrieve_by_sequence(episode(1)[1], top_k=10)
    assert {h.id for h in hits} == {3, 4, 5, 6}  # evicted entries never come back


def test_retrieval_returns_the_stored_entry(ssm):
    mem = EpisodicMemory(ssm, max_entries=16)
    fill(mem, range(10))
    for i in range(10):
        tokens, emb = episode(i)
        by_seq = mem.retrieve_by_sequence(emb, top_k=3)
        assert by_seq[0].id == i and by_seq[0].tokens == tokens
        assert by_seq[0].metadata == {"i": i} and by_seq[0].score > 0.999
        assert by_seq[0].score >= by_seq[1].score >= by_seq[2].score
        noisy = emb.mean(0) + 0.01 * torch.randn(D_MODEL)
        by_vec = mem.retrieve(noisy, top_k=2)  # projected d_model -> d_state
        assert by_vec[0].id == i and by_vec[0].tokens == tokens
    counts = [e.access_count for e in mem.entries()]
    assert sum(counts) == 10 * (3 + 2) and min(counts) >= 2  # every hit is counted


def test_projection_matches_ssm_keys(ssm):
    mem = EpisodicMemory(ssm, max_entries=16)
    fill(mem, range(6))
    mem.retrieve(episode(0)[1].mean(0))  # fits the ridge projection
    for e in mem.entries():
        proj = mem.query_proj(e.mean_Dm[None])[0]
        cos = torch.nn.functional.cosine_similarity(proj, e.key_N, dim=0)
        assert cos > 0.99


def test_bad_shapes_raise(ssm):
    mem = EpisodicMemory(ssm, max_entries=4)
    with pytest.raises(ValueError, match="32"):
        mem.add([1, 2], torch.randn(2, D_MODEL + 1))
    with pytest.raises(ValueError, match="tokens"):
        mem.add([1, 2, 3], torch.randn(2, D_MODEL))
    fill(mem, [0])
    with pytest.raises(ValueError, match="d_model=32"):
        mem.retrieve(torch.randn(D_STATE))
    assert mem.size() == 1


def test_threads_add_and_retrieve(ssm):
    mem = EpisodicMemory(ssm, max_entries=1000)
    errors = []

    def work(t):
        for i in range(t * 10, t * 10 + 10):
            tokens, emb = episode(i)
            mem.add(tokens, emb, {"i": i})
            if mem.retrieve_by_sequence(emb, 1)[0].metadata != {"i": i}:
                errors.append(i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and mem.size() == 40
    assert sorted(e.metadata["i"] for e in mem.entries()) == list(range(40))
    assert sorted(e.id for e in mem.entries()) == list(range(40))


def test_save_load(ssm, tmp_path):
    mem = EpisodicMemory(ssm, max_entries=5)
    fill(mem, range(7))
    mem.retrieve(episode(4)[1].mean(0))
    path = str(tmp_path / "ep")
    mem.save(path)
    back = EpisodicMemory.load(path, ssm)
    assert [e.id for e in back.entries()] == [2, 3, 4, 5, 6]
    for a, b in zip(mem.entries(), back.entries()):
        assert a.tokens == b.tokens and a.metadata == b.metadata
        assert a.access_count == b.access_count and torch.equal(a.key_N, b.key_N)
    q = episode(5)[1].mean(0)
    assert [h.id for h in back.retrieve(q, 3)] == [h.id for h in mem.retrieve(q, 3)]
    fill(back, [7])
    assert [e.id for e in back.entries()][-1] == 7  # ids continue, never reused
    other = EpisodicMemorySSM(D_MODEL, D_STATE + 1, 1, 64)
    with pytest.raises(ValueError, match="d_state"):
        EpisodicMemory.load(path, other)
    for name in ("entries.json", "tensors.safetensors"):
        mem.save(path)
        f = os.path.join(path, name)
        os.truncate(f, os.path.getsize(f) // 2)
        with pytest.raises(CorruptFileError, match=name):
            EpisodicMemory.load(path, ssm)


# -- consolidation ------------------------------------------------------------------


def fixed_encoders(embeddings, surprises):
    """Encoders keyed by an episode's first token (episode(i) starts with i)."""
    return dict(
        embed_fn=lambda toks: embeddings[toks[0]],
        surprise_fn=lambda toks: surprises[toks[0]],
        decode_fn=lambda toks: " ".join(map(str, toks)),
        surprise_scale=5.0,
    )


def test_consolidator_moves_important_and_merges_duplicates(ssm):
    ep = EpisodicMemory(ssm, max_entries=16)
    sem = SemanticMemory(D_MODEL, 100, "flat")
    fill(ep, range(6))
    g = torch.Generator().manual_seed(1)
    embs = {i: torch.randn(D_MODEL, generator=g) for i in range(6)}
    embs[4] = embs[1] + 1e-3 * torch.randn(D_MODEL, generator=g)  # near-copy of 1
    surprise = {0: 0.1, 1: 4.5, 2: 0.2, 3: 4.0, 4: 4.8, 5: 0.3}
    cons = MemoryConsolidator(
        ep, sem, threshold=0.5, half_life_s=1e9, **fixed_encoders(embs, surprise)
    )
    # Importance: recency 0.2 (fresh) + 0.4 * surprise / 5: only 1, 3, 4 pass 0.5.
    # Retrieving episode 5 three times adds 0.4 * 3/4 from its access count.
    for _ in range(3):
        assert ep.retrieve_by_sequence(episode(5)[1], 1)[0].id == 5
    report = cons.consolidate_once()
    # Most important first: 4 is added, then its near-copy 1 merges into it.
    assert sorted(report.moved) == [3, 4, 5] and report.merged == {1: 0}
    assert sorted(report.kept) == [0, 2]
    assert report.importance[4] > report.importance[1] > report.importance[3]
    assert sem.size() == 3 and sorted(e.id for e in ep.entries()) == [0, 2]
    hit = sem.search(embs[1].numpy(), 1)[0]
    assert hit.ids[0] == 0 and hit.texts[0] == " ".join(map(str, episode(4)[0]))
    meta = hit.metadata[0]
    assert meta["i"] == 4 and meta["merge_count"] == 1
    assert meta["episodic_ids"] == [4, 1]
    assert sem.search(embs[5].numpy(), 1)[0].metadata[0]["access_count"] == 3
    again = cons.consolidate_once()  # nothing left above threshold
    assert again.moved == [] and again.merged == {} and sem.size() == 3


def test_consolidator_with_base_model(ssm):
    model = BaseMoEModel(config=tiny_config(d_model=D_MODEL)).eval()
    ep = EpisodicMemory(ssm, max_entries=8)
    sem = SemanticMemory(D_MODEL, 100, "flat")
    tokens = list(range(40, 80))  # longer than max_seq_len 32: two windows
    ep.add(tokens, torch.randn(len(tokens), D_MODEL), {"src": "chat"})
    cons = MemoryConsolidator(ep, sem, model=model, decode_fn=str, threshold=0.0)
    report = cons.consolidate_once()
    assert report.moved == [0] and sem.size() == 1
    with torch.no_grad():
        ids = torch.tensor([tokens])
        h1 = model(ids[:, :32], return_hidden=True)["hidden_states"][0]
        h2 = model(ids[:, 32:], return_hidden=True)["hidden_states"][0]
        expect = torch.cat([h1, h2]).mean(0)
        logits = torch.cat(
            [model(ids[:, :32])["logits"][0, :-1], model(ids[:, 32:])["logits"][0, :-1]]
        )
        targets = torch.cat([ids[0, 1:32], ids[0, 33:]])
        nll = torch.nn.functional.cross_entropy(logits, targets).item()
    emb, surprise = model_embed_and_surprise(model, tokens)
    torch.testing.assert_close(emb, expect, rtol=1e-4, atol=1e-5)
    assert abs(surprise - nll) < 1e-4
    assert abs(surprise - np.log(300)) < 0.5  # untrained: about uniform
    hit = sem.search(expect.numpy(), 1)[0]
    assert hit.scores[0] > 0.9999 and hit.metadata[0]["src"] == "chat"
    assert abs(hit.metadata[0]["surprise"] - nll) < 1e-4
    with pytest.raises(ValueError, match="dimension"):
        MemoryConsolidator(ep, SemanticMemory(16, 10), model=model, decode_fn=str)


def test_background_thread_runs_and_stops(ssm):
    ep = EpisodicMemory(ssm, max_entries=16)
    sem = SemanticMemory(D_MODEL, 100, "flat")
    g = torch.Generator().manual_seed(2)
    embs = {i: torch.randn(D_MODEL, generator=g) for i in range(4)}
    enc = fixed_encoders(embs, {i: 5.0 for i in range(4)})
    with MemoryConsolidator(ep, sem, interval_s=0.01, **enc) as cons:
        fill(ep, range(4))
        deadline = time.time() + 10
        while sem.size() < 4 and time.time() < deadline:
            time.sleep(0.01)
        assert cons.running
    assert not cons.running and sem.size() == 4 and ep.size() == 0

    def boom(tokens):
        raise ZeroDivisionError("encoder failed")

    fill(ep, [9])
    enc["surprise_fn"] = boom
    cons = MemoryConsolidator(ep, sem, interval_s=0.01, **enc).start()
    deadline = time.time() + 10
    while cons.running and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="background consolidation failed"):
        cons.stop()
