"""SemanticMemory / VectorIndex: every index kind adds, finds, removes and round-trips;
no FAISS -1 sentinel ever escapes; snapshots survive kill -9; threads lose nothing;
corrupt files and wrong dimensions fail loudly at the call."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hmst.memory import (
    CorruptFileError,
    IndexConfig,
    MemoryFullError,
    SemanticMemory,
    VectorIndex,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 16

# Small configs: IVF trains lazily after `train_size` vectors; nprobe = nlist makes
# IVF exact so results can be compared with the flat index.
CONFIGS = {
    "flat": IndexConfig(kind="flat"),
    "ivf": IndexConfig(kind="ivf", nlist=4, nprobe=4, train_size=200),
    "ivfpq": IndexConfig(
        kind="ivfpq", nlist=4, nprobe=4, pq_m=8, pq_nbits=6, train_size=200
    ),
    "hnsw": IndexConfig(kind="hnsw", hnsw_m=8, ef_search=64),
}


def clustered(n, seed=0, dim=DIM, n_clusters=8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim)).astype(np.float32) * 3
    labels = rng.integers(0, n_clusters, size=n)
    return centers[labels] + rng.normal(size=(n, dim)).astype(np.float32)


def memory(kind, max_entries=10_000, **kw):
    return SemanticMemory(DIM, max_entries, kind, index_config=CONFIGS[kind], **kw)


def texts(ids):
    return [f"doc {i}" for i in ids]


def self_hit_rate(mem, x, ids):
    results = mem.search(x, 1)
    return np.mean([len(r.ids) and r.ids[0] == i for r, i in zip(results, ids)])


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_add_search_remove(kind):
    mem = memory(kind)
    x = clustered(400)
    first = mem.add_batch(x[:100], texts(range(100)), [{"i": i} for i in range(100)])
    assert first.tolist() == list(range(100))
    if kind in ("ivf", "ivfpq"):  # below train_size: buffered, searched exactly
        assert not mem.index.is_trained
        assert self_hit_rate(mem, x[:100], range(100)) == 1.0
    mem.add_batch(x[100:], texts(range(100, 400)), [{"i": i} for i in range(100, 400)])
    assert mem.index.is_trained and mem.size() == 400
    rate = self_hit_rate(mem, x, range(400))
    assert rate >= (0.95 if kind in ("ivfpq", "hnsw") else 1.0), rate
    hit = mem.search(x[7], 3)[0]
    assert hit.ids[0] == 7 and hit.texts[0] == "doc 7" and hit.metadata[0] == {"i": 7}
    assert np.all(np.diff(hit.scores) <= 1e-6)  # cosine, best first
    assert mem.retrieve(x[7], 2)[0] == "doc 7"

    gone = np.arange(0, 400, 2)
    assert mem.remove(gone) == 200
    assert mem.remove([0, 2, 10**9]) == 0  # already removed / never stored
    assert mem.size() == 200
    for r in mem.search(x, 10):
        assert not np.isin(r.ids, gone).any()
        assert len(r.ids) == 10
    assert mem.get([2, 3]) == {3: ("doc 3", {"i": 3})}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_no_sentinels(kind):
    mem = memory(kind)
    x = clustered(300)
    mem.add_batch(x[:5], texts(range(5)))
    for r in mem.search(x[:20], 50):  # k far above the 5 stored
        assert len(r.ids) == 5 and (r.ids >= 0).all() and np.isfinite(r.scores).all()
        assert len(r.texts) == len(r.metadata) == 5
    mem.add_batch(x[5:], texts(range(5, 300)))
    scores, ids = mem.index.search_padded(x[:20], 400)  # FAISS pads these with -1
    assert (ids == -1).any()
    for r in mem.search(x[:20], 400):
        assert (r.ids >= 0).all() and len(r.ids) <= 300


def test_ivf_nprobe1_sentinels_filtered():
    cfg = IndexConfig(kind="ivf", nlist=8, nprobe=1, train_size=320)
    mem = SemanticMemory(DIM, 10_000, "ivf", index_config=cfg)
    x = clustered(400, n_clusters=8)
    mem.add_batch(x, texts(range(400)))
    _, ids = mem.index.search_padded(x[:50], 200)
    assert (ids == -1).any()  # one cell holds fewer than 200 vectors
    for r in mem.search(x[:50], 200):
        assert 0 < len(r.ids) < 200 and (r.ids >= 0).all()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_load_round_trip(kind, tmp_path):
    mem = memory(kind)
    x = clustered(300, seed=1)
    mem.add_batch(x, texts(range(300)), [{"k": [i]} for i in range(300)])
    mem.remove(range(0, 300, 3))
    path = str(tmp_path / "mem")
    mem.save(path)
    before = mem.search(x[:32], 5)
    back = SemanticMemory.load(path)
    assert back.size() == mem.size() == 200
    for a, b in zip(before, back.search(x[:32], 5)):
        assert a.ids.tolist() == b.ids.tolist() and a.texts == b.texts
        assert a.metadata == b.metadata
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    # Writes after an mmap load go to a private copy; the snapshot is untouched.
    new_id = back.add(x[0], "again", {"n": 1})
    assert new_id == 300 and back.retrieve(x[0], 1) == ["again"]
    back.remove([1])
    assert SemanticMemory.load(path).size() == 200
    back.save(path)  # overwrite the snapshot it was mapped from
    again = SemanticMemory.load(path, mmap=False)
    assert again.size() == 200 and again.get([300])[300] == ("again", {"n": 1})


_CHILD = """
import sys
import numpy as np
sys.path.insert(0, {root!r})
from hmst.memory import SemanticMemory
mem = SemanticMemory(8, 1_000_000, "flat")
n = 0
while True:
    x = np.random.default_rng(n).normal(size=(50, 8)).astype(np.float32)
    mem.add_batch(x, [f"doc {{i}}" for i in range(n, n + 50)])
    n += 50
    if n % 100 == 0:
        mem.save({path!r})
        print(n, flush=True)
"""


def test_kill9_during_adds_keeps_last_save(tmp_path):
    path = str(tmp_path / "mem")
    code = _CHILD.format(root=ROOT, path=path)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    )
    try:
        saved = [int(proc.stdout.readline()) for _ in range(4)]
        time.sleep(0.013)  # somewhere inside the next adds or save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        saved += [int(line) for line in proc.stdout.read().split()]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and saved[-1] >= 400
    mem = SemanticMemory.load(path)
    n = mem.size()
    assert n >= saved[-1] and n % 100 == 0  # the last save, or one that just finished
    rows = mem.get(range(n))
    assert all(rows[i][0] == f"doc {i}" for i in range(n))
    x = np.random.default_rng(saved[-1] - 50).normal(size=(50, 8)).astype(np.float32)
    assert [r.ids[0] for r in mem.search(x, 1)] == list(
        range(saved[-1] - 50, saved[-1])
    )


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_four_threads_add_and_search(kind):
    mem = memory(kind)  # ivf crosses its train_size while threads run
    x = clustered(400, seed=2)
    errors, got = [], [[] for _ in range(4)]

    def work(t):
        for j in range(t * 100, (t + 1) * 100):
            i = mem.add(x[j], f"doc {j}", {"thread": t})
            got[t].append((i, j))
            if mem.search(x[j], 1)[0].texts != [f"doc {j}"]:
                errors.append((t, j))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    pairs = [p for g in got for p in g]
    assert sorted(i for i, _ in pairs) == list(range(400)) and mem.size() == 400
    rows = mem.get(range(400))
    assert all(rows[i][0] == f"doc {j}" for i, j in pairs)


@pytest.mark.parametrize("victim", ["index.faiss", "exact.faiss", "entries.sqlite"])
def test_truncated_file_is_named(victim, tmp_path):
    mem = memory("ivfpq")
    mem.add_batch(clustered(300), texts(range(300)))
    path = str(tmp_path / "mem")
    mem.save(path)
    f = os.path.join(path, victim)
    os.truncate(f, os.path.getsize(f) // 2)
    with pytest.raises(CorruptFileError, match=victim):
        SemanticMemory.load(path)


def test_corrupt_index_and_manifest_are_named(tmp_path):
    mem = memory("flat")
    mem.add_batch(clustered(50), texts(range(50)))
    path = str(tmp_path / "mem")
    mem.save(path)
    f = os.path.join(path, "index.faiss")
    size = os.path.getsize(f)
    with open(f, "wb") as fh:  # same size, garbage content
        fh.write(b"\0" * size)
    with pytest.raises(CorruptFileError, match="index.faiss"):
        SemanticMemory.load(path)
    m = os.path.join(path, "manifest.json")
    os.truncate(m, os.path.getsize(m) // 2)
    with pytest.raises(CorruptFileError, match="manifest.json"):
        SemanticMemory.load(path)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_dimension_mismatch_raises_at_call(kind):
    mem = memory(kind)
    mem.add_batch(clustered(10), texts(range(10)))
    with pytest.raises(ValueError, match="dimension 16"):
        mem.add(np.ones(DIM + 1, np.float32), "bad")
    with pytest.raises(ValueError, match="dimension 16"):
        mem.add_batch(np.ones((3, 8), np.float32), texts(range(3)))
    with pytest.raises(ValueError, match="dimension 16"):
        mem.search(np.ones((2, 1536), np.float32), 3)
    with pytest.raises(ValueError, match="dimension 16"):
        mem.retrieve(np.ones(1024, np.float32))
    assert mem.size() == 10 and mem.get([10]) == {}  # nothing half-written


def test_capacity_policies():
    x = clustered(30)
    mem = SemanticMemory(DIM, 10, "flat")  # default: evict oldest
    mem.add_batch(x[:8], texts(range(8)))
    mem.add_batch(x[8:12], texts(range(8, 12)))
    assert mem.size() == 10 and sorted(mem.get(range(12))) == list(range(2, 12))
    assert mem.search(x[0], 1)[0].ids[0] != 0
    strict = SemanticMemory(DIM, 10, "flat", on_full="error")
    strict.add_batch(x[:10], texts(range(10)))
    with pytest.raises(MemoryFullError):
        strict.add(x[10], "one too many")
    assert strict.size() == 10
    with pytest.raises(MemoryFullError):
        mem.add_batch(x[:11], texts(range(11)))


def test_hnsw_tombstones_and_compaction():
    index = VectorIndex(DIM, CONFIGS["hnsw"])
    x = clustered(200)
    index.add(x, np.arange(200))
    assert index.remove(np.arange(80)) == 80  # tombstoned, graph kept
    assert index.ntotal == 120 and index._main.ntotal == 200
    for ids, _ in index.search(x, 20):
        assert (ids >= 80).all() and len(ids) == 20
    assert index.remove(np.arange(80, 150)) == 70  # tombstones > live: rebuilt
    assert index.ntotal == 50 and index._main.ntotal == 50
    for ids, _ in index.search(x[150:], 1):
        assert ids[0] >= 150


def test_crash_inside_save_keeps_previous_snapshot(tmp_path, monkeypatch):
    mem = memory("flat")
    x = clustered(60)
    mem.add_batch(x[:30], texts(range(30)))
    path = str(tmp_path / "mem")
    mem.save(path)
    mem.add_batch(x[30:], texts(range(30, 60)))
    real_write = mem.index.write

    def write_then_die(directory):
        real_write(directory)
        raise KeyboardInterrupt("simulated crash after the index file, before the db")

    monkeypatch.setattr(mem.index, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        mem.save(path)
    assert SemanticMemory.load(path).size() == 30
    os.rename(path, path + ".old")  # a crash between write_dir_atomic's two renames
    assert SemanticMemory.load(path).size() == 30
