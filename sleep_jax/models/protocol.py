"""The model protocol every sleep_jax component speaks, and adapters for foreign Flax models.

A causal LM plugs in when it offers::

    model(tokens[B,T], positions[B,T], cache=None, mask=None, segment_ids=None)
        -> (logits[B,T,V], cache)        # return_hidden=True adds hidden[B,T,D]
    model.init_cache(batch, max_len) -> cache
    model.config                          # frozen dataclass with the sizes growth needs

``mask[B,T]`` marks real (non-padding) tokens; attention is causal within a segment; with a
cache the new tokens are appended at the cache's write index and ``positions`` give each row's
own positions (rows of different prompt lengths share a batch). Every parameter should carry
``logical_axes`` metadata so it shards by the rules table and growth can find its axes.

Models that do not follow it are wrapped:
- ``RecomputeLM`` wraps any NNX module through a function ``fn(module, tokens, positions, mask)
  -> logits`` (or ``(logits, hidden)``); its cache keeps the token history and recomputes the
  forward pass over it, so the sampler and scoring work without a KV cache (slower: O(T^2)).
- ``linen_lm`` wraps a Linen module with ``nnx.bridge.ToNNX`` the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx


@runtime_checkable
class CausalLM(Protocol):
    """Structural type of a sleep_jax language model (see the module docstring)."""

    config: Any

    def __call__(self, tokens, positions, cache=None, mask=None, segment_ids=None, *,
                 return_hidden: bool = False): ...

    def init_cache(self, batch: int, max_len: int) -> Any: ...


class RecomputeLM(nnx.Module):
    """Protocol adapter for an NNX module without a KV cache.

    Args:
      module: the user's NNX module.
      fn: ``fn(module, tokens[B,T], positions[B,T], mask[B,T]) -> logits[B,T,V]`` or
        ``(logits, hidden[B,T,D])``; it must be causal (and respect ``mask`` for padding).
      config: the model's config (sizes), exposed as ``self.config``.
    The cache is ``{"tokens", "positions", "valid": [B,S], "index"}``: each call writes its
    tokens at ``index`` and runs ``fn`` over the whole history, returning the new positions'
    logits. Key slots are ordered by write index, so causality over slots equals causality
    over time for the sampler's left-to-right writes.
    """

    def __init__(self, module: nnx.Module, fn: Callable, config: Any = None):
        self.module = module
        self.fn = fn
        self.config = config

    def init_cache(self, batch: int, max_len: int) -> dict:
        return {"tokens": jnp.zeros((batch, max_len), jnp.int32),
                "positions": jnp.zeros((batch, max_len), jnp.int32),
                "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}

    def _run(self, tokens, positions, mask):
        out = self.fn(self.module, tokens, positions, mask)
        return out if isinstance(out, tuple) else (out, None)

    def __call__(self, tokens, positions, cache=None, mask=None, segment_ids=None, *,
                 return_hidden: bool = False, **unused):
        if segment_ids is not None:
            raise ValueError("RecomputeLM does not support segment_ids (packing)")
        B, T = tokens.shape
        if mask is None:
            mask = jnp.ones((B, T), bool)
        if cache is None:
            logits, hidden = self._run(tokens, positions, mask)
            new_cache = None
        else:
            i = cache["index"]
            upd = lambda a, x: jax.lax.dynamic_update_slice(a, x.astype(a.dtype), (0, i))
            new_cache = {"tokens": upd(cache["tokens"], tokens),
                         "positions": upd(cache["positions"], positions),
                         "valid": upd(cache["valid"], mask), "index": i + T}
            S = cache["tokens"].shape[1]
            # Invalid slots (padding, not yet written) are masked; the history is stored
            # left to right, so the user's causal fn sees exactly the tokens before each one.
            logits, hidden = self._run(new_cache["tokens"], new_cache["positions"],
                                       new_cache["valid"] & (jnp.arange(S)[None] < i + T))
            logits = jax.lax.dynamic_slice_in_dim(logits, i, T, axis=1)
            if hidden is not None:
                hidden = jax.lax.dynamic_slice_in_dim(hidden, i, T, axis=1)
        if return_hidden:
            if hidden is None:
                raise ValueError("this model's fn returns no hidden states")
            return logits, new_cache, hidden
        return logits, new_cache


def linen_lm(module, example_tokens, *, rngs: nnx.Rngs, config: Any = None,
             apply_fn: Callable | None = None) -> RecomputeLM:
    """Wrap a Linen causal LM ``module(tokens, positions, mask) -> logits`` for sleep_jax.

    The Linen module is lifted with ``nnx.bridge.ToNNX`` and initialised lazily on
    ``example_tokens`` [B,T]; ``apply_fn(bridged, tokens, positions, mask)`` overrides how it is
    called (default: positionally).
    """
    bridged = nnx.bridge.ToNNX(module, rngs=rngs)
    B, T = example_tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    nnx.bridge.lazy_init(bridged, example_tokens, pos, jnp.ones((B, T), bool))
    # Inference needs no random streams; a stateful RNG counter could not be advanced inside
    # the sampler's traced loop.
    bridged.to_nnx__rngs = None
    fn = apply_fn or (lambda m, t, p, k: m(t, p, k))
    return RecomputeLM(bridged, fn, config)
