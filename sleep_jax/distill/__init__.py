"""Knowledge Seeding's distillation pieces: per-token divergences and teacher/student alignment."""

from sleep_jax.distill.align import (
    AlignedBatch,
    Rows,
    align_sampled,
    aligned_logits,
    build_aligned_batch,
    completion_divergence,
    concat_rows,
    gather_completion_logits,
    gather_positions,
)
from sleep_jax.distill.divergences import (
    DIVERGENCES,
    divergence,
    forward_kl,
    forward_kl_per_token,
    get_divergence,
    get_per_token,
    jsd,
    jsd_per_token,
    masked_sum,
    reverse_kl,
    reverse_kl_per_token,
)

__all__ = [
    "AlignedBatch", "Rows", "align_sampled", "aligned_logits", "build_aligned_batch",
    "completion_divergence", "concat_rows", "gather_completion_logits", "gather_positions",
    "DIVERGENCES", "divergence", "forward_kl", "forward_kl_per_token", "get_divergence",
    "get_per_token", "jsd", "jsd_per_token", "masked_sum", "reverse_kl", "reverse_kl_per_token",
]
