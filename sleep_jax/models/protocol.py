"""The model protocol every sleep_jax component speaks, and adapters for foreign Flax models.

A causal LM plugs in when it offers::

    model(tokens[B,T], positions[B,T], cache=None, mask=None, segment_ids=None)
        -> (logits[B,T,V], cache)        # return_hidden=True adds hidden[B,T,D]
    model.init_cache(batch, max_len) -> cache
    model.config                          # frozen dataclass with the sizes growth needs
    model.capabilities                    # optional: {"hidden", "experts"} it offers

Inside sleep_jax every forward pass goes through ``forward(model, ...) -> LMOutput`` (logits,
cache, hidden, experts), so no caller depends on a tuple whose length depends on flags, and
components check capabilities instead of the concrete class (distill/ never imports the
decoder).

``mask[B,T]`` marks real (non-padding) tokens; attention is causal within a segment; with a
cache the new tokens are appended at the cache's write index and ``positions`` give each row's
own positions (rows of different prompt lengths share a batch). Every parameter should carry
``logical_axes`` metadata so it shards by the rules table and growth can find its axes.

Models that do not follow it are wrapped:
- ``RecomputeLM`` wraps any NNX module through a function ``fn(module, tokens, positions, mask)
  -> logits`` (or ``(logits, hidden)``); its cache keeps the token history and recomputes the
  forward pass over it, so the sampler and scoring work without a KV cache (slower: O(T^2)).
  Pass ``mask`` through to the module, which must not attend to keys where it is False::

      class MyLM(nnx.Module):
          def __call__(self, tokens, positions, mask):  # mask[B,T]: True on real tokens
              ...  # causal attention that ignores keys where mask is False -> logits[B,T,V]

      lm = RecomputeLM(MyLM(rngs=nnx.Rngs(0)),
                       fn=lambda m, tokens, positions, mask: m(tokens, positions, mask),
                       config=my_cfg)

- ``linen_lm`` wraps a Linen module with ``nnx.bridge.ToNNX`` the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

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


# Capabilities a model may declare (``model.capabilities``) beyond the protocol's
# ``(logits, cache)``: "hidden" (``return_hidden=True`` adds the final hidden states [B,T,D];
# PPO's value head reads them) and "experts" (``return_experts=True`` adds the expert slots'
# activity ``{"gate": [L,B,T,E], "out_rms": [L,B,T]}``; seeding's expert costs and metrics).
HIDDEN, EXPERTS = "hidden", "experts"


class LMOutput(NamedTuple):
    """One forward pass inside sleep_jax (models themselves return the protocol's tuple).

    logits [B,T,V]; cache (or None); hidden [B,T,D] when asked; experts (the activity dict)
    when asked.
    """

    logits: jax.Array
    cache: Any = None
    hidden: jax.Array | None = None
    experts: dict | None = None


def capabilities(model) -> frozenset[str]:
    """What ``model`` declares beyond ``(logits, cache)``: a subset of {HIDDEN, EXPERTS}."""
    return frozenset(getattr(model, "capabilities", ()))


def forward(model, tokens, positions, *, cache=None, mask=None, segment_ids=None,
            hidden: bool = False, experts: bool = False) -> LMOutput:
    """Call a protocol model and return an ``LMOutput``; the one place that knows the tuple.

    Args:
      model: a protocol model; ``hidden``/``experts`` need the matching capability.
      tokens, positions: [B,T]; cache, mask [B,T], segment_ids [B,T] as the protocol.
      hidden: also return the final hidden states [B,T,D].
      experts: also return the expert slots' activity.
    Raises:
      ValueError: the model does not declare a capability that was asked for.
    """
    caps = capabilities(model)
    kw = {}
    for name, want, flag in ((HIDDEN, hidden, "return_hidden"),
                             (EXPERTS, experts, "return_experts")):
        if want:
            if name not in caps:
                raise ValueError(f"{type(model).__name__} does not declare the {name!r} "
                                 f"capability (its capabilities: {sorted(caps)}); declare "
                                 f"`capabilities` and accept {flag}=True to offer it")
            kw[flag] = True
    out = model(tokens, positions, cache=cache, mask=mask, segment_ids=segment_ids, **kw)
    rest = list(out[2:])
    return LMOutput(out[0], out[1], rest.pop(0) if hidden else None,
                    rest.pop(0) if experts else None)


class RecomputeLM(nnx.Module):
    """Protocol adapter for an NNX module without a KV cache.

    Args:
      module: the user's NNX module.
      fn: ``fn(module, tokens[B,T], positions[B,T], mask[B,T]) -> logits[B,T,V]`` or
        ``(logits, hidden[B,T,D])``; it must be causal and should pass ``mask`` on (keys where
        it is False are padding), e.g. ``fn=lambda m, tokens, positions, mask: m(tokens,
        positions, mask)`` (see the module docstring).
      config: the model's config (sizes), exposed as ``self.config``.
    The cache is ``{"tokens", "positions", "valid": [B,S], "index"}``: each call writes its
    tokens at ``index`` and runs ``fn`` over the whole history, returning the new positions'
    logits. Key slots are ordered by write index, so causality over slots equals causality
    over time for the sampler's left-to-right writes.

    Before each ``fn`` call the valid tokens of every row are moved to the front (in slot
    order; padding and unwritten slots after them) and the outputs moved back. A right-padded
    prompt followed by sampled tokens thus reaches ``fn`` as one contiguous sequence: a causal
    ``fn`` never sees a padding token before a real one, and a padded row gets the same logits
    as that row alone, even if ``fn`` ignored ``mask``.
    """

    capabilities = frozenset({HIDDEN})  # when ``fn`` returns (logits, hidden)

    def __init__(self, module: nnx.Module, fn: Callable, config: Any = None):
        self.module = module
        self.fn = fn
        self.config = config

    def init_cache(self, batch: int, max_len: int) -> dict:
        return {"tokens": jnp.zeros((batch, max_len), jnp.int32),
                "positions": jnp.zeros((batch, max_len), jnp.int32),
                "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}

    def _run(self, tokens, positions, mask):
        """``fn`` on each row's valid tokens moved to the front; outputs in slot order."""
        order = jnp.argsort(~mask, axis=1, stable=True)  # valid slots first, order kept
        take = lambda a: jnp.take_along_axis(a, order, axis=1)
        out = self.fn(self.module, take(tokens), take(positions), take(mask))
        logits, hidden = out if isinstance(out, tuple) else (out, None)
        inverse = jnp.argsort(order, axis=1)
        back = lambda a: None if a is None else jnp.take_along_axis(a, inverse[..., None], axis=1)
        return back(logits), back(hidden)

    def __call__(self, tokens, positions, cache=None, mask=None, segment_ids=None, *,
                 return_hidden: bool = False, **unused):
        if segment_ids is not None:
            raise ValueError("RecomputeLM does not support segment_ids (packing)")
        B, T = tokens.shape
        mask = jnp.ones((B, T), bool) if mask is None else jnp.asarray(mask).astype(bool)
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
