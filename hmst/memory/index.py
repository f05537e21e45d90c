"""A FAISS vector index with stable int64 ids, removal without rebuild, lazy IVF
training and mmap reopen (the index under `SemanticMemory`).

Kinds (`IndexConfig.kind`):
    flat    exact search: IndexIDMap2(IndexFlat)
    ivf     IndexIVFFlat, native ids
    ivfpq   IndexIVFPQ, native ids; with `refine` (default) the top `k * k_factor`
            PQ candidates are re-ranked by exact distance against an id-mapped flat
            store (what IndexRefineFlat does, but IndexRefineFlat cannot remove ids)
    hnsw    IndexIDMap2(IndexHNSWFlat); HNSW cannot remove, so `remove` writes
            tombstones that searches exclude through an IDSelector, and the graph is
            rebuilt (`compact`) once tombstones outnumber live vectors

Lazy training (ivf, ivfpq): until `train_size` vectors exist (default 39 x nlist, and
39 x 2^pq_nbits for PQ's codebooks) vectors live in an exact id-mapped flat buffer that
is searched exactly; when it is full the IVF is trained on it, the buffered vectors are
re-added with their ids, and the buffer is dropped (or kept as the re-ranking store).

Metric: "cosine" (vectors L2-normalised, inner product; scores are cosines, higher is
better), "ip" (raw inner product) or "l2" (squared distances, lower is better).

GPU: when `faiss.get_num_gpus() > 0` (or `use_gpu=True`) searches run on a GPU clone of
the CPU index; adds go to both, a removal or training re-clones on the next search. The
CPU index is the source of truth and the only thing ever written, so a saved index is
always a CPU index. HNSW stays on the CPU (FAISS has no GPU HNSW).

Shapes: N vectors added, Q queries, D dimension, K neighbours.
"""

from __future__ import annotations

import dataclasses
import logging
import json
import math
import os
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
METRICS = {"cosine": faiss.METRIC_INNER_PRODUCT, "ip": faiss.METRIC_INNER_PRODUCT}
METRICS["l2"] = faiss.METRIC_L2

MAIN_FILE = "index.faiss"
EXACT_FILE = "exact.faiss"
TOMBSTONE_FILE = "tombstones.npy"


class CorruptFileError(ValueError):
    """A persisted memory file is truncated or unreadable; the message names it."""


def read_json_header(path: str, fmt: str, version: int) -> dict:
    """Load a memory snapshot's JSON header and check its format tag and version."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: truncated or not JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise CorruptFileError(f"{path}: not a {fmt} file")
    if data.get("version") != version:
        raise CorruptFileError(
            f"{path}: format version {data.get('version')}, expected {version}"
        )
    return data


@dataclass
class IndexConfig:
    """How a `VectorIndex` is built (persisted with it as JSON)."""

    kind: str = "flat"
    """flat | ivf | ivfpq | hnsw."""
    metric: str = "cosine"
    """cosine | ip | l2."""
    nlist: int = 0
    """IVF cells; 0 derives ~4 sqrt(capacity) rounded to a power of two."""
    nprobe: int = 16
    """IVF cells visited per query."""
    pq_m: int = 0
    """PQ sub-quantizers; 0 means dimension // 4 (64 bytes per 256-d vector)."""
    pq_nbits: int = 8
    """Bits per PQ code."""
    refine: bool = True
    """ivfpq: re-rank PQ candidates by exact distance (keeps the raw vectors)."""
    k_factor: int = 4
    """ivfpq + refine: PQ candidates per requested neighbour."""
    hnsw_m: int = 32
    """HNSW graph degree."""
    ef_construction: int = 40
    """HNSW build beam width."""
    ef_search: int = 64
    """HNSW search beam width."""
    train_size: int = 0
    """Vectors buffered before IVF training; 0 means the FAISS minimum (see module)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown index kind {self.kind!r}; expected one of {KINDS}"
            )
        if self.metric not in METRICS:
            raise ValueError(
                f"unknown metric {self.metric!r}; expected {list(METRICS)}"
            )
        if self.k_factor < 1 or self.nprobe < 1:
            raise ValueError("k_factor and nprobe must be >= 1")

    def resolved(self, dim: int, capacity: int) -> "IndexConfig":
        """A copy with the derived defaults (nlist, pq_m, train_size) filled in."""
        c = dataclasses.replace(self)
        if c.nlist <= 0:
            c.nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(capacity, 1)), 1)))
        if c.kind == "ivfpq":
            c.pq_m = c.pq_m or max(dim // 4, 1)
            if dim % c.pq_m:
                raise ValueError(f"pq_m {c.pq_m} must divide dimension {dim}")
        if c.train_size <= 0:
            need = 39 * c.nlist
            if c.kind == "ivfpq":
                need = max(need, 39 * 2**c.pq_nbits)
            c.train_size = need
        return c


def _ids_array(ids) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def _id_map(idmap) -> np.ndarray:
    """The external ids held by an IndexIDMap2, in storage order."""
    return faiss.vector_to_array(idmap.id_map).astype(np.int64, copy=False)


def _read_owned(f):
    """Read a whole index into memory from an open binary file."""
    f.seek(0)
    return faiss.read_index(faiss.PyCallbackIOReader(f.read))


class VectorIndex:
    """FAISS index with int64 ids. Not thread-safe by itself: callers hold a lock
    (`SemanticMemory` does)."""

    def __init__(
        self,
        dim: int,
        config: IndexConfig | None = None,
        capacity: int = 1_000_000,
        use_gpu: bool | None = None,
    ):
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        self.dim = dim
        self.config = (config or IndexConfig()).resolved(dim, capacity)
        self._faiss_metric = METRICS[self.config.metric]
        num_gpus = faiss.get_num_gpus()
        if use_gpu and num_gpus == 0:
            raise ValueError("use_gpu=True but faiss reports no GPUs (faiss-cpu?)")
        self.use_gpu = bool(num_gpus > 0 if use_gpu is None else use_gpu)
        if self.use_gpu and self.config.kind == "hnsw":
            log.info("FAISS has no GPU HNSW: the hnsw index stays on the CPU")
            self.use_gpu = False
        self._gpu = None  # search-side GPU clone of self._main
        self._gpu_res = None
        self._readonly = False  # True after an mmap load, until the first write
        self._sources: dict = {}  # open files of the mapped indexes (for _writable)
        self._tombstones: set[int] = set()
        self._main = self._new_main()
        # Exact id-mapped store: the pre-training buffer of ivf kinds, and for
        # ivfpq+refine the re-ranking store for the index's whole life.
        self._exact = self._new_flat() if self.config.kind in ("ivf", "ivfpq") else None

    # -- construction ---------------------------------------------------------------

    def _new_flat(self):
        return faiss.IndexIDMap2(faiss.IndexFlat(self.dim, self._faiss_metric))

    def _new_main(self):
        c, d, m = self.config, self.dim, self._faiss_metric
        if c.kind == "flat":
            return self._new_flat()
        if c.kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(d, c.hnsw_m, m)
            hnsw.hnsw.efConstruction = c.ef_construction
            hnsw.hnsw.efSearch = c.ef_search
            return faiss.IndexIDMap2(hnsw)
        quantizer = faiss.IndexFlat(d, m)
        if c.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, c.nlist, m)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, c.nlist, c.pq_m, c.pq_nbits, m)
        index.nprobe = c.nprobe
        return index

    # -- properties -----------------------------------------------------------------

    @property
    def is_trained(self) -> bool:
        return bool(self._main.is_trained)

    @property
    def _buffering(self) -> bool:
        """ivf kinds before training: vectors live in the exact buffer only."""
        return not self._main.is_trained

    @property
    def ntotal(self) -> int:
        if self._buffering:
            return int(self._exact.ntotal)
        return int(self._main.ntotal) - len(self._tombstones)

    # -- validation -----------------------------------------------------------------

    def check_vectors(self, x, what: str) -> np.ndarray:
        if hasattr(x, "detach"):  # torch tensor
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"{what} has shape {tuple(x.shape)}: expected (n, {self.dim}) or "
                f"({self.dim},) for this index of dimension {self.dim}"
            )
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or inf")
        x = np.ascontiguousarray(x)
        if self.config.metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if (norms == 0).any():
                raise ValueError(f"{what} contains a zero vector (cosine metric)")
            x = x / norms
        return x

    # -- writes ---------------------------------------------------------------------

    def _writable(self):
        """Copy-on-first-write after an mmap load: FAISS aborts the process when a
        mapped (read-only) index is modified, so read an owned copy first, from the
        file handles kept open at load (valid even if a later save replaced the
        files; one read, no serialise/deserialise round trip)."""
        if not self._readonly:
            return
        self._main = _read_owned(self._sources[MAIN_FILE])
        if hasattr(self._main, "nprobe"):
            self._main.nprobe = self.config.nprobe
        if self._exact is not None:
            self._exact = _read_owned(self._sources[EXACT_FILE])
        for f in self._sources.values():
            f.close()
        self._sources = {}
        self._readonly = False

    def add(self, vectors_ND, ids_N) -> None:
        x = self.check_vectors(vectors_ND, "vectors")
        ids = _ids_array(ids_N)
        if len(ids) != len(x):
            raise ValueError(f"{len(x)} vectors but {len(ids)} ids")
        if len(x) == 0:
            return
        self._writable()
        if self._buffering:
            self._exact.add_with_ids(x, ids)
            if self._exact.ntotal >= self.config.train_size:
                self._train_from_buffer()
            return
        self._main.add_with_ids(x, ids)
        if self._exact is not None:
            self._exact.add_with_ids(x, ids)
        if self._gpu is not None:
            self._gpu.add_with_ids(x, ids)

    def _train_from_buffer(self) -> None:
        buf = self._exact
        ids = _id_map(buf)
        x = buf.index.reconstruct_n(0, buf.ntotal)
        log.info("training %s on %d buffered vectors", self.config.kind, len(x))
        self._main.train(x)
        self._main.add_with_ids(x, ids)
        if not (self.config.kind == "ivfpq" and self.config.refine):
            self._exact = None
        self._gpu = None

    def remove(self, ids) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed."""
        ids = _ids_array(ids)
        if len(ids) == 0:
            return 0
        self._writable()
        if self.config.kind == "hnsw":
            return self._tombstone(ids)
        sel = faiss.IDSelectorBatch(ids)
        if self._buffering:
            return int(self._exact.remove_ids(sel))
        n = int(self._main.remove_ids(sel))
        if self._exact is not None:
            self._exact.remove_ids(sel)
        self._gpu = None  # GPU IVF/flat indexes cannot remove ids: re-clone lazily
        return n

    def _tombstone(self, ids) -> int:
        stored = _id_map(self._main)
        alive = np.setdiff1d(stored, np.fromiter(self._tombstones, np.int64))
        hit = np.intersect1d(np.unique(ids), alive)
        self._tombstones.update(int(i) for i in hit)
        if len(self._tombstones) > self.ntotal:
            self.compact()
        return len(hit)

    def compact(self) -> None:
        """Rebuild an HNSW graph without its tombstoned vectors (other kinds remove in
        place and need no compaction)."""
        if self.config.kind != "hnsw" or not self._tombstones:
            return
        self._writable()
        ids = _id_map(self._main)
        keep = ~np.isin(ids, np.fromiter(self._tombstones, np.int64))
        x = self._main.index.reconstruct_n(0, self._main.ntotal)[keep]
        self._main = self._new_main()
        self._tombstones = set()
        if len(x):
            self._main.add_with_ids(x, ids[keep])

    # -- search ---------------------------------------------------------------------

    def set_search_params(self, nprobe=None, k_factor=None, ef_search=None) -> None:
        """Retune search speed/recall (kept in `config`, so saved with the index)."""
        c = self.config
        if nprobe is not None:
            c.nprobe = int(nprobe)
            if hasattr(self._main, "nprobe"):
                self._main.nprobe = c.nprobe
            self._gpu = None
        if k_factor is not None:
            c.k_factor = int(k_factor)
        if ef_search is not None:
            c.ef_search = int(ef_search)
            if c.kind == "hnsw":
                self._main.index.hnsw.efSearch = c.ef_search

    def _search_index(self):
        if not self.use_gpu or self.config.kind == "hnsw":
            return self._main
        if self._gpu is None:
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._main)
        return self._gpu

    def search_padded(self, queries_QD, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores_QK, ids_QK) as FAISS gives them: rows padded with id -1 where fewer
        than k neighbours exist. Prefer `search`, which drops the padding."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self.check_vectors(queries_QD, "queries")
        if self._buffering:
            return self._exact.search(q, k)
        if self.config.kind == "hnsw" and self._tombstones:
            dead = np.fromiter(self._tombstones, np.int64)
            params = faiss.SearchParametersHNSW(
                sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(dead)),
                efSearch=self.config.ef_search,
            )
            return self._main.search(q, k, params=params)
        if self.config.kind == "ivfpq" and self.config.refine:
            return self._search_refined(q, k)
        return self._search_index().search(q, k)

    def _search_refined(self, q_QD, k: int):
        _, cand_QC = self._search_index().search(q_QD, k * self.config.k_factor)
        valid_QC = cand_QC >= 0
        if not valid_QC.any():
            return np.full(cand_QC[:, :k].shape, np.nan, np.float32), cand_QC[:, :k]
        # Padding ids are swapped for a real id so one batched lookup serves all rows;
        # their scores are masked out below.
        flat_ids = np.where(valid_QC, cand_QC, cand_QC[valid_QC][0]).reshape(-1)
        vecs_QCD = self._exact.reconstruct_batch(flat_ids).reshape(*cand_QC.shape, -1)
        if self.config.metric == "l2":
            scores_QC = ((vecs_QCD - q_QD[:, None]) ** 2).sum(-1)
            scores_QC[~valid_QC] = np.inf
            order_QC = np.argsort(scores_QC, axis=1, kind="stable")
        else:
            scores_QC = np.einsum("qcd,qd->qc", vecs_QCD, q_QD)
            scores_QC[~valid_QC] = -np.inf
            order_QC = np.argsort(-scores_QC, axis=1, kind="stable")
        top_QK = order_QC[:, :k]
        ids_QK = np.take_along_axis(np.where(valid_QC, cand_QC, -1), top_QK, axis=1)
        scores_QK = np.take_along_axis(scores_QC, top_QK, axis=1).astype(np.float32)
        if ids_QK.shape[1] < k:  # fewer candidates than k (tiny indexes)
            pad = k - ids_QK.shape[1]
            ids_QK = np.pad(ids_QK, ((0, 0), (0, pad)), constant_values=-1)
            scores_QK = np.pad(scores_QK, ((0, 0), (0, pad)), constant_values=np.nan)
        return scores_QK, ids_QK

    def search(self, queries_QD, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (ids, scores) of up to k neighbours, best first; FAISS's -1
        sentinels (missing neighbours) are dropped."""
        scores_QK, ids_QK = self.search_padded(queries_QD, k)
        out = []
        for s, i in zip(scores_QK, ids_QK):
            keep = i >= 0
            out.append((i[keep], s[keep]))
        return out

    # -- persistence ----------------------------------------------------------------

    def write(self, directory: str) -> dict:
        """Write the CPU index files into `directory`; returns {file name: size} for
        the caller's manifest (sizes let a reader spot truncation before mapping)."""
        files = {MAIN_FILE: self._main}
        if self._exact is not None:
            files[EXACT_FILE] = self._exact
        sizes = {}
        for name, index in files.items():
            path = os.path.join(directory, name)
            faiss.write_index(index, path)
            sizes[name] = os.path.getsize(path)
        if self._tombstones:
            path = os.path.join(directory, TOMBSTONE_FILE)
            np.save(path, np.fromiter(sorted(self._tombstones), np.int64))
            sizes[TOMBSTONE_FILE] = os.path.getsize(path)
        return sizes

    @classmethod
    def read(
        cls,
        directory: str,
        dim: int,
        config: IndexConfig,
        sizes: dict,
        mmap: bool = True,
        use_gpu: bool | None = None,
    ) -> "VectorIndex":
        """Reopen what `write` wrote. With `mmap` the index files are mapped, not
        read: reopening is near-instant and pages load on first use; the first write
        takes an in-memory copy."""
        self = cls(dim, config, use_gpu=use_gpu)
        for name, size in sizes.items():
            check_size(os.path.join(directory, name), size)
        flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
        self._main = _read_index(os.path.join(directory, MAIN_FILE), flags)
        self._exact = None
        if EXACT_FILE in sizes:
            self._exact = _read_index(os.path.join(directory, EXACT_FILE), flags)
        if TOMBSTONE_FILE in sizes:
            dead = np.load(os.path.join(directory, TOMBSTONE_FILE))
            self._tombstones = set(int(i) for i in dead)
        if self._main.d != dim:
            raise CorruptFileError(
                f"{os.path.join(directory, MAIN_FILE)}: index dimension "
                f"{self._main.d} != manifest dimension {dim}"
            )
        if hasattr(self._main, "nprobe"):
            self._main.nprobe = self.config.nprobe
        if mmap:
            self._sources = {
                name: open(os.path.join(directory, name), "rb")
                for name in (MAIN_FILE, EXACT_FILE)
                if name in sizes
            }
        self._readonly = mmap
        return self


def check_size(path: str, expected: int) -> None:
    """Raise CorruptFileError naming `path` if it is missing or not `expected` bytes
    (mapping a truncated file would crash with SIGBUS on first touch)."""
    if not os.path.isfile(path):
        raise CorruptFileError(f"{path}: missing")
    actual = os.path.getsize(path)
    if actual != expected:
        raise CorruptFileError(
            f"{path}: truncated or altered ({actual} bytes, the manifest says "
            f"{expected})"
        )


def _read_index(path: str, flags: int):
    try:
        return faiss.read_index(path, flags)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise CorruptFileError(f"{path}: not a readable FAISS index ({first})") from e
