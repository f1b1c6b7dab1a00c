"""Selection: each dream's importance from the gradient of its SFT loss, top-k plus b random.

The gradient of dream m's SFT loss (``inner.sft_loss``) over the inner adapter's parameters is
taken at the shared starting adapter ``adapter0``, for all M dreams at once (``jax.vmap`` of
``jax.grad``; the base weights shared). The paper does not say how the gradient becomes a
scalar; here (``DreamConfig.score``):

- "cosine" (default): cos(g_m, g_C) = <g_m, g_C> / (|g_m| |g_C| + 1e-12), with g_C the gradient
  of the LM loss on the context C itself, over the same adapter parameters (every leaf
  flattened and concatenated). A dream scores high when training on it moves the adapter the
  way training on the passage would: it is about C. (When adapter0's B is 0, as after
  ``activate_slot``, only B carries gradient at the start; A's zero gradient adds nothing.)
- "grad_norm": |g_m|, how much the dream would change the adapter (large for surprising text).

``keep_indices`` keeps the k highest scores and b more drawn uniformly without replacement from
the rest. ``copies_context`` (tokens, jittable) / ``copies_context_text`` (host) flag a dream
that copies C verbatim: a non-empty dream whose tokens are one contiguous run of C's tokens
(C itself or a part of it). With the word-level tokenizer that is the text definition "equal
to C or contained in C after whitespace normalisation" (``copies_context_text``); no fuzzy
matching: a near copy with one word changed is not counted.

Data discipline: in training the dreams and contexts are TASK-split inputs; selection needs no
questions, so at sleep it runs on the new memories with gradients only.

Shapes: M dreams, T dream width, Tc context width.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from sleep_jax.dream.config import SCORES
from sleep_jax.dream.inner import DreamBase, sft_loss


def dream_gradients(base: DreamBase, adapter0, tokens_mt, mask_mt):
    """d sft_loss(dream m) / d adapter at adapter0, stacked [M, ...] like the adapter."""
    g = jax.grad(lambda a, t, m: sft_loss(base, a, t, m))
    return jax.vmap(g, in_axes=(None, 0, 0))(adapter0, tokens_mt, mask_mt)


def _flat(tree, lead: int):
    """Every leaf flattened and concatenated: [lead, N] (lead = number of leading axes kept)."""
    leaves = jax.tree.leaves(tree)
    shape = leaves[0].shape[:lead]
    return jnp.concatenate([x.reshape(shape + (-1,)).astype(jnp.float32) for x in leaves], -1)


def gradient_scores(base: DreamBase, adapter0, tokens_mt, mask_mt, ctx_t, ctx_mask_t
                    ) -> dict[str, jax.Array]:
    """Both importance scalars [M] of each dream: {"cosine", "grad_norm"} (module docstring);
    ctx_t [Tc], ctx_mask_t [Tc] is C (as the dreams are framed)."""
    g = _flat(dream_gradients(base, adapter0, tokens_mt, mask_mt), 1)  # [M,N]
    gc = _flat(jax.grad(lambda a: sft_loss(base, a, ctx_t, ctx_mask_t))(adapter0), 0)  # [N]
    norm = jnp.linalg.norm(g, axis=-1)
    return {"cosine": (g @ gc) / (norm * jnp.linalg.norm(gc) + 1e-12), "grad_norm": norm}


def importance(base: DreamBase, adapter0, tokens_mt, mask_mt, ctx_t, ctx_mask_t, *,
               score: str = "cosine") -> jax.Array:
    """The importance [M] ``score`` ("cosine" or "grad_norm") of each dream."""
    if score not in SCORES:
        raise ValueError(f"score={score!r}; allowed: {SCORES}")
    return gradient_scores(base, adapter0, tokens_mt, mask_mt, ctx_t, ctx_mask_t)[score]


def keep_indices(scores_m: jax.Array, rng: jax.Array, *, top: int, random: int) -> jax.Array:
    """Indices [top + random]: the ``top`` highest scores (highest first), then ``random`` of
    the remaining dreams drawn uniformly without replacement (ties: the lower index first)."""
    M = scores_m.shape[0]
    if top + random > M or top < 0 or random < 0:
        raise ValueError(f"keep top={top} + random={random} of {M} dreams: both >= 0, at most "
                         f"{M} in all")
    order = jnp.argsort(-scores_m, stable=True)
    best = order[:top]
    if not random:
        return best
    rest = order[top:]
    pick = jax.random.permutation(rng, M - top)[:random]
    return jnp.concatenate([best, rest[pick]])


def copies_context(tokens_t, mask_t, ctx_t, ctx_mask_t) -> jax.Array:
    """True when the dream (tokens_t [T], mask_t a left-aligned valid prefix, optionally after a
    BOS the caller has removed) is non-empty and equals ctx_t[s : s + n] for some start s
    within C's valid tokens (bool scalar; jittable)."""
    T, Tc = tokens_t.shape[0], ctx_t.shape[0]
    n = jnp.sum(mask_t)
    nc = jnp.sum(ctx_mask_t)
    idx = jnp.arange(Tc)[:, None] + jnp.arange(T)[None]  # [Tc, T] window s, offset j
    win = jnp.where(idx < Tc, ctx_t[jnp.minimum(idx, Tc - 1)], -1)
    same = (win == tokens_t[None]) | ~mask_t[None]
    fits = jnp.arange(Tc) + n <= nc
    return (n > 0) & jnp.any(jnp.all(same, -1) & fits)


def _norm_ws(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def copies_context_text(dream: str, context: str) -> bool:
    """Host version: the dream, whitespace-normalised, is non-empty and equal to or contained
    in the whitespace-normalised context."""
    d = _norm_ws(dream)
    return bool(d) and d in _norm_ws(context)
