"""Optimizer state under growth: moments follow the operator's gradient rule.

At a function-preserving growth point the grown model's gradient is a linear image of the
source gradient: each copied entry's gradient is the source entry's times a factor set by the
operator (e.g. a Net2Net split: the divided outgoing weights keep the source gradient, the
copied incoming weights get gradient / c). So Adam's first moment (an average of gradients)
maps with that factor and the second moment (an average of squared gradients) with its square;
new entries start at zero; scalars such as Adam's step count are kept. Any optimizer leaf that
is a tree shaped like the parameters is treated as a first moment unless its field is named
``nu`` (optax's second moment).

Bias correction of new entries. Adam divides its moments by 1 - b^t with t the step count; an
entry whose moments start at zero after the source took T steps must be corrected with its own
count k = t - T, not the global t: with the global one its k-th update is scaled by (1 - b1^k) /
(1 - b1^(T+k)) * sqrt((1 - b2^(T+k)) / (1 - b2^k)), 3.2x at k = 1 and 6.5x at k = 10 after T =
1e4 steps with b2 = 0.999, 0.45x at k = 1 with b2 = 0.95. So ``grow`` gives every parameter
entry a *clock*: the optimizer state becomes ``EntryClockState(inner, clock, start)`` with
``clock`` an int8 tree shaped like the parameters (0 for the source's entries, g for entries new
at the g-th growth or slot activation) and ``start[g]`` the step counts at which clock g
started; the state's transformation becomes ``entry_clocks(tx, G)``, which runs ``tx.update``
once per clock with every counted state's ``count`` (an optax state holding ``count`` beside
parameter-shaped moments, e.g. Adam's) shifted to ``count - start[g]`` and takes each entry's
update from its own clock. The moments and every other counter (learning-rate schedules,
global-norm clipping) are shared, so old entries continue exactly as before and new entries move
exactly as a fresh optimizer on them would, under the run's learning-rate schedule. Cost: G
optimizer updates per step (elementwise; the forward/backward is untouched) and one int8 per
parameter.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sleep_jax.grow.axismap import AxisPlan, _along, _take
from sleep_jax.grow.flat import flatten, rebuild

MAX_CLOCKS = 127  # int8 clock ids


class EntryClockState(NamedTuple):
    """Optimizer state with a step-count clock per parameter entry (see module doc).

    Attributes:
      inner: the wrapped transformation's state (moments and counters, shared).
      clock: a tree like the parameters of int8 arrays: the clock each entry follows.
      start: int32 [G, C]: for clock g, the count of each of the C counted states at its start
        (row 0 is all zero: the source's entries).
    """

    inner: Any
    clock: Any
    start: jax.Array


class ClockedTransformation(optax.GradientTransformation):
    """``entry_clocks(tx, clocks)``: ``tx`` with per-entry bias-correction clocks."""


def _is_counted(x, pdef) -> bool:
    """An optax state holding a ``count`` beside parameter-shaped moments (Adam and kin)."""
    fields = getattr(x, "_fields", None)
    if not isinstance(x, tuple) or fields is None or "count" not in fields:
        return False
    return any(jax.tree.structure(getattr(x, f)) == pdef for f in fields if f != "count")


def counted_states(inner, params) -> list:
    """The counted states of an optax state, in tree order."""
    pdef = jax.tree.structure(params)
    found = []
    jax.tree.map(lambda x: found.append(x) if _is_counted(x, pdef) else None, inner,
                 is_leaf=lambda x: _is_counted(x, pdef))
    return found


def _shift_counts(inner, pdef, shift):
    """``inner`` with the i-th counted state's count replaced by count - shift[i]."""
    i = iter(range(1 << 30))

    def one(x):
        if not _is_counted(x, pdef):
            return x
        return x._replace(count=x.count - shift[next(i)].astype(x.count.dtype))

    return jax.tree.map(one, inner, is_leaf=lambda x: _is_counted(x, pdef))


def entry_clocks(tx: optax.GradientTransformation, clocks: int) -> ClockedTransformation:
    """``tx`` with ``clocks`` bias-correction clocks, one per parameter entry (module doc).

    ``init`` gives every entry clock 0 and all starts 0 (then it is ``tx`` exactly); ``grow``
    fills clocks and starts. Use ``entry_clocks(tx, G)`` to rebuild a grown state's
    transformation, e.g. to restore it from a checkpoint (``G = state.opt_state.start.shape[0]``).
    """
    if isinstance(tx, ClockedTransformation):
        raise ValueError("entry_clocks: tx already has clocks; wrap the inner transformation "
                         "(tx.inner)")
    if not isinstance(clocks, int) or not 1 <= clocks <= MAX_CLOCKS:
        raise ValueError(f"entry_clocks: clocks={clocks!r} must be an int in [1, {MAX_CLOCKS}]")

    def init(params):
        inner = tx.init(params)
        n = len(counted_states(inner, params))
        clock = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.int8), params)
        return EntryClockState(inner, clock, jnp.zeros((clocks, n), jnp.int32))

    def update(updates, state, params=None):
        if not isinstance(state, EntryClockState) or state.start.shape[0] != clocks:
            got = (f"start of shape {state.start.shape}" if isinstance(state, EntryClockState)
                   else type(state).__name__)
            raise ValueError(f"entry_clocks({clocks}) got an optimizer state with {got}; "
                             f"rebuild the transformation with the state's clock count")
        pdef = jax.tree.structure(updates)
        out, new_inner = tx.update(updates, state.inner, params)
        for g in range(1, clocks):
            shifted = _shift_counts(state.inner, pdef, state.start[g])
            upd_g, _ = tx.update(updates, shifted, params)
            out = jax.tree.map(lambda c, u, a, g=g: jnp.where(c == g, u, a), state.clock,
                               upd_g, out)
        return out, state._replace(inner=new_inner)

    wrapped = ClockedTransformation(init, update)
    wrapped.inner = tx
    wrapped.clocks = clocks
    return wrapped


def check_tx(tx, opt_state) -> None:
    """Raise unless ``tx`` can update ``opt_state`` as far as entry clocks go."""
    if isinstance(opt_state, EntryClockState):
        G = int(opt_state.start.shape[0])
        if not (isinstance(tx, ClockedTransformation) and tx.clocks == G):
            raise ValueError(f"the optimizer state has {G} entry clocks but the state's tx is "
                             f"{type(tx).__name__} with "
                             f"{getattr(tx, 'clocks', 'no')} clocks; use entry_clocks(tx, {G}) "
                             f"as the state's tx")


def tx_for(tx, opt_state):
    """``tx`` wrapped (or re-wrapped) with as many clocks as ``opt_state`` has; unchanged when
    ``opt_state`` has no clocks or ``tx`` already matches."""
    if not isinstance(opt_state, EntryClockState):
        return tx
    G = int(opt_state.start.shape[0])
    if isinstance(tx, ClockedTransformation):
        if tx.clocks == G:
            return tx
        tx = tx.inner
    return entry_clocks(tx, G)


def resize_flag(flag, shape: tuple[int, ...], axes: tuple[str, ...], plan: AxisPlan):
    """Grow a bool "fresh moments" flag: copies keep theirs, new entries True (None: all
    False, kept None while nothing is new)."""
    if not plan.is_new.any():
        return None if flag is None else _take(flag, plan, axes.index(plan.axis))
    ax = axes.index(plan.axis)
    new = _along(plan.is_new, ax, len(shape))
    if flag is None:
        return jnp.broadcast_to(new, shape)
    return _take(flag, plan, ax) | new


def resize_clock(clock, axes: tuple[str, ...], plan: AxisPlan):
    """Grow an int8 clock array: copies keep their clock (new entries are set by ``grow``)."""
    return _take(clock, plan, axes.index(plan.axis))


def _params_like(params):
    pdef = jax.tree.structure(params)
    return lambda x: jax.tree.structure(x) == pdef


def is_second_moment(path) -> bool:
    """True for optax's second-moment field (``nu``) anywhere on the path."""
    return any(getattr(k, "name", None) == "nu" for k in path)


def collect_moments(opt_state, params) -> dict[str, tuple[bool, dict]]:
    """{keystr(opt path): (is_second, {param path: array})} for each params-like subtree."""
    out: dict[str, tuple[bool, dict]] = {}
    if opt_state is None:
        return out
    like = _params_like(params)

    def visit(path, sub):
        if like(sub):
            flat = {p: v[...] for p, v in flatten(sub).items()}
            out[jax.tree_util.keystr(path)] = (is_second_moment(path), flat)
        return sub

    jax.tree_util.tree_map_with_path(visit, opt_state, is_leaf=like)
    return out


def rebuild_opt_state(opt_state, params, grown: dict[str, tuple[bool, dict]], template):
    """``opt_state`` with each params-like subtree replaced by ``template`` (the grown params'
    structure) holding the grown moments from ``grown``."""
    if opt_state is None:
        return None
    like = _params_like(params)

    def visit(path, sub):
        if like(sub):
            moments = grown[jax.tree_util.keystr(path)][1]
            return rebuild(template, lambda p, v: moments[p])
        return sub

    return jax.tree_util.tree_map_with_path(visit, opt_state, is_leaf=like)



def split_clocks(opt_state):
    """(inner optax state, clock tree or None, start or None) of a possibly clocked state."""
    if isinstance(opt_state, EntryClockState):
        return opt_state.inner, opt_state.clock, opt_state.start
    return opt_state, None, None


def attach_clocks(inner, template, fresh: dict, clocks: dict | None, start):
    """The grown optimizer state: ``inner`` (grown moments) with per-entry clocks.

    Args:
      inner: the grown optax state (moments shaped like ``template``).
      template: the grown params' structure.
      fresh: {param path: bool array (broadcastable) or None}: entries whose moments the growth
        started at zero.
      clocks, start: the source's clock arrays by path (grown like the moments) and starts, or
        None when the source had no clocks.
    Returns:
      ``inner`` unchanged when nothing is fresh (or the optimizer counts nothing) and the source
      had no clocks; otherwise an ``EntryClockState`` whose fresh entries follow a new clock
      started at the current counts.
    """
    if inner is None:
        return None
    counts = [c.count for c in counted_states(inner, template)]
    new_clock = bool(counts) and any(f is not None for f in fresh.values())
    if start is None and not new_clock:
        return inner
    G = 1 if start is None else int(start.shape[0])
    if start is None:
        start = jnp.zeros((1, len(counts)), jnp.int32)
    if new_clock:
        if G + 1 > MAX_CLOCKS:
            raise ValueError(f"growth would give the optimizer {G + 1} entry clocks; at most "
                             f"{MAX_CLOCKS} are supported")
        row = jnp.stack([jnp.asarray(c, jnp.int32) for c in counts])[None]
        start = jnp.concatenate([start, row], axis=0)

    def clock_of(path, v):
        c = (jnp.zeros((), jnp.int8) if clocks is None or clocks.get(path) is None
             else clocks[path].astype(jnp.int8))
        if new_clock and fresh.get(path) is not None:
            c = jnp.where(fresh[path], jnp.asarray(G, jnp.int8), c)
        return jnp.broadcast_to(c, v.shape)

    return EntryClockState(inner, rebuild(template, clock_of), start)
