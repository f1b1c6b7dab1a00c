"""Expert slots, the paper's growth (arXiv 2606.03979, Stage 1): pre-allocated low-rank experts.

Beside each MLP block the model carries E slots (``sleep_jax.models.llama``)::

    out = MLP(h) + sum_e gate_e * mask_e * B_e(silu(A_e h)),   A_e: D x R,  B_e: R x D

with ``h`` the MLP's normalised input, ``mask`` [L, E] a non-trainable ``SlotMask`` and ``gate``
a call argument (1 by default) a router can drive later. The activation is SiLU, as in the
SwiGLU MLP beside it. Shapes stay static: growing E -> E' appends slots that are off
(mask 0, B 0), which is bitwise preserving; ``activate_slot`` turns one slot on in chosen
layers with random A and B = 0 (still bitwise exact: B_e(.) = 0) and returns a trainable mask
that marks only that slot's A and B entries, so seeding trains only the new expert;
``reset_slots`` turns slots off again (the paper resets the fast block's experts after
seeding). Off (E = 0) the model has no expert parameters and no cost.

Slots are allocated once (growth 0 -> E, all off; static shapes, so later sleeps compile the
same programs) and each sleep trains the next free one: ``used_slots`` lists the slots that are
on in any layer, ``next_free_slot`` the lowest slot that is off in every layer (raising
``SlotsExhausted`` when none is left), and ``activate_slot`` refuses a slot that is already on
(it would re-draw A and zero B, erasing what that slot learned) unless ``overwrite=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sleep_jax.grow.axismap import AxisPlan, embed_role, key_for
from sleep_jax.grow.flat import axes_of, flatten, is_var, rebuild
from sleep_jax.grow.optimizer import (
    EntryClockState,
    attach_clocks,
    check_tx,
    split_clocks,
    tx_for,
)
from sleep_jax.models.config import ModelConfig


class SlotsExhausted(ValueError):
    """Every expert slot is on: a new expert needs a free slot (reset one, or grow more)."""


def _slot_mask(model_or_state) -> np.ndarray:
    """Which (layer, slot) pairs are on, [L, E] bool on the host, for a model or TrainState.

    Reads the non-trainable variables with both ``layers`` and ``expert`` axes (the SlotMask).
    """
    if isinstance(model_or_state, nnx.Module):
        other = nnx.split(model_or_state, nnx.Param, ...)[2]
    elif hasattr(model_or_state, "other"):
        other = model_or_state.other
    else:
        raise TypeError(f"expected an NNX model or a TrainState, got "
                        f"{type(model_or_state).__name__}")
    masks = [v for v in flatten(other).values() if _has_slots(v)]
    if not masks:
        raise ValueError("the model has no expert slots (ModelConfig.expert_slots=0); grow "
                         "with expert_slots=E first")
    on = None
    for v in masks:
        x = v[...]
        if isinstance(x, jax.core.Tracer):
            raise ValueError("expert slot use is read from concrete SlotMask values; call "
                             "used_slots / next_free_slot / activate_slot outside jax.jit "
                             "(or pass overwrite=True to activate_slot to skip the check)")
        axes = axes_of(v)
        x = np.moveaxis(np.asarray(x) != 0, [axes.index("layers"), axes.index("expert")],
                        [0, 1])
        x = x.reshape(x.shape[0], x.shape[1], -1).any(axis=2)
        on = x if on is None else on | x
    return on


def used_slots(model_or_state) -> list[int]:
    """Slot indices that are on (SlotMask != 0) in at least one layer, ascending.

    A slot on in any layer holds (or is being given) a trained expert and is never handed out
    again by ``next_free_slot``.
    """
    return np.flatnonzero(np.any(_slot_mask(model_or_state), axis=0)).tolist()


def next_free_slot(model_or_state) -> int:
    """The lowest slot index whose SlotMask is 0 in every layer.

    Raises:
      SlotsExhausted: all E slots are used.
      ValueError: the model has no expert slots.
    """
    mask = _slot_mask(model_or_state)
    free = np.flatnonzero(~np.any(mask, axis=0))
    if free.size == 0:
        E = mask.shape[1]
        raise SlotsExhausted(
            f"all {E} expert slot(s) are used (on in some layer: {list(range(E))}); a new "
            f"expert needs a free slot: let the sleep cycle's policy reset one (reset_slots) "
            f"or allocate more with a larger expert_slots (grow expert_slots={E} -> more)")
    return int(free[0])


def expert_plans(src: ModelConfig, dst: ModelConfig) -> list[AxisPlan]:
    """Append ``dst.expert_slots - src.expert_slots`` slots that are off.

    New slot e: A_e random (std of the existing A, else ``init_std``), B_e = 0, mask_e = 0.
    Exact: the new terms are gate * 0 * B_e(.) with B_e = 0.
    """
    E, E2 = src.expert_slots, dst.expert_slots
    if E2 == E:
        return []
    return [AxisPlan("expert", list(range(E)) + [-1] * (E2 - E),
                     new={"consumer": "random", "producer": "zero", "gain": "zero",
                          "other": "zero"})]


def _selection(shape, axes, layers, slots) -> np.ndarray:
    """Boolean [.., L, .., E, ..] (broadcastable to ``shape``) selecting (layer, slot) pairs."""
    la, ea = axes.index("layers"), axes.index("expert")
    L, E = shape[la], shape[ea]
    sel = np.zeros((L, E), bool)
    rows = np.arange(L) if layers is None else np.atleast_1d(np.asarray(layers))
    cols = np.arange(E) if slots is None else np.atleast_1d(np.asarray(slots))
    for name, idx, n in (("layer", rows, L), ("slot", cols, E)):
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise ValueError(f"expert {name} index {idx.tolist()} out of range for {n} "
                             f"{name}s")
    sel[np.ix_(rows, cols)] = True
    out_shape = [1] * len(shape)
    out_shape[la], out_shape[ea] = L, E
    if la > ea:
        sel = sel.T
    return sel.reshape(out_shape)


def _has_slots(v) -> bool:
    axes = axes_of(v) if is_var(v) else None
    return axes is not None and "layers" in axes and "expert" in axes


def _set_slots(params, other, opt_state, layers, slots, rng, std, on: bool):
    """Shared body of activate/reset: returns (params, other, opt_state, mask)."""
    flat = flatten(params)
    if not any(_has_slots(v) for v in flat.values()):
        raise ValueError("the model has no expert slots (ModelConfig.expert_slots=0); grow "
                         "with expert_slots=E first")

    def param_value(path, v):
        if not _has_slots(v):
            return v[...]
        axes, x = axes_of(v), v[...]
        sel = _selection(x.shape, axes, layers, slots)
        role = embed_role(axes)
        if role == "consumer" and rng is not None:  # A: fresh random input weights
            fresh = jax.random.normal(key_for(rng, path), x.shape, jnp.float32) * std
            return jnp.where(sel, fresh.astype(x.dtype), x)
        if role == "producer":  # B: zero, so the slot starts exact
            return jnp.where(sel, jnp.zeros((), x.dtype), x)
        return x

    def mask_value(path, v):
        if not _has_slots(v) or not on:
            return jnp.zeros((), bool)
        return jnp.broadcast_to(_selection(v.shape, axes_of(v), layers, slots), v.shape)

    def other_value(path, v):
        if not _has_slots(v):
            return v[...]
        x = v[...]
        sel = _selection(x.shape, axes_of(v), layers, slots)
        return jnp.where(sel, jnp.asarray(1.0 if on else 0.0, x.dtype), x)

    def moment(v):
        if not _has_slots(v):
            return v
        x = v[...]
        return v.replace(jnp.where(_selection(x.shape, axes_of(v), layers, slots),
                                   jnp.zeros((), x.dtype), x))

    new_opt = None if opt_state is None else jax.tree.map(moment, opt_state, is_leaf=is_var)
    return (rebuild(params, param_value), rebuild(other, other_value), new_opt,
            rebuild(params, mask_value))


def activate_slot(state, layers: int | Sequence[int] | None, slot: int, rng: jax.Array, *,
                  std: float = 0.02, overwrite: bool = False):
    """Turn expert ``slot`` on in ``layers`` (None: all): mask 1, A random, B = 0 (exact).

    A slot that is already on in any layer is refused (activating it would re-draw its A and
    zero its B, erasing what it learned) unless ``overwrite=True``; use ``next_free_slot`` to
    pick the slot.

    Args:
      state: a ``TrainState`` or an NNX model with expert slots.
      layers: layer index, indices, or None for every layer.
      slot: the slot index e in [0, E).
      rng: key for the new A_e [D, R] ~ N(0, std^2).
      overwrite: allow re-initialising a slot that is on (its trained weights are lost).
    Returns:
      (state, trainable_mask): the same kind of object as ``state``, and a pytree like its
      params of bool arrays that marks only A[layers, slot] and B[layers, slot] (scalars False
      elsewhere); the slot's optimizer moments start at zero, with their own bias-correction
      count when the optimizer keeps one (a new entry clock, as after growth:
      ``sleep_jax.grow.optimizer``; the state's ``tx`` becomes ``entry_clocks(tx, G)``).
    Raises:
      ValueError: ``slot`` is already on (without ``overwrite``), or is not an int in [0, E).
    """
    if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)):
        raise ValueError(f"activate_slot: slot must be one int index, got {slot!r}")
    if not overwrite:
        mask = _slot_mask(state)
        E = mask.shape[1]
        if not -E <= slot < E:
            raise ValueError(f"expert slot index {slot} out of range for {E} slots")
        on = np.flatnonzero(mask[:, slot])
        if on.size:
            free = [e for e in range(E) if not mask[:, e].any()]
            raise ValueError(
                f"expert slot {slot} is already on (layers {on.tolist()}); activating it again "
                f"would re-draw its A and zero its B, erasing what it learned. Free slots: "
                f"{free or 'none'} (next_free_slot picks one); pass overwrite=True to "
                f"re-initialise it on purpose")
    return _apply(state, layers, slot, rng, std, on=True)


def reset_slots(state, layers: int | Sequence[int] | None = None,
                slots: int | Sequence[int] | None = None, rng: jax.Array | None = None, *,
                std: float = 0.02):
    """Turn expert slots off: mask 0, B = 0, moments 0 (A redrawn when ``rng`` is given).

    The model's function returns to that without those slots, bitwise. Returns the same kind
    of object as ``state``.
    """
    return _apply(state, layers, slots, rng, std, on=False)[0]


def _apply(state, layers, slots, rng, std, *, on: bool):
    if isinstance(state, nnx.Module):
        graphdef, params, other = nnx.split(state, nnx.Param, ...)
        params, other, _, mask = _set_slots(params, other, None, layers, slots, rng, std, on)
        return nnx.merge(graphdef, params, other), mask
    inner, clock, start = split_clocks(state.opt_state)
    check_tx(state.tx, state.opt_state)
    params, other, inner, mask = _set_slots(state.params, state.other, inner, layers, slots,
                                            rng, std, on)
    opt = inner if clock is None else EntryClockState(inner, clock, start)
    if on and inner is not None:  # the slot's zeroed moments get their own Adam count
        fresh = {k: v[...] for k, v in flatten(mask).items() if _has_slots(v)}
        clocks = None if clock is None else {k: v[...] for k, v in flatten(clock).items()}
        opt = attach_clocks(inner, params, fresh, clocks, start)
    return state.replace(params=params, other=other, opt_state=opt,
                         tx=tx_for(state.tx, opt)), mask
