"""Evaluation: QA scores (exact match, F1) and continual-learning accuracy-matrix metrics."""

from sleep_jax.eval.matrix import (
    average_accuracy,
    backward_transfer,
    continual_metrics,
    forgetting,
    forward_transfer,
    learning_accuracy,
)
from sleep_jax.eval.qa import exact_match, f1_score, normalize_answer, score

__all__ = [
    "average_accuracy", "backward_transfer", "continual_metrics", "forgetting",
    "forward_transfer", "learning_accuracy", "exact_match", "f1_score", "normalize_answer",
    "score",
]
