"""The optimizer: AdamW with linear warmup, cosine decay and global-norm clipping (optax).

AdamW: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (arXiv 1711.05101).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup + cosine decay and global-norm clipping.

    lr(t) = peak * t / warmup for t < warmup, then
    lr(t) = end + (peak - end) * (1 + cos(pi * (t - warmup) / (decay - warmup))) / 2,
    with end = peak * end_lr_ratio and decay = decay_steps (0: the run's length).
    ``pull_to_init`` > 0 adds an L2 pull toward the parameters the optimizer was initialised
    with (L2-SP; ``pull_to_init``), the classic regularisation baseline of continual learning.
    """

    lr: float = 3e-3
    warmup_steps: int = 10
    decay_steps: int = 0
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping
    pull_to_init: float = 0.0  # L2-SP strength (``pull_to_init``); 0 disables it



def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``cfg.lr`` then cosine decay to ``cfg.lr * cfg.end_lr_ratio``.

    lr(t) = lr * t / W for t < W; lr(t) = e + (lr - e) (1 + cos(pi (t - W) / (S - W))) / 2 for
    W <= t < S; lr(t) = e after S, with W warmup steps, S decay steps (``total_steps`` when
    ``cfg.decay_steps`` is 0) and e the end value.

    optax 0.2.8's ``warmup_cosine_decay_schedule`` fails when W >= S (short runs), so W is
    clamped to S - 1 and S to at least 1.
    """
    decay = int(cfg.decay_steps or total_steps)
    decay = max(decay, 1)
    warmup = max(0, min(int(cfg.warmup_steps), decay - 1))
    end = cfg.lr * cfg.end_lr_ratio
    if warmup == 0:
        return optax.cosine_decay_schedule(cfg.lr, decay_steps=decay,
                                           alpha=cfg.end_lr_ratio)
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=cfg.lr,
                                              warmup_steps=warmup, decay_steps=decay,
                                              end_value=end)


class PullState(NamedTuple):
    anchor: optax.Params  # the parameters at ``init``


def pull_to_init(strength: float) -> optax.GradientTransformation:
    """L2-SP (Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with
    Convolutional Networks", arXiv 1802.01483): adds ``strength * (theta - theta_0)`` to the
    gradient, the gradient of ``strength / 2 * ||theta - theta_0||^2``, where theta_0 are the
    parameters ``init`` was called with (the pre-sleep weights when a sleep creates its
    optimizer). The state holds a copy of theta_0 (one parameter-sized buffer)."""

    def init(params):
        return PullState(jax.tree.map(jnp.array, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("pull_to_init needs the parameters: call tx.update(g, s, params)")
        out = jax.tree.map(lambda g, p, a: g + strength * (p - a).astype(g.dtype), updates,
                           params, state.anchor)
        return out, state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (``cfg.clip_norm`` > 0) followed by AdamW on ``lr_schedule``
    (with ``cfg.pull_to_init`` > 0, the L2-SP pull is added to the gradient first).

    Weight decay applies to every parameter (the tiny models have no biases); decay is masked out
    with the trainable mask together with the update (see ``apply_gradients``).
    """
    chain = []
    if cfg.pull_to_init > 0:
        chain.append(pull_to_init(cfg.pull_to_init))
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*chain)


def current_lr(cfg: OptimConfig, total_steps: int, step) -> jnp.ndarray:
    """The learning rate at optimizer step ``step`` (for logging)."""
    return lr_schedule(cfg, total_steps)(step)
