"""RL losses registered by name; each returns (sum, count) so accumulation stays exact.

Inputs are per completion token [B,M] (fp32) with a mask [B,M]. The caller divides each sum by
its count over the whole mini-batch (counts do not depend on the parameters), so k micro-batches
give the same gradient as one.

- ``clipped_token``: PPO's clipped surrogate per token (Schulman et al. 2017), ratio
  rho_t = exp(logp_t - old_t), loss_t = -min(rho_t A_t, clip(rho_t, 1-eps_low, 1+eps_high) A_t);
  sum over tokens, count = tokens (DAPO-style token-level normalisation).
- ``clipped_sequence``: the same surrogate with one ratio per sequence,
  rho = exp(mean_t (logp_t - old_t)) (GSPO, Zheng et al. 2025) and A the sequence advantage
  (the row's mean token advantage); count = sequences.
- ``kl_k1`` / ``kl_k3``: KL(pi || ref) estimators per token (Schulman, "Approximating KL"):
  k1 = logp - ref, k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased).
- ``value``: clipped value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).
- ``entropy``: H_t = -sum_v p_v log p_v of the tempered policy (subtracted as a bonus).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

SumCount = tuple[jax.Array, jax.Array]
LOSSES: dict[str, Callable[..., SumCount]] = {}


def register_loss(name: str):
    """Decorator: register ``fn(**arrays, **options) -> (sum, count)``."""

    def deco(fn):
        LOSSES[name] = fn
        return fn

    return deco


def _f(mask_bm):
    return mask_bm.astype(jnp.float32)


@register_loss("clipped_token")
def clipped_token(logp_bm, old_logp_bm, adv_bm, mask_bm, *, eps_low: float = 0.2,
                  eps_high: float | None = None) -> SumCount:
    """Token-level clipped surrogate as (sum over tokens, number of tokens)."""
    eps_high = eps_low if eps_high is None else eps_high
    ratio = jnp.exp(logp_bm - old_logp_bm)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per = -jnp.minimum(ratio * adv_bm, clipped * adv_bm)
    m = _f(mask_bm)
    return jnp.sum(per * m), jnp.sum(m)


def clip_fraction(logp_bm, old_logp_bm, adv_bm, mask_bm, *, eps_low: float = 0.2,
                  eps_high: float | None = None) -> SumCount:
    """Tokens whose clipped term is the active one (the gradient is cut there)."""
    eps_high = eps_low if eps_high is None else eps_high
    ratio = jnp.exp(logp_bm - old_logp_bm)
    cut = ((adv_bm > 0) & (ratio > 1 + eps_high)) | ((adv_bm < 0) & (ratio < 1 - eps_low))
    m = _f(mask_bm)
    return jnp.sum(cut * m), jnp.sum(m)


@register_loss("clipped_sequence")
def clipped_sequence(logp_bm, old_logp_bm, adv_bm, mask_bm, *, eps_low: float = 0.2,
                     eps_high: float | None = None) -> SumCount:
    """Sequence-level (GSPO) clipped surrogate as (sum over sequences, number of sequences)."""
    eps_high = eps_low if eps_high is None else eps_high
    m = _f(mask_bm)
    n = jnp.sum(m, 1)
    has = n > 0
    denom = jnp.maximum(n, 1.0)
    log_ratio = jnp.sum((logp_bm - old_logp_bm) * m, 1) / denom
    adv = jnp.sum(adv_bm * m, 1) / denom
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per = -jnp.minimum(ratio * adv, clipped * adv)
    return jnp.sum(jnp.where(has, per, 0.0)), jnp.sum(has.astype(jnp.float32))


@register_loss("kl_k1")
def kl_k1(logp_bm, ref_logp_bm, mask_bm) -> SumCount:
    """k1 = log pi - log ref per token."""
    m = _f(mask_bm)
    return jnp.sum((logp_bm - ref_logp_bm) * m), jnp.sum(m)


@register_loss("kl_k3")
def kl_k3(logp_bm, ref_logp_bm, mask_bm) -> SumCount:
    """k3 = exp(ref - logp) - (ref - logp) - 1 per token."""
    d = ref_logp_bm - logp_bm
    m = _f(mask_bm)
    return jnp.sum((jnp.exp(d) - d - 1.0) * m), jnp.sum(m)


@register_loss("value")
def value_loss(values_bm, old_values_bm, returns_bm, mask_bm, *,
               clip: float | None = 0.2) -> SumCount:
    """PPO clipped value loss per token (clip=None: plain 0.5 (V - R)^2)."""
    m = _f(mask_bm)
    plain = (values_bm - returns_bm) ** 2
    if clip is None:
        per = 0.5 * plain
    else:
        v_clip = old_values_bm + jnp.clip(values_bm - old_values_bm, -clip, clip)
        per = 0.5 * jnp.maximum(plain, (v_clip - returns_bm) ** 2)
    return jnp.sum(per * m), jnp.sum(m)


def token_entropy(logits_bmv: jax.Array, temperature: float = 1.0) -> jax.Array:
    """H of softmax(logits / temperature) per position [B,M]."""
    logp = jax.nn.log_softmax(logits_bmv.astype(jnp.float32) / temperature, -1)
    return -jnp.sum(jnp.exp(logp) * logp, -1)


@register_loss("entropy")
def entropy(entropy_bm, mask_bm) -> SumCount:
    """Sum of per-token entropies over the mask."""
    m = _f(mask_bm)
    return jnp.sum(entropy_bm * m), jnp.sum(m)
