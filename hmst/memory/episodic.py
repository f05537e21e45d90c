"""Episodic memory (the L2 cache): a bounded FIFO buffer of recent interactions, each
keyed by the SSM's compression of its embeddings.

An entry keeps what was stored (token ids, metadata), its key (the SSM state (N,) of
the interaction's embeddings (L, Dm)), the mean of those embeddings (Dm,), an id
(insertion order, never reused), when it was added, and how often it was retrieved.
When full, the oldest entry is evicted.

Retrieval compares keys by cosine similarity, in the SSM's state space:
- `retrieve(query_emb (Dm,))` projects the query to d_state with `query_proj`
  (Linear Dm -> N, no bias). With `projection="ridge"` (default) the projection is
  fitted in closed form, whenever the buffer changed, by ridge regression from the
  stored entries' mean embeddings to their keys: a query that looks like a stored
  interaction lands on that interaction's key. With `projection="learned"` it is left
  alone for a training loop (Stage 2) to learn; it is saved and loaded either way.
- `retrieve_by_sequence(embeddings (L, Dm))` compresses the query with the same SSM,
  so it needs no projection.
- Without an SSM (`EpisodicMemory(None, d_model=D)`) the key is the mean embedding
  itself and queries are compared as they are (`projection="identity"`): what the
  inference engine uses with its retriever's sentence embeddings.

Both return `EpisodicHit`s with the stored tokens, metadata and the cosine score, and
count the access (the consolidator's importance uses it).

Persistence: `save(path)` writes `tensors.safetensors` (keys, means, projection,
tokens) and `entries.json` atomically (`write_dir_atomic`). The SSM is not saved: its
weights belong to the model checkpoint; `load(path, ssm)` checks it has the same
d_model and d_state.

Thread safety: one lock around every public method.
Shapes: N d_state, Dm d_model, L tokens, E entries.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hmst.checkpoint import write_dir_atomic
from hmst.memory.index import CorruptFileError, read_json_header

TENSORS_FILE = "tensors.safetensors"
ENTRIES_FILE = "entries.json"
FORMAT = "hmst-episodic-memory"
VERSION = 1


@dataclass
class EpisodicEntry:
    id: int
    tokens: list[int]
    metadata: dict
    key_N: torch.Tensor
    mean_Dm: torch.Tensor
    created: float
    access_count: int = 0
    last_access: float | None = None


@dataclass
class EpisodicHit:
    id: int
    score: float
    tokens: list[int]
    metadata: dict = field(default_factory=dict)


class EpisodicMemory:
    """Bounded buffer of recent interactions with SSM-compressed keys.

    `ssm` follows the `EpisodicMemorySSM` contract: `ssm(x (B, L, Dm),
    return_state=True) -> (y, state (B, N))`, attributes `d_model`, `d_state`.
    """

    def __init__(
        self,
        ssm=None,
        max_entries: int = 128,
        projection: str = "ridge",
        d_model: int | None = None,
    ):
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        if ssm is None:  # key = mean embedding; queries compared as they are
            if d_model is None:
                raise ValueError("EpisodicMemory without an ssm needs d_model")
            projection = "identity"
        elif projection not in ("ridge", "learned"):
            raise ValueError(
                f"projection must be 'ridge' or 'learned', not {projection!r}"
            )
        self.ssm = ssm
        if ssm is None:
            self.d_model = self.d_state = int(d_model)
        else:
            self.d_model, self.d_state = int(ssm.d_model), int(ssm.d_state)
        self.max_entries = max_entries
        self.projection = projection
        self.query_proj = nn.Linear(self.d_model, self.d_state, bias=False)
        self.ridge = 1e-3  # relative to the mean squared embedding norm
        self._entries: OrderedDict[int, EpisodicEntry] = OrderedDict()
        self._next_id = 0
        self._proj_stale = True
        self._lock = threading.RLock()

    # -- writes ---------------------------------------------------------------------

    def _embeddings(self, x, what: str) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.d_model or x.shape[0] == 0:
            raise ValueError(
                f"{what} has shape {tuple(x.shape)}: expected (L >= 1, {self.d_model})"
            )
        return x

    @torch.no_grad()
    def _encode(self, emb_LD: torch.Tensor) -> torch.Tensor:
        if self.ssm is None:
            return emb_LD.detach().float().mean(0).cpu()
        p = next(self.ssm.parameters(), None)
        x = emb_LD.to(p.dtype if p is not None else torch.float32)
        if p is not None:
            x = x.to(p.device)
        _, state_BN = self.ssm(x[None], return_state=True)
        return state_BN[0].detach().float().cpu()

    def add(self, tokens, embeddings, metadata: dict | None = None) -> int:
        """Store one interaction: token ids (L,), their embeddings (L, d_model).
        Evicts the oldest entry when full. Returns the new entry's id."""
        emb_LD = self._embeddings(embeddings, "embeddings")
        tokens = [int(t) for t in torch.as_tensor(tokens).reshape(-1).tolist()]
        if len(tokens) != emb_LD.shape[0]:
            raise ValueError(f"{len(tokens)} tokens but {emb_LD.shape[0]} embeddings")
        metadata = dict(metadata or {})
        json.dumps(metadata)  # must be persistable: fail here, not at save()
        key_N = self._encode(emb_LD)
        mean_Dm = emb_LD.detach().float().mean(0).cpu()
        with self._lock:
            entry_id = self._next_id
            self._next_id += 1
            self._entries[entry_id] = EpisodicEntry(
                entry_id, tokens, metadata, key_N, mean_Dm, time.time()
            )
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)  # FIFO: oldest first
            self._proj_stale = True
            return entry_id

    def remove(self, ids) -> int:
        with self._lock:
            n = 0
            for i in ids:
                n += self._entries.pop(int(i), None) is not None
            self._proj_stale = self._proj_stale or n > 0
            return n

    # -- reads ----------------------------------------------------------------------

    def size(self) -> int:
        with self._lock:
            return len(self._entries)

    def __len__(self) -> int:
        return self.size()

    def entries(self) -> list[EpisodicEntry]:
        """A snapshot (oldest first) of the stored entries."""
        with self._lock:
            return list(self._entries.values())

    def _fit_projection(self) -> None:
        """Ridge regression W = argmin ||M W^T - K||^2 + lam ||W||^2 from mean
        embeddings M (E, Dm) to keys K (E, N), in the dual form when E < Dm."""
        M = torch.stack([e.mean_Dm for e in self._entries.values()]).double()
        K = torch.stack([e.key_N for e in self._entries.values()]).double()
        lam = self.ridge * float((M * M).sum(1).mean()) + 1e-12
        if len(M) < self.d_model:
            G = M @ M.T + lam * torch.eye(len(M), dtype=M.dtype)
            Wt = M.T @ torch.linalg.solve(G, K)  # (Dm, N)
        else:
            G = M.T @ M + lam * torch.eye(self.d_model, dtype=M.dtype)
            Wt = torch.linalg.solve(G, M.T @ K)
        with torch.no_grad():
            self.query_proj.weight.copy_(Wt.T.float())
        self._proj_stale = False

    def retrieve(self, query_emb, top_k: int = 5) -> list[EpisodicHit]:
        """Entries nearest a query embedding (d_model,): projected to d_state, compared
        by cosine with the stored keys. Best first."""
        q = torch.as_tensor(query_emb).detach().float().reshape(-1)
        if q.numel() != self.d_model:
            raise ValueError(
                f"query has {q.numel()} values, expected d_model={self.d_model}"
            )
        with self._lock:
            if not self._entries:
                return []
            if self.projection == "ridge" and self._proj_stale:
                self._fit_projection()
            if self.projection == "identity":
                q_N = q
            else:
                with torch.no_grad():
                    q_N = self.query_proj(q[None])[0]
            return self._nearest(q_N, top_k)

    def retrieve_by_sequence(self, embeddings, top_k: int = 5) -> list[EpisodicHit]:
        """Entries nearest a query sequence (L, d_model), compressed by the SSM."""
        q_N = self._encode(self._embeddings(embeddings, "query embeddings"))
        with self._lock:
            return self._nearest(q_N, top_k) if self._entries else []

    def _nearest(self, q_N: torch.Tensor, top_k: int) -> list[EpisodicHit]:
        entries = list(self._entries.values())
        keys_EN = torch.stack([e.key_N for e in entries])
        scores_E = F.cosine_similarity(keys_EN, q_N[None], dim=1)
        scores, order = scores_E.topk(min(top_k, len(entries)))
        now = time.time()
        hits = []
        for s, i in zip(scores.tolist(), order.tolist()):
            e = entries[i]
            e.access_count += 1
            e.last_access = now
            hits.append(EpisodicHit(e.id, s, list(e.tokens), dict(e.metadata)))
        return hits

    # -- persistence ----------------------------------------------------------------

    def save(self, path: str) -> None:
        with self._lock:
            write_dir_atomic(path, self._write)

    def _write(self, tmp: str) -> None:
        entries = list(self._entries.values())
        tokens = [t for e in entries for t in e.tokens]
        tensors = {
            "query_proj": self.query_proj.weight.detach().contiguous(),
            "tokens": torch.tensor(tokens, dtype=torch.int64),
            "lengths": torch.tensor(
                [len(e.tokens) for e in entries], dtype=torch.int64
            ),
            "keys": (
                torch.stack([e.key_N for e in entries]).contiguous()
                if entries
                else torch.zeros(0, self.d_state)
            ),
            "means": (
                torch.stack([e.mean_Dm for e in entries]).contiguous()
                if entries
                else torch.zeros(0, self.d_model)
            ),
        }
        save_file(tensors, os.path.join(tmp, TENSORS_FILE))
        meta = dict(
            format=FORMAT,
            version=VERSION,
            d_model=self.d_model,
            d_state=self.d_state,
            max_entries=self.max_entries,
            projection=self.projection,
            next_id=self._next_id,
            entries=[
                dict(
                    id=e.id,
                    metadata=e.metadata,
                    created=e.created,
                    access_count=e.access_count,
                    last_access=e.last_access,
                )
                for e in entries
            ],
        )
        with open(os.path.join(tmp, ENTRIES_FILE), "w") as f:
            json.dump(meta, f)

    @classmethod
    def load(cls, path: str, ssm=None) -> "EpisodicMemory":
        path = path.rstrip("/")
        if not os.path.isfile(os.path.join(path, ENTRIES_FILE)) and os.path.isfile(
            os.path.join(path + ".old", ENTRIES_FILE)
        ):
            path += ".old"  # a save interrupted between its two renames
        meta = _read_entries(os.path.join(path, ENTRIES_FILE))
        if ssm is None and meta["projection"] != "identity":
            raise ValueError(f"{path} was saved with an ssm: pass one to load it")
        if ssm is not None and (meta["d_model"], meta["d_state"]) != (
            ssm.d_model,
            ssm.d_state,
        ):
            raise ValueError(
                f"{path} was saved with d_model={meta['d_model']}, "
                f"d_state={meta['d_state']}; the ssm has {ssm.d_model}, {ssm.d_state}"
            )
        tpath = os.path.join(path, TENSORS_FILE)
        try:
            t = load_file(tpath)
        except (SafetensorError, OSError) as e:
            raise CorruptFileError(f"{tpath}: truncated or unreadable ({e})") from e
        self = cls(ssm, meta["max_entries"], meta["projection"], meta["d_model"])
        with torch.no_grad():
            self.query_proj.weight.copy_(t["query_proj"])
        rows = meta["entries"]
        if not (len(rows) == len(t["lengths"]) == len(t["keys"]) == len(t["means"])):
            raise CorruptFileError(
                f"{path}: {ENTRIES_FILE} and {TENSORS_FILE} disagree"
            )
        offsets = [0] + torch.cumsum(t["lengths"], 0).tolist()
        for j, r in enumerate(rows):
            self._entries[r["id"]] = EpisodicEntry(
                r["id"],
                t["tokens"][offsets[j] : offsets[j + 1]].tolist(),
                r["metadata"],
                t["keys"][j].clone(),
                t["means"][j].clone(),
                r["created"],
                r["access_count"],
                r["last_access"],
            )
        self._next_id = meta["next_id"]
        self._proj_stale = self.projection == "ridge"
        return self


def _read_entries(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no episodic memory snapshot at {os.path.dirname(path)}"
        )
    return read_json_header(path, FORMAT, VERSION)
