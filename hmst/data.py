"""Text -> token shards, and the batch sampler used for training and evaluation.

On-disk format of a pre-tokenized directory:
    manifest.json      {format, dtype, vocab_size, tokenizer_hash, num_tokens, shards}
    shard_00000.bin    raw little-endian uint16 (vocab <= 65535) or uint32 token ids
    tokenizer.json     the tokenizer that produced the ids
Documents are separated by EOS. Training windows are drawn by a `torch.Generator`
owned by the sampler, so its state (saved in checkpoints) makes resume exact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from hmst.tokenizer import HMSTTokenizer

MANIFEST = "manifest.json"
FORMAT = "hmst-tokens-v1"
TEXT_SUFFIXES = (".txt", ".md", ".text")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CHUNK_CHARS = 1 << 20  # texts are encoded in ~1 MiB line-aligned chunks, in parallel


def read_documents(inputs: list[str]) -> list[str]:
    """Each input file is one document; a directory contributes its text files (sorted,
    recursively). Raises on a missing path, a directory without text files, or no text.
    """
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(path)
                for f in names
                if f.endswith(TEXT_SUFFIXES)
            )
            if not found:
                raise ValueError(
                    f"no text files ({', '.join(TEXT_SUFFIXES)}) under {path}"
                )
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    docs = []
    for f in files:
        if os.path.splitext(f)[1] in TABLE_SUFFIXES:
            docs += _read_table(f)
            continue
        with open(f, encoding="utf-8", errors="strict") as fh:
            try:
                docs.append(fh.read())
            except UnicodeDecodeError as e:
                raise ValueError(f"{f} is not UTF-8 text: {e}") from None
    if not any(d.strip() for d in docs):
        raise ValueError(f"corpus is empty: {', '.join(inputs)}")
    return [d for d in docs if d]


def _read_table(path: str) -> list[str]:
    """JSON lines / parquet files: one document per row, from its "text" column."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {path} needs `datasets`: pip install 'hmst[data]'")
    fmt = TABLE_SUFFIXES[os.path.splitext(path)[1]]
    ds = datasets.load_dataset(fmt, data_files=path, split="train")
    if "text" not in ds.column_names:
        raise ValueError(f"{path} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t]


def split_documents_tail(
    docs: list[str], fraction: float
) -> tuple[list[str], list[str]]:
    """Hold out the last `fraction` of the characters (cut at a line boundary)."""
    total = sum(len(d) for d in docs)
    need = int(total * fraction)
    train, val = list(docs), []
    while need > 0 and train:
        d = train.pop()
        if len(d) <= need:
            val.insert(0, d)
            need -= len(d)
            continue
        cut = d.rfind("\n", 0, len(d) - need) + 1  # keep whole lines on each side
        cut = cut if cut > 0 else len(d) - need
        train.append(d[:cut])
        val.insert(0, d[cut:])
        need = 0
    if not train or not val:
        raise ValueError("corpus too small to split off a validation set")
    return train, val


def _chunks(text: str) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def tokenize_documents(tokenizer: HMSTTokenizer, docs: list[str]) -> np.ndarray:
    """All documents, each followed by EOS, as one id array (uint16/uint32)."""
    dtype = token_dtype(tokenizer.vocab_size)
    pieces = []
    for doc in docs:
        for ids in tokenizer.encode_batch(_chunks(doc)):
            pieces.append(np.asarray(ids, dtype=dtype))
        pieces.append(np.asarray([tokenizer.eos_id], dtype=dtype))
    return np.concatenate(pieces)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def write_pretokenized(
    out_dir: str,
    ids: np.ndarray,
    tokenizer: HMSTTokenizer,
    shard_tokens: int = 100_000_000,
    extra: dict | None = None,
) -> dict:
    """Write shards + manifest + tokenizer.json into `out_dir` atomically (temp dir,
    then rename): a crash leaves either the old directory or the new one."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards = []
    for i, start in enumerate(range(0, len(ids), shard_tokens)):
        name = f"shard_{i:05d}.bin"
        part = ids[start : start + shard_tokens]
        part.tofile(os.path.join(tmp, name))
        shards.append({"file": name, "num_tokens": int(len(part))})
    manifest = {
        "format": FORMAT,
        "dtype": np.dtype(ids.dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_hash": tokenizer.hash(),
        "num_tokens": int(len(ids)),
        "shards": shards,
        **(extra or {}),
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    old = out_dir.rstrip("/") + ".old"
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


@dataclass
class TokenData:
    """A token stream stored as one or more 1-D arrays (memmaps for shards)."""

    segments: list[np.ndarray]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.segments)

    def split_tail(self, fraction: float) -> tuple["TokenData", "TokenData"]:
        need = int(self.num_tokens * fraction)
        train, val = list(self.segments), []
        while need > 0 and train:
            s = train.pop()
            if len(s) <= need:
                val.insert(0, s)
                need -= len(s)
            else:
                train.append(s[: len(s) - need])
                val.insert(0, s[len(s) - need :])
                need = 0
        return TokenData(train), TokenData(val)


def load_pretokenized(path: str, tokenizer: HMSTTokenizer | None = None) -> TokenData:
    """Open a pre-tokenized directory as memmaps, checking it against `tokenizer`."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(
            f"not a pre-tokenized directory (no {MANIFEST}): {path}"
        )
    try:
        with open(mpath) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt manifest {mpath}: {e}") from None
    if m.get("format") != FORMAT:
        raise ValueError(f"{mpath}: unknown format {m.get('format')!r}")
    if tokenizer is not None and m["tokenizer_hash"] != tokenizer.hash():
        raise ValueError(
            f"{path} was tokenized with tokenizer {m['tokenizer_hash']}, "
            f"but training uses {tokenizer.hash()}"
        )
    segments = []
    for shard in m["shards"]:
        file = os.path.join(path, shard["file"])
        expected = shard["num_tokens"] * np.dtype(m["dtype"]).itemsize
        if not os.path.isfile(file) or os.path.getsize(file) != expected:
            raise ValueError(f"shard {file} is missing or truncated")
        segments.append(np.memmap(file, dtype=m["dtype"], mode="r"))
    return TokenData(segments)


class BatchSampler:
    """Random training windows of `seq_len + 1` tokens, drawn for the *global* batch
    from a private generator; each rank takes its slice. Same seed and global batch give
    the same data on 1 or N processes. `state_dict` / `load_state_dict` resume it.
    """

    def __init__(self, data: TokenData, seq_len: int, seed: int):
        self.data, self.seq_len = data, seq_len
        counts = [max(len(s) - seq_len, 0) for s in data.segments]  # valid starts
        if sum(counts) == 0:
            raise ValueError(
                f"corpus has {data.num_tokens} tokens: fewer than one training "
                "sequence "
                f"({seq_len + 1} tokens); lower --seq-len or add text"
            )
        self.cum = torch.tensor(np.cumsum([0] + counts), dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)

    def _window(self, flat_start: int) -> np.ndarray:
        seg = int(torch.searchsorted(self.cum, flat_start, right=True)) - 1
        off = flat_start - int(self.cum[seg])
        return self.data.segments[seg][off : off + self.seq_len + 1]

    def next_batches(
        self, global_batch: int, micro_batches: int, rank: int, world: int
    ):
        """One optimizer step's data: `micro_batches` (x, y) pairs for `rank`."""
        if global_batch % world:
            raise ValueError(
                f"global batch {global_batch} not divisible by {world} ranks"
            )
        local = global_batch // world
        starts = torch.randint(
            int(self.cum[-1]), (micro_batches, global_batch), generator=self.generator
        )
        out = []
        for m in range(micro_batches):
            mine = starts[m, rank * local : (rank + 1) * local].tolist()
            w = torch.from_numpy(
                np.stack([self._window(s) for s in mine]).astype(np.int64)
            )
            out.append((w[:, :-1], w[:, 1:]))
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(data: TokenData, seq_len: int, max_windows: int) -> list[np.ndarray]:
    """Deterministic non-overlapping windows covering the validation stream from its
    start (each seq_len + 1 tokens, overlapping by the one target token)."""
    windows = []
    for seg in data.segments:
        for start in range(0, len(seg) - seq_len, seq_len):
            windows.append(seg[start : start + seq_len + 1])
            if len(windows) == max_windows:
                return windows
    if not windows:
        raise ValueError(
            f"validation set has {data.num_tokens} tokens: fewer than one sequence "
            f"({seq_len + 1} tokens)"
        )
    return windows


def preprocess(
    inputs: list[str],
    output: str,
    tokenizer: HMSTTokenizer,
    shard_tokens: int = 100_000_000,
) -> dict:
    """Text files/dirs -> a pre-tokenized directory (see module docstring)."""
    docs = read_documents(inputs)
    ids = tokenize_documents(tokenizer, docs)
    extra = {
        "num_documents": len(docs),
        "sources": [os.path.abspath(p) for p in inputs],
    }
    return write_pretokenized(output, ids, tokenizer, shard_tokens, extra)


def split_pretokenized(
    src: str,
    train_out: str,
    val_out: str,
    val_fraction: float,
    seed: int,
    block_tokens: int = 2048,
) -> tuple[dict, dict]:
    """Deterministic (by seed) train/val split of a pre-tokenized directory.

    The unit is a document (EOS-terminated) when there are at least 10 of them, else a
    block of `block_tokens`, so a single long text still splits into many pieces."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), got {val_fraction}")
    tokenizer = HMSTTokenizer.load(src)
    ids = np.concatenate(load_pretokenized(src, tokenizer).segments)
    ends = np.flatnonzero(ids == tokenizer.eos_id) + 1
    bounds = np.concatenate([[0], ends[ends < len(ids)], [len(ids)]])
    if len(bounds) - 1 < 10:
        bounds = np.unique(np.append(np.arange(0, len(ids), block_tokens), len(ids)))
    units = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if len(units) < 2:
        raise ValueError(f"{src} is too small to split ({len(ids)} tokens)")
    perm = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(units) * val_fraction))
    val_idx = sorted(perm[:n_val].tolist())
    train_idx = sorted(perm[n_val:].tolist())
    meta = {
        "split_of": os.path.abspath(src),
        "seed": seed,
        "val_fraction": val_fraction,
    }
    train_m = write_pretokenized(
        train_out, np.concatenate([units[i] for i in train_idx]), tokenizer, extra=meta
    )
    val_m = write_pretokenized(
        val_out, np.concatenate([units[i] for i in val_idx]), tokenizer, extra=meta
    )
    return train_m, val_m
