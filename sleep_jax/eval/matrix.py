"""Continual-learning metrics from an accuracy matrix R, (T+1) x T.

Layout: row k = 0..T is the model before any sleep (k = 0) or after cycle k; column j = 1..T is
memory set j (learned in cycle j). Below R[k, j] uses these 1-based set numbers; in numpy the
entry is ``r[k, j - 1]``. Accuracies are fractions in [0, 1].

- ACC (average accuracy; Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual
  Learning", GEM):  ACC = mean_{j=1..T} R[T, j].
- BWT (backward transfer; GEM):  BWT = mean_{j=1..T-1} (R[T, j] - R[j, j]); negative means
  forgetting.
- FWT (forward transfer; GEM, with row 0 as GEM's baseline b_j):
  FWT = mean_{j=2..T} (R[j-1, j] - R[0, j]), what learning sets 1..j-1 did for set j before
  set j was learned.
- Forgetting (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning", RWalk):
  F = mean_{j=1..T-1} (max_{l=1..T-1} R[l, j] - R[T, j]), the drop from each set's best
  accuracy after some earlier cycle. As in RWalk the max starts at l = 1 (row 0 is not an
  after-learning stage). Unlike -BWT it counts a rise after R[j, j] as the peak.
- Learning accuracy (Riemer et al. 2019, "Learning to Learn without Forgetting by Maximizing
  Transfer and Minimizing Interference", MER):  LA = mean_{j=1..T} R[j, j], accuracy on each
  set right after learning it.

Missing entries. An entry that was not measured is NaN (or None, e.g. JSON null) and counts as
missing, never as 0: each metric averages only the terms whose entries are all present (a
BWT/FWT term needs both of its entries; a forgetting term needs R[T, j] and at least one of
R[1..T-1, j], the max runs over the present ones). A metric with no complete term is NaN
(``continual_metrics`` then holds NaN; ``require`` turns that into an error naming the metric).
With T = 1 BWT, FWT and forgetting have no terms: NaN.

SEAL's layout (Zweiger et al. 2025, continual self-edits) measures passage p only from edit p
on (rows 1..p-1 of column p missing) and defines forgetting with the max over k = p..T-1. On
such a matrix that is exactly the RWalk definition above (the rows before p are missing), so no
separate convention is needed: SEAL's published ACC 0.2475, BWT -0.1911 and forgetting 0.1911
come out of these functions (tests/test_matrix.py). On a fully measured matrix the two
definitions differ only when a set scored higher before it was learned than at any cycle since.

Refused (ValueError naming the row, the column and the value): infinite entries and entries
outside [0, 1]; a shape other than (T+1) x T with T >= 1.
"""

from __future__ import annotations

import math

import numpy as np

METRICS = ("acc", "bwt", "fwt", "forgetting", "learning_acc")


def as_matrix(r) -> np.ndarray:
    """``r`` as a float64 (T+1) x T array, None -> NaN (missing); checks shape and values."""
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 1 or r.shape[0] != r.shape[1] + 1:
        raise ValueError(f"the accuracy matrix must be (T+1) x T with T >= 1 (rows k = 0..T, "
                         f"columns = memory sets 1..T), got shape {r.shape}")
    bad = np.isinf(r) | (np.isfinite(r) & ((r < 0.0) | (r > 1.0)))
    if bad.any():
        k, j = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"the accuracy matrix entry at row k={k}, column j={j + 1} (memory set "
                         f"{j + 1}) is {r[k, j]!r}; allowed: a fraction in [0, 1], or NaN/None "
                         f"for not measured")
    return r


def _mean(terms: np.ndarray) -> float:
    """Mean of the present (non-NaN) terms, NaN when none is present."""
    terms = terms[~np.isnan(terms)]
    return float(terms.mean()) if terms.size else math.nan


def average_accuracy(r) -> float:
    """ACC = mean_{j=1..T} R[T, j] over the present entries (GEM)."""
    return _mean(as_matrix(r)[-1])


def backward_transfer(r) -> float:
    """BWT = mean_{j=1..T-1} (R[T, j] - R[j, j]) over the pairs with both present (GEM)."""
    r = as_matrix(r)
    T = r.shape[1]
    return _mean(r[T, : T - 1] - np.diag(r[1:])[: T - 1])


def forward_transfer(r) -> float:
    """FWT = mean_{j=2..T} (R[j-1, j] - R[0, j]) over the pairs with both present (GEM)."""
    r = as_matrix(r)
    T = r.shape[1]
    # R[j-1, j] for j = 2..T is r[j-1, j-1] for j-1 = 1..T-1: the diagonal of r[1:, 1:]
    return _mean(np.diag(r[1:T, 1:]) - r[0, 1:])


def forgetting(r) -> float:
    """F = mean_{j=1..T-1} (max_{l=1..T-1} R[l, j] - R[T, j]) (RWalk), missing entries skipped."""
    r = as_matrix(r)
    T = r.shape[1]
    if T == 1:
        return math.nan
    earlier = r[1:T, : T - 1]                          # rows l = 1..T-1, sets j = 1..T-1
    seen = ~np.isnan(earlier).all(axis=0)
    best = np.full(T - 1, np.nan)
    best[seen] = np.nanmax(earlier[:, seen], axis=0)
    return _mean(best - r[T, : T - 1])


def learning_accuracy(r) -> float:
    """LA = mean_{j=1..T} R[j, j] over the present entries (MER)."""
    return _mean(np.diag(as_matrix(r)[1:]))


def continual_metrics(r) -> dict[str, float]:
    """Every metric above, {acc, bwt, fwt, forgetting, learning_acc}; NaN where undefined."""
    r = as_matrix(r)
    return {"acc": average_accuracy(r), "bwt": backward_transfer(r), "fwt": forward_transfer(r),
            "forgetting": forgetting(r), "learning_acc": learning_accuracy(r)}


def require(metrics: dict[str, float], *names: str) -> dict[str, float]:
    """``metrics`` unchanged; ValueError naming each of ``names`` (default: all) that is NaN."""
    missing = [n for n in (names or metrics) if math.isnan(metrics[n])]
    if missing:
        raise ValueError(f"no measured entries define {', '.join(missing)} (every term it needs "
                         f"has a missing entry, or T = 1 leaves it no term)")
    return metrics


def prefix(r, k: int) -> np.ndarray:
    """The matrix after cycle k: rows 0..k and sets 1..k, (k+1) x k, for 1 <= k <= T."""
    r = as_matrix(r)
    T = r.shape[1]
    if not 1 <= k <= T:
        raise ValueError(f"prefix k={k}; allowed 1 <= k <= T = {T}")
    return r[: k + 1, :k]


def curve(r, metric) -> list[float]:
    """``[metric(prefix(r, k)) for k = 1..T]``: the metric over the sets learned so far after
    each cycle (ACC-so-far, BWT-so-far, ...)."""
    r = as_matrix(r)
    return [metric(prefix(r, k)) for k in range(1, r.shape[1] + 1)]
