"""kNN-LM (Khandelwal et al., 2020): interpolate the LM with a nearest-neighbour
distribution over a datastore of (hidden state -> next token) built from training text.

    p(y | c) = lam * p_knn(y | c) + (1 - lam) * p_lm(y | c)
    p_knn(y | c) = sum_{(k_i, v_i) in N(c)} 1[v_i = y] * softmax_i(-d(q(c), k_i) / T)

Glossary (the paper's symbols): q(c) the query, the model's hidden state at the last
context position; N(c) its k nearest keys; d squared L2 distance (or, with metric "ip",
minus the inner product); T temperature; lam interpolation weight.

Shapes: N positions, D d_model, K neighbours, V vocab.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from hmst.checkpoint import write_dir_atomic

NAMED_KEYS = ("final", "prenorm", "ffn_input")
KEY_TYPES = (*NAMED_KEYS, "block<i>")
"""final: the normed hidden state the LM head reads (`return_hidden=True`); prenorm:
the residual stream before that norm; ffn_input: the last block's normed MoE input
(the paper's best key); block<i> (block0, block1, ...): the residual stream after
block i, 0-based (so prenorm = block<L-1>). On the micro model an intermediate block's
stream is the best key (BENCHMARKS.md, kNN-LM)."""


def _block_index(key_type: str, n_layers: int) -> int | None:
    """i for a valid "block<i>" key type, None for the named ones; ValueError else."""
    if key_type in NAMED_KEYS:
        return None
    i = key_type[5:]
    if key_type.startswith("block") and i.isdigit() and int(i) < n_layers:
        return int(i)
    raise ValueError(
        f"key type {key_type!r} is not one of final, prenorm, ffn_input or "
        f"block0..block{n_layers - 1}"
    )


METRICS = ("l2", "ip")
INDEX_FILE, VALUES_FILE, MANIFEST_FILE = "index.faiss", "values.npy", "manifest.json"
FORMAT = "hmst-knn-datastore-v1"


# -- hidden states of a token stream ---------------------------------------------------


@dataclass
class StreamStates:
    """Per position p of a stream of N+1 tokens: key h_p, target ids[p+1] and the LM's
    log-probability of that target (with the same context as the key)."""

    keys_ND: np.ndarray  # float32
    targets_N: np.ndarray  # int64
    lm_logprob_N: np.ndarray  # float32

    def slice(self, idx) -> "StreamStates":
        return StreamStates(
            self.keys_ND[idx], self.targets_N[idx], self.lm_logprob_N[idx]
        )


def context_windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple]:
    """(start, end, first) per window: inputs ids[start:end] predict ids[start+1:end+1];
    only window positions >= first are kept, so each of the num_tokens - 1 predictions
    is made exactly once and, after the first window, with >= seq_len - stride tokens
    of context."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in (0, seq_len={seq_len}], got {stride}")
    out, start, done = [], 0, 0  # done: predictions made so far (input positions)
    while done < num_tokens - 1:
        end = min(start + seq_len, num_tokens - 1)
        out.append((start, end, done - start))
        done, start = end, start + stride
    return out


@torch.no_grad()
def encode_streams(
    model,
    ids: np.ndarray,
    key_types=("final",),
    stride: int | None = None,
    batch_size: int = 8,
) -> dict[str, StreamStates]:
    """Run `ids` through `model` (eval mode) in overlapping windows of the model's
    context; return, per key type, every position's key, target and LM log-prob of the
    target (targets and log-probs shared). Several key types cost one pass."""
    if not key_types:
        raise ValueError("need at least one key type")
    blocks = {t: _block_index(t, model.config.n_layers) for t in key_types}
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to encode, got {len(ids)}")
    seq_len = model.config.max_seq_len
    stride = stride or seq_len // 2
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    captured = {}
    hooks = [
        model.norm.register_forward_hook(
            lambda m, inp, out: captured.__setitem__("prenorm", inp[0])
        ),
        model.layers[-1].moe_norm.register_forward_hook(
            lambda m, inp, out: captured.__setitem__("ffn_input", out)
        ),
    ]
    for t, i in blocks.items():  # a block returns (residual stream, router stats)
        if i is not None:
            hooks.append(
                model.layers[i].register_forward_hook(
                    lambda m, inp, out, t=t: captured.__setitem__(t, out[0])
                )
            )
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = len(ids) - 1
    keys = {t: np.empty((n, model.config.d_model), np.float32) for t in key_types}
    targets = ids_t[1:].numpy().copy()
    lm_lp = np.empty(n, dtype=np.float32)
    try:
        for group in _batches(context_windows(len(ids), seq_len, stride), batch_size):
            x_BT = torch.stack([ids_t[s:e] for s, e, _ in group]).to(device)
            y_BT = torch.stack([ids_t[s + 1 : e + 1] for s, e, _ in group]).to(device)
            out = model(x_BT, return_hidden=True)
            captured["final"] = out["hidden_states"]
            lp_BT = (
                F.log_softmax(out["logits"].float(), -1)
                .gather(-1, y_BT[..., None])
                .squeeze(-1)
            )
            for b, (s, e, first) in enumerate(group):
                lm_lp[s + first : e] = lp_BT[b, first:].cpu().numpy()
                for t in key_types:
                    keys[t][s + first : e] = captured[t][b, first:].float().cpu()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {t: StreamStates(keys[t], targets, lm_lp) for t in key_types}


def encode_stream(
    model, ids, key_type: str = "final", stride=None, batch_size: int = 8
) -> StreamStates:
    """`encode_streams` for one key type."""
    return encode_streams(model, ids, (key_type,), stride, batch_size)[key_type]


def _batches(windows, batch_size: int):
    """Equal-length windows batch together; only the last window can be shorter."""
    cur = []
    for w in windows:
        if cur and (w[1] - w[0] != cur[0][1] - cur[0][0] or len(cur) == batch_size):
            yield cur
            cur = []
        cur.append(w)
    if cur:
        yield cur


def model_fingerprint(model) -> str:
    """sha256 (16 hex) over the model's parameter names and bytes: a datastore is only
    valid for the model whose hidden states it holds."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# -- the datastore ---------------------------------------------------------------------


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class KNNDatastore:
    """A FAISS index over keys (N, D) with the next-token id of each key beside it.

    `search` returns distances where smaller is nearer for both metrics (for "ip" the
    negated inner product), so p_knn = softmax(-d / T) always."""

    def __init__(
        self, index, values: np.ndarray, metric: str, meta: dict | None = None
    ):
        if index.ntotal != len(values):
            raise ValueError(
                f"index holds {index.ntotal} keys but {len(values)} values"
            )
        self.index, self.values, self.metric = index, values, metric
        self.meta = dict(meta or {})

    @classmethod
    def build(
        cls,
        keys_ND: np.ndarray,
        values_N: np.ndarray,
        metric: str = "l2",
        index_type: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        meta: dict | None = None,
    ) -> "KNNDatastore":
        """Exact IndexFlat by default; "ivf" (IVF-Flat, nlist ~ 4 sqrt(N)) for
        stores too large for exhaustive search."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        keys_ND = np.ascontiguousarray(keys_ND, dtype=np.float32)
        if keys_ND.ndim != 2 or len(keys_ND) != len(values_N) or not len(keys_ND):
            raise ValueError(
                f"need keys (N, D) and values (N,), N > 0; got {keys_ND.shape} and "
                f"{np.shape(values_N)}"
            )
        d = keys_ND.shape[1]
        fmetric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if index_type == "flat":
            index = faiss.IndexFlat(d, fmetric)
        elif index_type == "ivf":
            nlist = nlist or max(1, int(4 * math.sqrt(len(keys_ND))))
            if len(keys_ND) < 39 * nlist:  # FAISS needs ~39 points per centroid
                raise ValueError(
                    f"IVF with nlist {nlist} needs >= {39 * nlist} keys, got "
                    f"{len(keys_ND)}: use index_type='flat' or a smaller nlist"
                )
            index = faiss.IndexIVFFlat(faiss.IndexFlat(d, fmetric), d, nlist, fmetric)
            index.train(keys_ND)
            index.nprobe = nprobe
        else:
            raise ValueError(f"index_type must be 'flat' or 'ivf', got {index_type!r}")
        index.add(keys_ND)
        meta = {**(meta or {}), "index_type": index_type, "dim": d}
        return cls(index, np.asarray(values_N, dtype=np.int32), metric, meta)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries_ND: np.ndarray, k: int, chunk: int = 4096):
        """(dists (N, K) float32, values (N, K) int32), nearest first. Missing
        neighbours (FAISS id -1) come back as value -1, distance +inf."""
        queries_ND = np.ascontiguousarray(queries_ND, dtype=np.float32)
        if queries_ND.ndim != 2 or queries_ND.shape[1] != self.dim:
            raise ValueError(f"queries must be (N, {self.dim}), got {queries_ND.shape}")
        k = min(k, len(self))
        dists = np.empty((len(queries_ND), k), dtype=np.float32)
        values = np.empty((len(queries_ND), k), dtype=self.values.dtype)
        for i in range(0, len(queries_ND), chunk):
            d, ids = self.index.search(queries_ND[i : i + chunk], k)
            missing = ids < 0
            d[missing] = np.inf if self.metric == "l2" else -np.inf
            dists[i : i + chunk] = -d if self.metric == "ip" else d
            values[i : i + chunk] = np.where(missing, -1, self.values[ids])
        return dists, values

    def save(self, path: str) -> None:
        """Atomically (temp dir + rename): index.faiss, values.npy and a manifest with
        counts, checksums and whatever `meta` holds (model and tokenizer hashes)."""

        def write(tmp):
            faiss.write_index(self.index, os.path.join(tmp, INDEX_FILE))
            np.save(os.path.join(tmp, VALUES_FILE), self.values)
            manifest = {
                "format": FORMAT,
                "metric": self.metric,
                "num_entries": len(self),
                "sha256": {
                    f: _sha256_file(os.path.join(tmp, f))
                    for f in (INDEX_FILE, VALUES_FILE)
                },
                **self.meta,
            }
            with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
                json.dump(manifest, f, indent=2)

        write_dir_atomic(path, write)

    @classmethod
    def load(cls, path: str, expect: dict | None = None) -> "KNNDatastore":
        """Open a saved datastore; `expect` ({"model_hash": ..., ...}) must match its
        manifest (a datastore is only valid for the model that built it)."""
        mpath = os.path.join(path, MANIFEST_FILE)
        if not os.path.isfile(mpath):
            raise FileNotFoundError(f"not a kNN datastore (no {MANIFEST_FILE}): {path}")
        try:
            with open(mpath) as f:
                m = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt datastore manifest {mpath}: {e}") from None
        if m.get("format") != FORMAT:
            raise ValueError(f"{mpath}: unknown format {m.get('format')!r}")
        for name, digest in m["sha256"].items():
            file = os.path.join(path, name)
            if not os.path.isfile(file) or _sha256_file(file) != digest:
                raise ValueError(f"datastore file {file} is missing or corrupt")
        for key, want in (expect or {}).items():
            if m.get(key) != want:
                raise ValueError(
                    f"datastore {path} has {key}={m.get(key)!r}, expected {want!r}"
                )
        index = faiss.read_index(os.path.join(path, INDEX_FILE))
        values = np.load(os.path.join(path, VALUES_FILE), allow_pickle=False)
        meta = {
            k: v
            for k, v in m.items()
            if k not in ("format", "metric", "num_entries", "sha256")
        }
        return cls(index, values, m["metric"], meta)


# -- interpolation ---------------------------------------------------------------------


def _mix(log_a, log_b, lam: float):
    """log(lam * a + (1 - lam) * b) from log a, log b, stable for lam in {0, 1}."""
    la = math.log(lam) if lam > 0 else -math.inf
    lb = math.log1p(-lam) if lam < 1 else -math.inf
    return torch.logaddexp(log_a + la, log_b + lb)


def knn_weights(knn_dists, temperature: float):
    """log softmax(-d / T) over the K neighbours; missing ones (inf) get -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return torch.log_softmax(-torch.as_tensor(knn_dists).float() / temperature, -1)


def knn_interpolate(lm_logits, knn_dists, knn_values, lam: float, temperature: float):
    """Log-probs (..., V) of lam * p_knn + (1 - lam) * p_lm.

    lm_logits (..., V); knn_dists, knn_values (..., K) as from `KNNDatastore.search`.
    Where a query has no neighbour at all, the LM's distribution is returned."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    log_lm = F.log_softmax(lm_logits.float(), -1)
    values = torch.as_tensor(knn_values).long()
    found = values >= 0
    logw = knn_weights(knn_dists, temperature).to(log_lm.device)
    # Scatter exp(w - max w) (<= 1, >= 1 for the best neighbour) and take the log back:
    # log p_knn exact to fp32 for every token a neighbour carries, -inf elsewhere.
    m = logw.amax(-1, keepdim=True)
    p = torch.zeros_like(log_lm).scatter_add_(
        -1, values.clamp(min=0).to(log_lm.device), torch.exp(logw - m) * found
    )
    log_knn = torch.log(p) + m
    mixed = _mix(log_knn, log_lm, lam)
    has_any = found.any(-1, keepdim=True).to(log_lm.device)
    return torch.where(has_any, mixed, log_lm)


def knn_target_logprob(knn_dists, knn_values, targets, temperature: float):
    """log p_knn(target) per query (N,): the `knn_interpolate` mixture's kNN part at the
    target only, without materialising (N, V). -inf when no neighbour carries it."""
    logw = knn_weights(knn_dists, temperature)
    hit = torch.as_tensor(knn_values) == torch.as_tensor(targets)[:, None]
    return torch.logsumexp(logw.masked_fill(~hit, -math.inf), -1)


def mixture_nll(lm_logprob, other_logprob, lam: float) -> float:
    """Mean negative log-likelihood (nats/token) of lam * other + (1 - lam) * lm."""
    lm = torch.as_tensor(lm_logprob).double()
    other = torch.as_tensor(other_logprob).double()
    return -_mix(other, lm, lam).mean().item()


def unigram_logprob(train_targets: np.ndarray, vocab_size: int, alpha: float = 1.0):
    """log of the add-alpha training unigram distribution, (V,)."""
    counts = np.bincount(train_targets, minlength=vocab_size).astype(np.float64)
    return torch.from_numpy(
        np.log((counts + alpha) / (counts.sum() + alpha * vocab_size))
    )


# -- tuning and evaluation -------------------------------------------------------------

LAMBDAS = tuple(round(0.05 * i, 2) for i in range(0, 20))  # 0.0 .. 0.95
TEMP_FACTORS = (0.015, 0.03, 0.06, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
K_CHOICES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
"""k values tuned over (those up to the number of neighbours searched)."""


def tune_lambda(lm_logprob, other_logprob, lambdas=LAMBDAS) -> tuple[float, float]:
    """(best lam, its nll) for mixing the LM with another distribution."""
    best = min((mixture_nll(lm_logprob, other_logprob, lam), lam) for lam in lambdas)
    return best[1], best[0]


def knn_target_logprob_all_k(knn_dists, knn_values, targets, temperature, ks):
    """`knn_target_logprob` for every k in `ks` at once, (len(ks), N): log p_knn over
    the k nearest = logcumsumexp of the target's weights - logcumsumexp of all."""
    logits = -torch.as_tensor(knn_dists).float() / temperature
    hit = torch.as_tensor(knn_values) == torch.as_tensor(targets)[:, None]
    num = torch.logcumsumexp(logits.masked_fill(~hit, -math.inf), -1)
    den = torch.logcumsumexp(logits, -1)
    idx = torch.tensor(ks) - 1
    num, den = num[:, idx].T, den[:, idx].T
    return torch.where(torch.isfinite(den), num - den, -math.inf)


def tune_knn(states: StreamStates, dists, values, ks=K_CHOICES, temps=None) -> dict:
    """Grid-search k, T and lam on a tuning slice (queries `states`, neighbours
    `dists`/`values` from one search with the largest k). Temperatures default to
    multiples of the slice's median nearest-neighbour distance (distances scale with
    the key type and metric, so a fixed grid would not transfer)."""
    dists, values = torch.as_tensor(dists), torch.as_tensor(values)
    ks = [k for k in ks if k <= dists.shape[1]] or [dists.shape[1]]
    if temps is None:
        d1 = dists[:, 0][torch.isfinite(dists[:, 0])]
        scale = float(d1.abs().median()) if len(d1) else 1.0
        temps = [max(scale, 1e-6) * f for f in TEMP_FACTORS]
    best = None
    for t in temps:
        lks = knn_target_logprob_all_k(dists, values, states.targets_N, t, ks)
        for k, lk in zip(ks, lks):
            lam, nll = tune_lambda(states.lm_logprob_N, lk)
            if best is None or nll < best["nll"]:
                best = dict(k=k, temperature=t, lam=lam, nll=nll)
    return best


def knn_nll(states: StreamStates, dists, values, params: dict) -> float:
    """Mean nll of the kNN-LM on `states` with fixed params (k, temperature, lam)."""
    k = params["k"]
    dists, values = torch.as_tensor(dists[:, :k]), torch.as_tensor(values[:, :k])
    lk = knn_target_logprob(dists, values, states.targets_N, params["temperature"])
    return mixture_nll(states.lm_logprob_N, lk, params["lam"])


def lm_nll(states: StreamStates) -> float:
    """Mean nll of the LM alone."""
    return -float(np.mean(states.lm_logprob_N, dtype=np.float64))


def heldout_partition(n: int, protocol: str = "contiguous", tune_fraction=0.5):
    """(tune idx, test idx) over the n held-out predictions. "contiguous": the first
    `tune_fraction` tunes, the rest tests; "interleaved": alternate 1024-position
    blocks, so both slices cover the same text (plays) of the held-out tail."""
    if not 0.0 < tune_fraction < 1.0:
        raise ValueError(f"tune fraction must be in (0, 1), got {tune_fraction}")
    pos = np.arange(n)
    if protocol == "contiguous":
        is_tune = pos < int(n * tune_fraction)
    elif protocol == "interleaved":
        is_tune = (pos // 1024) % 2 == 0
    else:
        raise ValueError(
            f"protocol must be contiguous or interleaved, got {protocol!r}"
        )
    if is_tune.all() or not is_tune.any():
        raise ValueError(f"held-out set of {n} predictions is too small to split")
    return np.flatnonzero(is_tune), np.flatnonzero(~is_tune)


def evaluate_searched(heldout: StreamStates, dists, values, tune_idx, test_idx) -> dict:
    """Tune (k, T, lam) on the tune positions, report perplexity on the test positions
    with and without memory (the honest protocol: test numbers use parameters chosen
    without any test token). `dists`/`values`: the search of every held-out key."""
    params = tune_knn(heldout.slice(tune_idx), dists[tune_idx], values[tune_idx])
    test = heldout.slice(test_idx)
    base = lm_nll(test)
    mem = knn_nll(test, dists[test_idx], values[test_idx], params)
    return dict(
        params={k: params[k] for k in ("k", "temperature", "lam")},
        tune_ppl_lm=math.exp(lm_nll(heldout.slice(tune_idx))),
        tune_ppl_knn=math.exp(params["nll"]),
        test_ppl_lm=math.exp(base),
        test_ppl_knn=math.exp(mem),
        test_gain=1.0 - math.exp(mem - base),
        test_tokens=len(test_idx),
    )


def evaluate_with_memory(
    store: KNNDatastore,
    heldout: StreamStates,
    protocol: str = "contiguous",
    tune_fraction: float = 0.5,
    k_max: int = 4096,
) -> dict:
    """Search every held-out key in `store`, then `evaluate_searched`."""
    dists, values = store.search(heldout.keys_ND, k_max)
    tune_idx, test_idx = heldout_partition(
        len(heldout.targets_N), protocol, tune_fraction
    )
    r = evaluate_searched(heldout, dists, values, tune_idx, test_idx)
    return {**r, "datastore_size": len(store), "protocol": protocol}


# -- the Stage 2 pipeline (python -m hmst.training.memory_train) -----------------------


def corpus_split(tokenizer, data: str, val_split: float):
    """(train ids, held-out ids) exactly as `train.py FILE --val-split F` split the
    corpus: the last F of the characters, cut at a line, tokenized per part."""
    from hmst.data import read_documents, split_documents_tail, tokenize_documents

    docs = read_documents([data])
    train_docs, val_docs = split_documents_tail(docs, val_split)
    return (
        tokenize_documents(tokenizer, train_docs).astype(np.int64),
        tokenize_documents(tokenizer, val_docs).astype(np.int64),
    )


def run_memory_training(
    checkpoint: str,
    output: str,
    data: str,
    val_split: float = 0.1,
    tune_fraction: float = 0.5,
    protocol: str = "contiguous",
    key_type: str = "final",
    metric: str = "l2",
    index_type: str = "flat",
    k_max: int = 4096,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    log=print,
) -> dict:
    """Build the datastore from the training split with the checkpoint's model and
    tokenizer, tune (k, T, lam) on one part of the held-out split (`protocol`, see
    `heldout_partition`), report perplexity on the rest with and without memory, write
    `output/datastore/` and `output/knn_params.json`."""
    from hmst.checkpoint import load_pretrained

    model, tokenizer, _ = load_pretrained(checkpoint, device=device)
    train_ids, heldout_ids = corpus_split(tokenizer, data, val_split)
    log(
        f"train {len(train_ids):,} tokens -> datastore; held-out {len(heldout_ids):,}"
        f" ({protocol} tune/test); keys {key_type}, {metric}"
    )
    enc = dict(stride=stride, batch_size=batch_size, key_type=key_type)
    train_states = encode_stream(model, train_ids, **enc)
    meta = dict(
        model_hash=model_fingerprint(model),
        tokenizer_hash=tokenizer.hash(),
        key_type=key_type,
        checkpoint=os.path.abspath(checkpoint),
        data=os.path.abspath(data),
        val_split=val_split,
        train_tokens=int(len(train_ids)),
    )
    store = KNNDatastore.build(
        train_states.keys_ND, train_states.targets_N, metric, index_type, meta=meta
    )
    del train_states
    heldout = encode_stream(model, heldout_ids, **enc)
    result = evaluate_with_memory(store, heldout, protocol, tune_fraction, k_max)
    os.makedirs(output, exist_ok=True)
    store.save(os.path.join(output, "datastore"))
    params = {**result, "key_type": key_type, "metric": metric, **meta}
    tmp = os.path.join(output, "knn_params.json.tmp")
    with open(tmp, "w") as f:
        json.dump(params, f, indent=2)
    os.replace(tmp, os.path.join(output, "knn_params.json"))
    return params
