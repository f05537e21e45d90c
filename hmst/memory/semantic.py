"""Semantic memory (the L3 store): embeddings in a FAISS `VectorIndex`, their text and
metadata in SQLite beside it, keyed by the same int64 id.

Ids are assigned in insertion order and never reused, so "oldest" is "smallest id".

Capacity: at most `max_entries` live entries. With `on_full="evict_oldest"` (default)
an add that would exceed it first removes the oldest entries (FIFO, no index rebuild);
with `on_full="error"` it raises `MemoryFullError` and stores nothing. A single batch
larger than `max_entries` is always an error.

Durability: the unit is the snapshot. The live store is in memory (FAISS index + an
in-memory SQLite database, both under one lock); `save(path)` writes a complete
snapshot directory (index files, `entries.sqlite` via SQLite's backup API,
`manifest.json` with every file's size) to `<path>.tmp`, fsyncs it and swaps it in by
rename (`hmst.checkpoint.write_dir_atomic`). A crash at any moment leaves the previous
snapshot loadable, so after `kill -9` a reopen holds exactly the last completed save.
No live on-disk database means no WAL: its job (readers beside a writer, crash
recovery of partial transactions) is done by the lock and the snapshot swap.

`load(path)` maps the index files (mmap; the first write after it takes an in-memory
copy) and copies the database into memory. A truncated or unreadable file raises one
`CorruptFileError` naming that file.

Thread safety: every public method takes the instance's lock, so concurrent adds and
searches from several threads serialise and lose nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from hmst.checkpoint import write_dir_atomic
from hmst.memory.index import (
    CorruptFileError,
    IndexConfig,
    VectorIndex,
    check_size,
    read_json_header,
)

MANIFEST_FILE = "manifest.json"
DB_FILE = "entries.sqlite"
FORMAT = "hmst-semantic-memory"
VERSION = 1
_SQL_CHUNK = 900  # ids per `IN (...)` query, under SQLite's host-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created REAL NOT NULL
)
"""


class MemoryFullError(RuntimeError):
    """Adding would exceed `max_entries` under `on_full="error"`."""


@dataclass
class SearchResult:
    """One query's hits, best first (no FAISS -1 padding)."""

    ids: np.ndarray
    scores: np.ndarray
    texts: list[str]
    metadata: list[dict]


def _connect_memory() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    db.execute(_SCHEMA)
    return db


class SemanticMemory:
    """FAISS-backed long-term memory of (embedding, text, metadata) entries.

    `index_type`: flat | ivf | ivfpq | hnsw (see `hmst.memory.index`); `index_config`
    overrides the index's other knobs (nlist, nprobe, k_factor, ...). `use_gpu`: None
    means "if faiss reports a GPU".
    """

    def __init__(
        self,
        dimension: int = 256,
        max_entries: int = 1_000_000,
        index_type: str = "flat",
        use_gpu: bool | None = None,
        *,
        index_config: IndexConfig | None = None,
        on_full: str = "evict_oldest",
    ):
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        if on_full not in ("evict_oldest", "error"):
            raise ValueError(
                f"on_full must be 'evict_oldest' or 'error', not {on_full!r}"
            )
        if index_config is None:
            index_config = IndexConfig(kind=index_type)
        elif index_config.kind != index_type:
            raise ValueError(
                f"index_type {index_type!r} disagrees with index_config.kind "
                f"{index_config.kind!r}"
            )
        self.dimension = dimension
        self.max_entries = max_entries
        self.on_full = on_full
        self._index = VectorIndex(dimension, index_config, max_entries, use_gpu)
        self._db = _connect_memory()
        self._next_id = 0
        self._lock = threading.RLock()

    @property
    def index(self) -> VectorIndex:
        return self._index

    def size(self) -> int:
        with self._lock:
            return self._index.ntotal

    def __len__(self) -> int:
        return self.size()

    # -- writes ---------------------------------------------------------------------

    def add(self, embedding, text: str, metadata: dict | None = None) -> int:
        """Store one entry; returns its id."""
        return int(self.add_batch(embedding, [text], [metadata])[0])

    def add_batch(self, embeddings, texts, metadata=None) -> np.ndarray:
        """Store len(texts) entries (embeddings (N, dimension)); returns their ids."""
        x_ND = self._index.check_vectors(embeddings, "embeddings")
        texts = list(texts)
        metas = list(metadata) if metadata is not None else [None] * len(texts)
        if not (len(x_ND) == len(texts) == len(metas)):
            raise ValueError(
                f"{len(x_ND)} embeddings, {len(texts)} texts, {len(metas)} metadata"
            )
        if len(texts) > self.max_entries:
            raise MemoryFullError(
                f"a batch of {len(texts)} exceeds max_entries {self.max_entries}"
            )
        # Serialise first: a bad text/metadata must fail before the index changes.
        rows_meta = [json.dumps(m or {}) for m in metas]
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be str, got {type(t).__name__}")
        with self._lock:
            self._make_room(len(texts))
            ids = np.arange(self._next_id, self._next_id + len(texts), dtype=np.int64)
            self._index.add(x_ND, ids)
            now = time.time()
            self._db.executemany(
                "INSERT INTO entries (id, text, metadata, created) VALUES (?,?,?,?)",
                zip(ids.tolist(), texts, rows_meta, [now] * len(texts)),
            )
            self._next_id += len(texts)
            return ids

    def _make_room(self, n: int) -> None:
        excess = self._index.ntotal + n - self.max_entries
        if excess <= 0:
            return
        if self.on_full == "error":
            raise MemoryFullError(
                f"adding {n} entries to {self._index.ntotal} exceeds max_entries "
                f"{self.max_entries}"
            )
        oldest = [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM entries ORDER BY id LIMIT ?", (excess,)
            )
        ]
        self._remove_locked(oldest)

    def remove(self, ids) -> int:
        """Remove entries by id (unknown ids are ignored); returns how many went."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        with self._lock:
            return self._remove_locked(ids)

    def _remove_locked(self, ids: list[int]) -> int:
        n = self._index.remove(ids)
        for start in range(0, len(ids), _SQL_CHUNK):
            chunk = ids[start : start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            self._db.execute(f"DELETE FROM entries WHERE id IN ({marks})", chunk)
        return n

    def update_metadata(self, entry_id: int, metadata: dict, merge: bool = True):
        """Replace (or, with `merge`, update) one entry's metadata; KeyError if the id
        is not stored."""
        with self._lock:
            row = self._db.execute(
                "SELECT metadata FROM entries WHERE id = ?", (int(entry_id),)
            ).fetchone()
            if row is None:
                raise KeyError(f"no semantic memory entry with id {entry_id}")
            new = {**json.loads(row[0]), **metadata} if merge else dict(metadata)
            self._db.execute(
                "UPDATE entries SET metadata = ? WHERE id = ?",
                (json.dumps(new), int(entry_id)),
            )

    # -- reads ----------------------------------------------------------------------

    def get(self, ids) -> dict[int, tuple[str, dict]]:
        """{id: (text, metadata)} for the stored ones among `ids`."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        with self._lock:
            return self._rows(ids)

    def _rows(self, ids: list[int]) -> dict[int, tuple[str, dict]]:
        out = {}
        for start in range(0, len(ids), _SQL_CHUNK):
            chunk = ids[start : start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            for i, text, meta in self._db.execute(
                f"SELECT id, text, metadata FROM entries WHERE id IN ({marks})", chunk
            ):
                out[i] = (text, json.loads(meta))
        return out

    def search(self, queries, top_k: int = 5) -> list[SearchResult]:
        """Batched search: queries (Q, dimension) or (dimension,) -> one SearchResult
        per query (scores: cosine similarity for the default metric)."""
        with self._lock:
            hits = self._index.search(queries, top_k)
            rows = self._rows(sorted({int(i) for ids, _ in hits for i in ids}))
        results = []
        for ids, scores in hits:
            missing = [int(i) for i in ids if int(i) not in rows]
            if missing:  # index and database disagree: a bug, never silently skipped
                raise RuntimeError(
                    f"ids {missing[:5]} are in the index but not in SQLite"
                )
            results.append(
                SearchResult(
                    ids=ids,
                    scores=scores,
                    texts=[rows[int(i)][0] for i in ids],
                    metadata=[rows[int(i)][1] for i in ids],
                )
            )
        return results

    def retrieve(self, query, top_k: int = 5) -> list[str]:
        """The design's API: texts of the top_k entries nearest one query."""
        return self.search(query, top_k)[0].texts

    # -- persistence ----------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write an atomic snapshot directory at `path` (see module docstring)."""
        with self._lock:
            write_dir_atomic(path, self._write_snapshot)

    def _write_snapshot(self, tmp: str) -> None:
        sizes = self._index.write(tmp)
        db_path = os.path.join(tmp, DB_FILE)
        dst = sqlite3.connect(db_path)
        try:
            self._db.backup(dst)
        finally:
            dst.close()
        sizes[DB_FILE] = os.path.getsize(db_path)
        manifest = dict(
            format=FORMAT,
            version=VERSION,
            dimension=self.dimension,
            max_entries=self.max_entries,
            on_full=self.on_full,
            next_id=self._next_id,
            size=self._index.ntotal,
            index_config=asdict(self._index.config),
            files=sizes,
        )
        with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=1)

    @classmethod
    def load(
        cls, path: str, mmap: bool = True, use_gpu: bool | None = None
    ) -> "SemanticMemory":
        """Reopen a snapshot written by `save` (falls back to `<path>.old` if a save
        was interrupted between its two renames)."""
        path = _resolve(path)
        manifest = _read_manifest(os.path.join(path, MANIFEST_FILE))
        config = IndexConfig(**manifest["index_config"])
        self = cls(
            manifest["dimension"],
            manifest["max_entries"],
            config.kind,
            use_gpu,
            index_config=config,
            on_full=manifest["on_full"],
        )
        files = manifest["files"]
        db_path = os.path.join(path, DB_FILE)
        check_size(db_path, files[DB_FILE])
        index_files = {k: v for k, v in files.items() if k != DB_FILE}
        self._index = VectorIndex.read(
            path, manifest["dimension"], config, index_files, mmap, use_gpu
        )
        try:
            src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            try:
                src.backup(self._db)
            finally:
                src.close()
            (n_rows,) = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()
        except sqlite3.DatabaseError as e:
            raise CorruptFileError(
                f"{db_path}: not a readable SQLite file ({e})"
            ) from e
        if n_rows != self._index.ntotal or n_rows != manifest["size"]:
            raise CorruptFileError(
                f"{path}: {DB_FILE} holds {n_rows} entries, the index "
                f"{self._index.ntotal}, the manifest {manifest['size']}"
            )
        self._next_id = manifest["next_id"]
        return self


def _resolve(path: str) -> str:
    path = path.rstrip("/")
    for candidate in (path, path + ".old"):
        if os.path.isfile(os.path.join(candidate, MANIFEST_FILE)):
            return candidate
    raise FileNotFoundError(f"no semantic memory snapshot ({MANIFEST_FILE}) at {path}")


def _read_manifest(path: str) -> dict:
    return read_json_header(path, FORMAT, VERSION)
