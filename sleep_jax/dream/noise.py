"""Routing noise while dreaming (issue 12, item 1).

The paper's MoE router adds one random expert per token while dreaming. This model's trained
expert slots are always on (gate 1, or a learned per-token gate), so there is no expert to add;
the noise is defined instead as: at every token, ONE of the trained slots, drawn uniformly,
has its output scaled by (1 + scale). It is an ``expert_gate`` [B,T,E] (the decoder's call
argument, multiplying each slot's gate) of ones with 1 + scale at the drawn slot.

Only the dream sampler sees it: ``RoutingNoise`` wraps the generator model for
``iteration.generate_and_select``'s sampling (and the rollout's behaviour log-probs, which
re-score the rows under the same noise); the selection gradients and the inner loop use the
model without noise. The draw for (row b, position t) is a function of the key and t only,
so the prefill, every decode step and the re-scoring pass see the same gate at a token.
It means something only when earlier sleeps (or this one) left trained slots; with no slot
listed, or scale 0, it is the identity.

Shapes: B rows, T tokens, E slots, Lmax = ``max_len`` (positions at or beyond it reuse the
last draw).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


class RoutingNoise:
    """A protocol model: ``model`` with one random slot of ``slots`` scaled per token."""

    def __init__(self, model, slots: Sequence[int], *, scale: float, key, max_len: int):
        E = model.config.expert_slots
        if any(not 0 <= s < E for s in slots):
            raise ValueError(f"routing-noise slots {list(slots)} out of range for {E} slots")
        if scale < 0 or max_len < 1:
            raise ValueError(f"routing noise scale={scale} must be >= 0 and max_len={max_len} "
                             f">= 1")
        self.model, self.slots, self.scale, self.key = model, tuple(slots), scale, key
        self.max_len = max_len
        self.config = model.config
        self.capabilities = getattr(model, "capabilities", ())

    @property
    def active(self) -> bool:
        return bool(self.slots) and self.scale > 0

    def init_cache(self, batch: int, max_len: int):
        return self.model.init_cache(batch, max_len)

    def gate(self, positions_bt: jax.Array) -> jax.Array:
        """expert_gate [B,T,E] for these positions (module docstring)."""
        B = positions_bt.shape[0]
        pick = jax.random.randint(self.key, (B, self.max_len), 0, len(self.slots))
        slot = jnp.asarray(self.slots, jnp.int32)[pick]  # [B, Lmax]
        at = jnp.take_along_axis(slot, jnp.clip(positions_bt, 0, self.max_len - 1), axis=1)
        return 1.0 + self.scale * jax.nn.one_hot(at, self.config.expert_slots)

    def __call__(self, tokens, positions, cache=None, mask=None, **kw):
        if self.active:
            kw["expert_gate"] = self.gate(positions)
        return self.model(tokens, positions, cache=cache, mask=mask, **kw)
