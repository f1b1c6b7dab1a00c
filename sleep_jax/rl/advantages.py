"""Advantage estimators registered by name; each returns per-token advantages [B,M].

Rows of a batch are grouped: rows ``g*G .. g*G + G-1`` are the G completions of prompt g.
Group estimators see whole groups, so they run on the full rollout before any mini-batching.

- ``grpo``: A_i = (r_i - mean_g r) / (std_g r + eps), std with Bessel's correction (ddof=1, as
  TRL and torch.std), broadcast to every completion token (Shao et al. 2024, DeepSeekMath).
- ``grpo_no_std``: A_i = r_i - mean_g r, the advantage of Dr. GRPO (Liu et al. 2025: no std
  division, so no bias towards groups of low reward spread). It is only half of Dr. GRPO: the
  other half is the loss aggregation, a constant normaliser instead of a length-dependent one
  (``RLConfig(advantage="grpo_no_std", loss_norm="constant")``, ``update.loss_norms``).
- ``rloo``: A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_g r) (Ahmadian et al. 2024).
- ``gae``: generalized advantage estimation (Schulman et al. 2016) over completion tokens with
  the sequence reward on the last token: delta_t = r_t + gamma V_{t+1} - V_t,
  A_t = delta_t + gamma lam A_{t+1}, V and A zero after the last token; returns R_t = A_t + V_t.

Every estimator: ``fn(rewards_b, mask_bm, values_bm, *, group_size, gamma, lam, eps)
-> (advantages_bm, returns_bm)`` (returns are only meaningful for ``gae``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Estimator = Callable[..., tuple[jax.Array, jax.Array]]
ADVANTAGES: dict[str, Estimator] = {}


def register_advantage(name: str):
    """Decorator: register an advantage estimator (signature in the module docstring)."""

    def deco(fn: Estimator) -> Estimator:
        ADVANTAGES[name] = fn
        return fn

    return deco


def _groups(rewards_b: jax.Array, group_size: int) -> jax.Array:
    B = rewards_b.shape[0]
    if group_size < 1 or B % group_size:
        raise ValueError(f"batch of {B} rewards does not split into groups of "
                         f"group_size={group_size}")
    return rewards_b.astype(jnp.float32).reshape(B // group_size, group_size)


def _per_token(adv_b: jax.Array, mask_bm: jax.Array) -> jax.Array:
    return jnp.where(mask_bm, adv_b[:, None], 0.0)


@register_advantage("grpo")
def grpo(rewards_b, mask_bm, values_bm=None, *, group_size: int, eps: float = 1e-6, **_):
    """(r - group mean) / (group std + eps), std with ddof=1."""
    if group_size < 2:
        raise ValueError(f"grpo needs group_size >= 2 for a std, got {group_size}")
    r = _groups(rewards_b, group_size)
    a = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)
    return _per_token(a.reshape(-1), mask_bm), jnp.zeros(mask_bm.shape, jnp.float32)


@register_advantage("grpo_no_std")
def grpo_no_std(rewards_b, mask_bm, values_bm=None, *, group_size: int, **_):
    """r - group mean (Dr. GRPO's advantage; its constant loss normaliser is
    ``RLConfig.loss_norm="constant"``)."""
    r = _groups(rewards_b, group_size)
    a = r - r.mean(1, keepdims=True)
    return _per_token(a.reshape(-1), mask_bm), jnp.zeros(mask_bm.shape, jnp.float32)


@register_advantage("rloo")
def rloo(rewards_b, mask_bm, values_bm=None, *, group_size: int, **_):
    """r_i - mean of the other G-1 rewards of the group."""
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2, got {group_size}")
    r = _groups(rewards_b, group_size)
    a = (r * group_size - r.sum(1, keepdims=True)) / (group_size - 1)
    return _per_token(a.reshape(-1), mask_bm), jnp.zeros(mask_bm.shape, jnp.float32)


def sequence_reward_to_tokens(rewards_b: jax.Array, mask_bm: jax.Array) -> jax.Array:
    """[B,M] token rewards: the sequence reward on each row's last completion token."""
    m = mask_bm.astype(jnp.int32)
    last = jnp.maximum(jnp.sum(m, 1) - 1, 0)
    onehot = (jnp.arange(mask_bm.shape[1])[None] == last[:, None]) & mask_bm
    return jnp.where(onehot, rewards_b[:, None].astype(jnp.float32), 0.0)


def gae_tokens(token_rewards_bm, values_bm, mask_bm, *, gamma: float, lam: float):
    """GAE over [B,M] token rewards and values; masked (after-the-end) tokens contribute 0."""
    m = mask_bm.astype(jnp.float32)
    v = values_bm.astype(jnp.float32) * m
    r = token_rewards_bm.astype(jnp.float32) * m
    v_next = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], 1)
    deltas = r + gamma * v_next - v

    def back(a_next, xs):
        d, mt = xs
        a = (d + gamma * lam * a_next) * mt
        return a, a

    _, adv = jax.lax.scan(back, jnp.zeros(v.shape[0]), (deltas.T, m.T), reverse=True)
    adv = adv.T
    return adv, (adv + v) * m


@register_advantage("gae")
def gae(rewards_b, mask_bm, values_bm, *, gamma: float = 1.0, lam: float = 0.95,
        token_rewards_bm=None, **_):
    """GAE with the sequence reward on the last token (plus optional per-token rewards, e.g.
    a KL penalty)."""
    if values_bm is None:
        raise ValueError("gae needs values_bm (a value head: algorithm='ppo')")
    tr = sequence_reward_to_tokens(rewards_b, mask_bm)
    if token_rewards_bm is not None:
        tr = tr + token_rewards_bm
    return gae_tokens(tr, values_bm, mask_bm, gamma=gamma, lam=lam)


def compute_advantages(name: str, rewards_b, mask_bm, values_bm=None, **options):
    """Dispatch to the estimator ``name``; returns (advantages [B,M], returns [B,M])."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: "
                         f"{sorted(ADVANTAGES)}")
    return ADVANTAGES[name](rewards_b, mask_bm, values_bm, **options)
