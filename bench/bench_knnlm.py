"""kNN-LM on the bundled corpus: does a datastore of the micro model's hidden states
over the training split lower held-out perplexity, and do the controls rule out the
cheap explanations?

    python bench/bench_knnlm.py --checkpoint checkpoints/micro/best [--k 8192]

One run reports test perplexity for two tune/test protocols over the held-out tail
(lam, T, k and the key variant chosen on the tuning positions only): "contiguous"
(first half tunes, second half tests: here that puts The Tempest, a play with no text in
the training split, in the test half) and "interleaved" (alternate 1024-token blocks:
tune and test cover the same plays, as a validation and a test set usually do):
  - leakage: fraction of held-out token 32-grams (and 256-token windows) that occur in
    the training split, i.e. in the datastore;
  - variants: key (final normed state / pre-norm / last MoE input / the residual
    stream after block i) x metric (L2 / inner product), each with its tuning and test
    perplexity; per protocol, the one with the best tuning perplexity is used below;
  - datastore size 10/25/50/100% of the training entries (nested random subsets);
  - controls: random datastore entries instead of the nearest (same lam/T/k, and with
    lam re-tuned), and the LM mixed with the training unigram distribution (lam tuned).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import faiss
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hmst.checkpoint import load_pretrained  # noqa: E402
from hmst.memory.knnlm import (  # noqa: E402
    KNNDatastore,
    corpus_split,
    encode_streams,
    evaluate_searched,
    heldout_partition,
    knn_nll,
    knn_target_logprob,
    lm_nll,
    mixture_nll,
    tune_lambda,
    unigram_logprob,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = [
    "final/l2", "final/ip", "prenorm/l2", "ffn_input/l2", "block0/l2", "block1/l2",
    "block2/l2",
]  # fmt: skip
PROTOCOLS = ("contiguous", "interleaved")


def ngram_overlap(train_ids: np.ndarray, heldout_ids: np.ndarray, n: int) -> float:
    """Fraction of held-out token n-grams that occur anywhere in the training ids
    (n-grams compared by a random 64-bit linear hash: collisions ~ 1e-9)."""
    if len(heldout_ids) < n or len(train_ids) < n:
        return 0.0
    coef = np.random.default_rng(12345).integers(1, 2**63, n, dtype=np.uint64) | 1

    def hashes(a):
        w = np.lib.stride_tricks.sliding_window_view(a.astype(np.uint64), n)
        out = np.empty(len(w), np.uint64)
        for i in range(0, len(w), 8192):  # bound the (rows, n) temporary
            out[i : i + 8192] = (w[i : i + 8192] * coef).sum(1)
        return out

    return float(np.isin(hashes(heldout_ids), hashes(train_ids)).mean())


def random_neighbours(keys_ND, values_N, queries_QD, k, metric, gen, chunk=64):
    """k uniformly random datastore entries per query, with their true distances."""
    q_all = torch.from_numpy(queries_QD)
    keys, values = torch.from_numpy(keys_ND), torch.from_numpy(values_N)
    dists = torch.empty(len(q_all), k)
    idx = torch.randint(len(keys), (len(q_all), k), generator=gen)
    for i in range(0, len(q_all), chunk):
        q, kk = q_all[i : i + chunk, None, :], keys[idx[i : i + chunk]]
        if metric == "l2":
            dists[i : i + chunk] = ((kk - q) ** 2).sum(-1)
        else:
            dists[i : i + chunk] = -(kk * q).sum(-1)
    return dists, values[idx]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=os.path.join(ROOT, "checkpoints/micro/best"))
    p.add_argument("--data", default=os.path.join(ROOT, "data/tinyshakespeare.txt"))
    p.add_argument("--val-split", type=float, default=0.1)
    p.add_argument("--tune-fraction", type=float, default=0.5)
    p.add_argument("--k", type=int, default=8192, help="largest k tried")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variants", nargs="+", default=VARIANTS, metavar="KEY/METRIC",
        help=f"key type / metric pairs tried on the full datastore ({VARIANTS})",
    )  # fmt: skip
    p.add_argument("--out", default=os.path.join(ROOT, "bench/results/knnlm.txt"))
    args = p.parse_args()
    if "shakespeare_works" in args.data:  # holds the held-out plays: it would leak
        sys.exit("bench_knnlm: error: shakespeare_works.txt contains the held-out text")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    lines = []

    def say(msg=""):
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.time()
    model, tok, _ = load_pretrained(args.checkpoint)
    train_ids, heldout_ids = corpus_split(tok, args.data, args.val_split)
    say(f"command: python bench/bench_knnlm.py {' '.join(sys.argv[1:])}".rstrip())
    say(
        f"checkpoint {args.checkpoint}; corpus {os.path.basename(args.data)}, "
        f"held-out tail {args.val_split}; {args.threads} threads"
    )
    n = len(heldout_ids) - 1
    parts = {pr: heldout_partition(n, pr, args.tune_fraction) for pr in PROTOCOLS}
    say(
        f"tokens: train {len(train_ids):,} (datastore), held-out {len(heldout_ids):,};"
        " tune/test protocols: contiguous = first half tunes, second half tests;"
        " interleaved = alternate 1024-token blocks"
    )

    # -- leakage: is held-out text in the datastore? ------------------------------
    for g in (8, 16, 32):
        say(
            f"held-out token {g}-grams found in the training split: "
            f"{100 * ngram_overlap(train_ids, heldout_ids, g):.3f}%"
        )
    win = ngram_overlap(train_ids, heldout_ids, model.config.max_seq_len)
    say(f"held-out {model.config.max_seq_len}-token windows in training: {win:.3%}")
    assert ngram_overlap(train_ids, heldout_ids, 32) < 0.01, "held-out text leaks"
    assert win == 0.0, "a held-out window occurs verbatim in the datastore"

    variants = [tuple(v.split("/")) for v in args.variants]
    types = tuple(dict.fromkeys(t for t, _ in variants))
    t = time.time()
    train_s = encode_streams(model, train_ids, types)
    held_s = encode_streams(model, heldout_ids, types)
    num = len(train_ids) + len(heldout_ids)
    say(f"encoded {num:,} tokens ({'/'.join(types)} keys) in {time.time() - t:.0f}s")
    base = {pr: lm_nll(held_s[types[0]].slice(parts[pr][1])) for pr in PROTOCOLS}
    for pr in PROTOCOLS:
        say(f"held-out test ppl without memory ({pr}): {math.exp(base[pr]):.3f}")

    def evaluate(key_type, metric, sub=None):
        """Search all held-out keys in a store of train entries `sub`; per protocol,
        tune on its tuning slice and evaluate on its test slice."""
        tr = train_s[key_type]
        keys, vals = (tr.keys_ND, tr.targets_N) if sub is None else (
            tr.keys_ND[sub], tr.targets_N[sub]
        )  # fmt: skip
        store = KNNDatastore.build(keys, vals, metric)
        dists, values = store.search(held_s[key_type].keys_ND, args.k)
        del store
        return {
            pr: evaluate_searched(held_s[key_type], dists, values, *parts[pr])
            for pr in PROTOCOLS
        }

    def row(label, res):
        cells = [
            f"{r['params']['k']:5d} {r['params']['temperature']:8.3g} "
            f"{r['params']['lam']:4.2f} {r['tune_ppl_knn']:8.2f} "
            f"{r['test_ppl_knn']:8.2f} {100 * r['test_gain']:5.1f}%"
            for r in (res[pr] for pr in PROTOCOLS)
        ]
        say(f"{label:26s} | " + " | ".join(cells))

    head = "    k        T  lam tune ppl test ppl  gain"
    say(f"\n{'':26s} | {'contiguous':^42s} | {'interleaved':^42s}")

    # -- variants on the full datastore, chosen on each tuning slice ---------------
    say(f"{'variant (full datastore)':26s} | {head} | {head}")
    results = {}
    for key_type, metric in variants:
        t = time.time()
        results[key_type, metric] = evaluate(key_type, metric)
        row(f"{key_type}/{metric} ({time.time() - t:.0f}s)", results[key_type, metric])
    chosen = {
        pr: min(results, key=lambda v: results[v][pr]["tune_ppl_knn"])
        for pr in PROTOCOLS
    }
    say("chosen on the tuning slice: " + ", ".join(f"{pr}: {'/'.join(v)}"
        for pr, v in chosen.items()))  # fmt: skip

    # -- datastore size (nested random subsets of the training entries) -----------
    perm = np.random.default_rng(args.seed).permutation(len(train_ids) - 1)
    for variant in dict.fromkeys(chosen.values()):
        protos = [pr for pr in PROTOCOLS if chosen[pr] == variant]
        say(f"\n{'datastore size, ' + '/'.join(variant):26s} | {head} | {head}")
        gains = {pr: [] for pr in protos}
        for frac in (0.1, 0.25, 0.5, 1.0):
            sub = np.sort(perm[: int(frac * len(perm))])
            res = results[variant] if frac == 1.0 else evaluate(*variant, sub)
            row(f"{frac:4.0%} ({len(sub):,} entries)", res)
            for pr in protos:
                gains[pr].append(res[pr]["test_gain"])
        for pr in protos:
            say(f"gain grows with datastore size ({pr}): {all(np.diff(gains[pr]) > 0)}")

    # -- controls -----------------------------------------------------------------
    say(f"\n{'control (test slice)':50s} {'lam':>5s} {'test ppl':>9s}  gain")
    gen = torch.Generator().manual_seed(args.seed)
    for pr in PROTOCOLS:
        key_type, metric = chosen[pr]
        full = results[chosen[pr]][pr]
        tr, h = train_s[key_type], held_s[key_type]
        tu, te = h.slice(parts[pr][0]), h.slice(parts[pr][1])
        p, temp = full["params"], full["params"]["temperature"]

        def line(label, lam, nll):
            gain = 100 * (1 - math.exp(nll - base[pr]))
            say(f"{pr + ': ' + label:50s} {lam:5.2f} {math.exp(nll):9.3f} {gain:5.1f}%")

        line("LM alone", 0.0, base[pr])
        rd, rv = random_neighbours(
            tr.keys_ND, tr.targets_N, te.keys_ND, p["k"], metric, gen
        )
        line("random neighbours (same k, T, lam)", p["lam"], knn_nll(te, rd, rv, p))
        td, tv = random_neighbours(
            tr.keys_ND, tr.targets_N, tu.keys_ND, p["k"], metric, gen
        )
        lam_r, _ = tune_lambda(
            tu.lm_logprob_N, knn_target_logprob(td, tv, tu.targets_N, temp)
        )
        rk = knn_target_logprob(rd, rv, te.targets_N, temp)
        line(
            "random neighbours (lam re-tuned)",
            lam_r,
            mixture_nll(te.lm_logprob_N, rk, lam_r),
        )
        uni = unigram_logprob(tr.targets_N, model.config.vocab_size)
        u_tu, u_te = (
            uni[torch.from_numpy(tu.targets_N)],
            uni[torch.from_numpy(te.targets_N)],
        )
        lam_u, _ = tune_lambda(tu.lm_logprob_N, u_tu)
        line(
            "unigram smoothing (lam tuned)",
            lam_u,
            mixture_nll(te.lm_logprob_N, u_te, lam_u),
        )
        line(f"kNN-LM ({key_type}/{metric}, full datastore)", p["lam"],
             math.log(full["test_ppl_knn"]))  # fmt: skip
        say(f"{pr}: target >= 10% lower held-out ppl met: {full['test_gain'] >= 0.10}")
    say(f"total {time.time() - t0:.0f}s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
