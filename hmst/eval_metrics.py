"""Metrics for scored binary decisions: AUROC, expected calibration error, bootstrap CI.

Plain numpy (no sklearn dependency). Labels are 1 for the positive class (a correct
answer) and 0 for the negative class (a corrupted / hallucinated answer).
"""

from __future__ import annotations

import numpy as np


def _rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's 'average')."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(sorted_x[1:] != sorted_x[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores, labels) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative),
    ties counted as 1/2 (Mann-Whitney U / (n_pos * n_neg))."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    ranks = _rankdata(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def ece(probs, labels, n_bins: int = 15) -> float:
    """Expected calibration error of P(label = 1): equal-width bins over [0, 1]
    (bin i holds p in (i/n, (i+1)/n], the first bin also p = 0), weighted by bin
    size: sum_b |B_b|/N * |mean(y in B_b) - mean(p in B_b)|."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"probs {p.shape} and labels {y.shape} differ in shape")
    if len(p) == 0:
        raise ValueError("ECE of an empty set")
    if p.min() < 0 or p.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]")
    bins = np.clip(np.ceil(p * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        in_b = bins == b
        if in_b.any():
            total += in_b.sum() / len(p) * abs(y[in_b].mean() - p[in_b].mean())
    return float(total)


def _group_resamples(y, pair_ids, n_boot: int, seed: int):
    """Bootstrap index sets that resample whole groups (a question with its correct and
    its corrupted answer stays together), skipping draws with a single class."""
    groups = np.arange(len(y)) if pair_ids is None else np.asarray(pair_ids)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        pick = np.concatenate(
            [members[g] for g in rng.integers(0, len(uniq), len(uniq))]
        )
        if y[pick].all() or not y[pick].any():
            continue
        yield pick


def bootstrap_auroc_ci(
    scores, labels, pair_ids=None, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of AUROC, resampling `pair_ids` groups or items."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    values = [auroc(s[i], y[i]) for i in _group_resamples(y, pair_ids, n_boot, seed)]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_auroc_diff(
    scores_a, scores_b, labels, pair_ids=None, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Paired bootstrap of AUROC(a) - AUROC(b) on the same items (groups resampled
    together, as in `bootstrap_auroc_ci`): (2.5th, 97.5th percentile, share of
    resamples where a beats b)."""
    a = np.asarray(scores_a, dtype=np.float64).ravel()
    b = np.asarray(scores_b, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    diffs = np.asarray(
        [
            auroc(a[i], y[i]) - auroc(b[i], y[i])
            for i in _group_resamples(y, pair_ids, n_boot, seed)
        ]
    )
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi), float((diffs > 0).mean())
