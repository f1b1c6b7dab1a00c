"""The masked cross-entropy that every trainer shares.

Losses return (sum, count) rather than a mean so that gradient accumulation over micro-batches
and averaging across shards stay exact: mean = sum(sums) / sum(counts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Token log-probs live with sampling and scoring (which must not import training); re-exported
# here for callers that import them from train.loss.
from sleep_jax.sampling import token_logprobs

__all__ = ["cross_entropy", "token_logprobs"]


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array,
                  loss_mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked next-token cross-entropy as (sum over masked tokens, number of masked tokens)."""
    m = loss_mask_bt.astype(jnp.float32)
    nll = -token_logprobs(logits_btv, targets_bt)
    return jnp.sum(nll * m), jnp.sum(m)
