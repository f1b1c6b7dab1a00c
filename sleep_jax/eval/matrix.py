"""Continual-learning metrics from an accuracy matrix R[i, j]: accuracy on task j after learning
task i (rows: training stages in order, columns: tasks), T x T, 0-based here.

- ACC (average accuracy, Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual
  Learning"): mean_j R[T-1, j].
- BWT (backward transfer, same paper): mean over j < T-1 of R[T-1, j] - R[j, j]; negative means
  forgetting.
- FWT (forward transfer, same paper; only with baseline accuracies b_j of the untrained model):
  mean over j >= 1 of R[j-1, j] - b_j.
- Forgetting (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning"): mean over
  j < T-1 of max_{i < T-1} R[i, j] - R[T-1, j], the drop from each task's best earlier accuracy.
- Learning accuracy (Chaudhry et al. 2019, A-GEM): mean_j R[j, j].

With a single task (T = 1) there is no earlier task: BWT, FWT and forgetting are 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_matrix(r) -> np.ndarray:
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square T x T with T >= 1, got shape "
                         f"{r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"the accuracy matrix has non-finite entries: {r.tolist()}")
    return r


def average_accuracy(r) -> float:
    """ACC = (1/T) sum_j R[T-1, j] (Lopez-Paz & Ranzato 2017)."""
    r = _as_matrix(r)
    return float(r[-1].mean())


def backward_transfer(r) -> float:
    """BWT = (1/(T-1)) sum_{j<T-1} (R[T-1, j] - R[j, j]) (Lopez-Paz & Ranzato 2017)."""
    r = _as_matrix(r)
    T = r.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean(r[-1, :-1] - np.diag(r)[:-1]))


def forward_transfer(r, baseline: Sequence[float]) -> float:
    """FWT = (1/(T-1)) sum_{j>=1} (R[j-1, j] - b_j) (Lopez-Paz & Ranzato 2017).

    Args:
      r: T x T accuracy matrix.
      baseline: T accuracies b_j of the model before any task was learned.
    """
    r = _as_matrix(r)
    T = r.shape[0]
    b = np.asarray(baseline, dtype=np.float64)
    if b.shape != (T,):
        raise ValueError(f"baseline must have one accuracy per task, shape ({T},), got {b.shape}")
    if T == 1:
        return 0.0
    return float(np.mean(np.diag(r, k=1) - b[1:]))


def forgetting(r) -> float:
    """F = (1/(T-1)) sum_{j<T-1} (max_{i<T-1} R[i, j] - R[T-1, j]) (Chaudhry et al. 2018)."""
    r = _as_matrix(r)
    T = r.shape[0]
    if T == 1:
        return 0.0
    best_before = r[:-1, :-1].max(axis=0)
    return float(np.mean(best_before - r[-1, :-1]))


def learning_accuracy(r) -> float:
    """LA = (1/T) sum_j R[j, j]: accuracy on each task right after learning it."""
    return float(np.mean(np.diag(_as_matrix(r))))


def continual_metrics(r, baseline: Sequence[float] | None = None) -> dict[str, float]:
    """Every metric above as a dict: acc, bwt, forgetting, learning_acc (and fwt with baseline)."""
    out = {
        "acc": average_accuracy(r),
        "bwt": backward_transfer(r),
        "forgetting": forgetting(r),
        "learning_acc": learning_accuracy(r),
    }
    if baseline is not None:
        out["fwt"] = forward_transfer(r, baseline)
    return out
