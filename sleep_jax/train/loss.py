"""Token log-probabilities and the masked cross-entropy that every trainer shares.

Losses return (sum, count) rather than a mean so that gradient accumulation over micro-batches
and averaging across shards stay exact: mean = sum(sums) / sum(counts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_btv: jax.Array, targets_bt: jax.Array,
                   temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature)[target] per position: [B,T] fp32."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array,
                  loss_mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked next-token cross-entropy as (sum over masked tokens, number of masked tokens)."""
    m = loss_mask_bt.astype(jnp.float32)
    nll = -token_logprobs(logits_btv, targets_bt)
    return jnp.sum(nll * m), jnp.sum(m)
