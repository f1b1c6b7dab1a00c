"""Per-token divergences between a teacher's and a student's next-token distributions.

The distillation losses of Knowledge Seeding (GKD, Agarwal et al. 2024, "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes", arXiv 2306.13649). With
p_T = softmax(teacher_logits / tau) and p_S = softmax(student_logits / tau) at one position:

  forward KL  KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))    (mode covering)
  reverse KL  KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))    (mode seeking)
  JSD(beta)   M = beta p_T + (1 - beta) p_S
              JSD = beta KL(p_T || M) + (1 - beta) KL(p_S || M),   0 < beta < 1   (GKD Eq. 1)

beta weights the teacher side, as TRL's `GKDTrainer.generalized_jsd_loss` does. The JSD formula is
0 at both end points, so, as in TRL, they are defined explicitly: beta = 0 is forward KL and
beta = 1 is reverse KL. Near them JSD(beta) / beta -> forward KL (beta -> 0) and
JSD(beta) / (1 - beta) -> reverse KL (beta -> 1).

Conventions shared by every function here:
- logits are [B,T,V]; the math runs in at least fp32 (bf16 is promoted, fp64 kept);
- the temperature divides both logits; no tau^2 factor is applied (TRL does not either);
- teacher logits go through `stop_gradient`: gradients flow to the student only;
- log M is computed with logaddexp in log space, never log(sum of probabilities);
- reduced losses return (sum over masked tokens, number of masked tokens), like
  `sleep_jax.train.loss.cross_entropy`, so that micro-batch and shard averages stay exact.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

PerToken = Callable[..., jax.Array]
Reduced = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _log_probs(logits_btv: jax.Array, temperature: float) -> jax.Array:
    if not isinstance(temperature, jax.Array) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    x = logits_btv.astype(jnp.promote_types(logits_btv.dtype, jnp.float32))
    return jax.nn.log_softmax(x / temperature, axis=-1)


def _kl(logp_btv: jax.Array, logq_btv: jax.Array) -> jax.Array:
    """KL(p || q) summed over V from log-probabilities; entries with p = 0 contribute 0."""
    p = jnp.exp(logp_btv)
    # where p == 0 (a -inf logit) the log difference may be -inf - -inf = nan; 0 * log(0/q) := 0.
    diff = jnp.where(p > 0, logp_btv - logq_btv, 0.0)
    return jnp.sum(p * diff, axis=-1)


def _check_pair(student_logits_btv: jax.Array, teacher_logits_btv: jax.Array) -> None:
    if student_logits_btv.shape != teacher_logits_btv.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape [B,T,V], got "
            f"{student_logits_btv.shape} and {teacher_logits_btv.shape}")


def forward_kl_per_token(student_logits_btv: jax.Array, teacher_logits_btv: jax.Array, *,
                         temperature: float = 1.0) -> jax.Array:
    """Forward KL(p_T || p_S) at every position.

    Args:
      student_logits_btv: [B,T,V] student logits (gradients flow here).
      teacher_logits_btv: [B,T,V] teacher logits (stop_gradient is applied).
      temperature: tau > 0 dividing both logits.

    Returns:
      [B,T] divergence per position, in at least fp32.
    """
    _check_pair(student_logits_btv, teacher_logits_btv)
    log_s = _log_probs(student_logits_btv, temperature)
    log_t = _log_probs(jax.lax.stop_gradient(teacher_logits_btv), temperature)
    return _kl(log_t, log_s)


def reverse_kl_per_token(student_logits_btv: jax.Array, teacher_logits_btv: jax.Array, *,
                         temperature: float = 1.0) -> jax.Array:
    """Reverse KL(p_S || p_T) at every position.

    Args:
      student_logits_btv: [B,T,V] student logits (gradients flow here).
      teacher_logits_btv: [B,T,V] teacher logits (stop_gradient is applied).
      temperature: tau > 0 dividing both logits.

    Returns:
      [B,T] divergence per position, in at least fp32.
    """
    _check_pair(student_logits_btv, teacher_logits_btv)
    log_s = _log_probs(student_logits_btv, temperature)
    log_t = _log_probs(jax.lax.stop_gradient(teacher_logits_btv), temperature)
    return _kl(log_s, log_t)


def _check_beta(beta: float) -> float:
    try:
        beta = float(beta)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError(
            f"beta must be a concrete Python number (it selects the end-point formulas), got "
            f"{beta!r}; pass it as a static argument under jit") from e
    if not 0.0 <= beta <= 1.0 or math.isnan(beta):
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    return beta


def jsd_per_token(student_logits_btv: jax.Array, teacher_logits_btv: jax.Array, *,
                  beta: float = 0.5, temperature: float = 1.0) -> jax.Array:
    """Generalized Jensen-Shannon divergence JSD(beta) at every position (GKD Eq. 1, TRL sides).

    M = beta p_T + (1 - beta) p_S, JSD = beta KL(p_T || M) + (1 - beta) KL(p_S || M) for
    0 < beta < 1; beta = 0 gives forward KL(p_T || p_S) and beta = 1 reverse KL(p_S || p_T)
    (defined explicitly, as in TRL, because the formula vanishes there).
    log M = logaddexp(log beta + log p_T, log(1 - beta) + log p_S).

    Args:
      student_logits_btv: [B,T,V] student logits (gradients flow here).
      teacher_logits_btv: [B,T,V] teacher logits (stop_gradient is applied).
      beta: Python float in [0, 1], the teacher's weight in the mixture.
      temperature: tau > 0 dividing both logits.

    Returns:
      [B,T] divergence per position, in at least fp32.
    """
    beta = _check_beta(beta)
    if beta == 0.0:
        return forward_kl_per_token(student_logits_btv, teacher_logits_btv,
                                    temperature=temperature)
    if beta == 1.0:
        return reverse_kl_per_token(student_logits_btv, teacher_logits_btv,
                                    temperature=temperature)
    _check_pair(student_logits_btv, teacher_logits_btv)
    log_s = _log_probs(student_logits_btv, temperature)
    log_t = _log_probs(jax.lax.stop_gradient(teacher_logits_btv), temperature)
    # Where both sides are -inf (a vocabulary entry masked in both), logaddexp's gradient is
    # 0/0; those entries have p_T = p_S = 0 and drop out of both KLs, so any finite log M will do.
    both_zero = jnp.isneginf(log_t) & jnp.isneginf(log_s)
    log_m = jnp.logaddexp(jnp.where(both_zero, 0.0, log_t + math.log(beta)),
                          jnp.where(both_zero, 0.0, log_s + math.log1p(-beta)))
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def masked_sum(per_token_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of per_token * mask, sum of mask): the (sum, count) form of a masked mean.

    Args:
      per_token_bt: [B,T] values.
      mask_bt: [B,T] bool or float weights (1 = counted).

    Returns:
      (scalar sum, scalar count), both in per_token's dtype.
    """
    if per_token_bt.shape != mask_bt.shape:
        raise ValueError(f"mask must have shape {per_token_bt.shape} [B,T], got {mask_bt.shape}")
    m = mask_bt.astype(per_token_bt.dtype)
    # where() rather than a plain product so an inf/nan at a masked-out position does not leak.
    return jnp.sum(jnp.where(m != 0, per_token_bt * m, 0.0)), jnp.sum(m)


def forward_kl(student_logits_btv: jax.Array, teacher_logits_btv: jax.Array, mask_bt: jax.Array,
               *, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Masked forward KL(p_T || p_S) as (sum over masked tokens, number of masked tokens)."""
    return masked_sum(forward_kl_per_token(student_logits_btv, teacher_logits_btv,
                                           temperature=temperature), mask_bt)


def reverse_kl(student_logits_btv: jax.Array, teacher_logits_btv: jax.Array, mask_bt: jax.Array,
               *, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Masked reverse KL(p_S || p_T) as (sum over masked tokens, number of masked tokens)."""
    return masked_sum(reverse_kl_per_token(student_logits_btv, teacher_logits_btv,
                                           temperature=temperature), mask_bt)


def jsd(student_logits_btv: jax.Array, teacher_logits_btv: jax.Array, mask_bt: jax.Array, *,
        beta: float = 0.5, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Masked generalized JSD(beta) as (sum over masked tokens, number of masked tokens)."""
    return masked_sum(jsd_per_token(student_logits_btv, teacher_logits_btv, beta=beta,
                                    temperature=temperature), mask_bt)


# name -> per-token function; only "jsd" takes beta.
DIVERGENCES: dict[str, PerToken] = {
    "forward_kl": forward_kl_per_token,
    "reverse_kl": reverse_kl_per_token,
    "jsd": jsd_per_token,
}


def get_per_token(name: str, *, beta: float = 0.5, temperature: float = 1.0) -> PerToken:
    """The per-token divergence `name` with its hyper-parameters bound.

    Args:
      name: one of DIVERGENCES ("forward_kl", "reverse_kl", "jsd").
      beta: the JSD mixture weight (ignored by the KLs).
      temperature: tau > 0.

    Returns:
      fn(student_logits[B,T,V], teacher_logits[B,T,V]) -> [B,T].
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; allowed: {sorted(DIVERGENCES)}")
    kwargs = {"temperature": temperature}
    if name == "jsd":
        kwargs["beta"] = _check_beta(beta)
    return functools.partial(DIVERGENCES[name], **kwargs)


def get_divergence(name: str, *, beta: float = 0.5, temperature: float = 1.0) -> Reduced:
    """The masked (sum, count) divergence `name` with its hyper-parameters bound.

    Args:
      name: one of DIVERGENCES ("forward_kl", "reverse_kl", "jsd").
      beta: the JSD mixture weight (ignored by the KLs).
      temperature: tau > 0.

    Returns:
      fn(student_logits[B,T,V], teacher_logits[B,T,V], mask[B,T]) -> (sum, count).
    """
    per_token = get_per_token(name, beta=beta, temperature=temperature)

    def reduced(student_logits_btv, teacher_logits_btv, mask_bt):
        return masked_sum(per_token(student_logits_btv, teacher_logits_btv), mask_bt)

    return reduced


def divergence(name: str, student_logits_btv: jax.Array, teacher_logits_btv: jax.Array,
               mask_bt: jax.Array, *, beta: float = 0.5,
               temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Masked divergence chosen by name, as (sum over masked tokens, number of masked tokens).

    Args:
      name: one of DIVERGENCES ("forward_kl", "reverse_kl", "jsd").
      student_logits_btv: [B,T,V] student logits (gradients flow here).
      teacher_logits_btv: [B,T,V] teacher logits (stop_gradient is applied).
      mask_bt: [B,T] bool or float weights.
      beta: the JSD mixture weight (ignored by the KLs).
      temperature: tau > 0.
    """
    return get_divergence(name, beta=beta, temperature=temperature)(
        student_logits_btv, teacher_logits_btv, mask_bt)
