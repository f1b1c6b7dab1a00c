"""Slot adapters: the expert slot being trained, as its own small tree beside a frozen model.

The expert slots of a model are stacked leaves ([L, E, D, R], [L, E, R, D], and with a router
[L, E, D, 1], [L, E, 1]): one leaf holds every slot. Training one slot through a full-size
boolean mask over a full-model optimizer state costs Adam moments for every parameter and a
replicated mask; optax.masked / multi_transform / nnx.DiffState select whole leaves only, and
giving every slot its own leaf would change the trained tree at every sleep (a recompile).

Here the trained tree is fixed: the *adapter*, slot ``e`` of every slot leaf with the expert
axis removed ([L, D, R], [L, R, D], router [L, D, 1], [L, 1]). ``AdapterState`` carries it with
its own optimizer state, the frozen full parameters and the slot index ``e`` as an int32 array
(a traced value: training slot 1 runs the program compiled for slot 0). The forward pass uses
the frozen parameters with slot ``e`` replaced by the adapter
(``lax.dynamic_update_index_in_dim`` inside the loss), so gradients reach the adapter only and
equal the slot-``e`` entries of the full-model gradient; ``write_back`` puts the trained adapter
into slot ``e`` when the sleep ends.

``AdapterState`` has the fields and methods of ``sleep_jax.train.state.TrainState`` that the
train code reads (graphdef, params, other, opt_state, step, tx, model(), replace), so
``apply_gradients`` steps it unchanged, plus ``full_params(params)`` (the composition, for a
loss that differentiates through it) and ``shardings(mesh)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from sleep_jax.train.state import fresh_copy, split_model, train_state_shardings

SLOT_AXIS = "expert"


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _axes(v: nnx.Variable):
    names = v.get_metadata().get("logical_axes")
    return None if names is None else tuple(names)


def _is_slot_leaf(v) -> bool:
    axes = _axes(v) if _is_var(v) else None
    return axes is not None and "layers" in axes and SLOT_AXIS in axes


def _name(path) -> str:
    """A plain dotted name for a tree path (``blocks.expert_a``): a safe checkpoint key."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def slot_leaves(params) -> dict[str, nnx.Variable]:
    """{dotted name: Variable} of every stacked expert-slot parameter of ``params``."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)[0]
    out = {_name(p): v for p, v in leaves if _is_slot_leaf(v)}
    if not out:
        raise ValueError("the model has no expert slots (ModelConfig.expert_slots=0); grow "
                         "with expert_slots=E first")
    return out


def extract_adapter(params, slot) -> nnx.State:
    """Slot ``slot`` of every slot leaf, expert axis removed, as an ``nnx.State`` of Params.

    The logical axis names drop "expert" (e.g. ("layers", "embed", "expert_rank")), so the
    adapter shards like the slot it came from.
    """
    out = {}
    for name, v in slot_leaves(params).items():
        axes = _axes(v)
        ax = axes.index(SLOT_AXIS)
        x = jax.lax.dynamic_index_in_dim(v[...], slot, ax, keepdims=False)
        out[name] = nnx.Param(x, logical_axes=axes[:ax] + axes[ax + 1:])
    return nnx.State(out)


def insert_adapter(params, adapter, slot):
    """``params`` with slot ``slot`` of every slot leaf replaced by ``adapter`` (differentiable
    in ``adapter``; ``slot`` may be traced)."""
    def one(path, v):
        if not _is_var(v) or not _is_slot_leaf(v):
            return v
        a = adapter[_name(path)]
        ax = _axes(v).index(SLOT_AXIS)
        x = v[...]
        return v.replace(jax.lax.dynamic_update_index_in_dim(x, a[...].astype(x.dtype), slot,
                                                             ax))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_var)


@struct.dataclass
class AdapterState:
    """The train state of one expert slot trained as its own tree (see module docstring)."""

    graphdef: Any = struct.field(pytree_node=False)
    params: nnx.State  # the adapter: what trains (and all the optimizer state covers)
    frozen: nnx.State  # the full model's parameters; slot ``slot`` is overridden by ``params``
    other: nnx.State  # non-trainable variables (SlotMask)
    opt_state: Any
    step: jax.Array  # int32 scalar
    slot: jax.Array  # int32 scalar: the slot the adapter stands in for
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def full_params(self, params=None):
        """The full parameters with the adapter (``params``, default ``self.params``) in slot
        ``self.slot``."""
        return insert_adapter(self.frozen, self.params if params is None else params, self.slot)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.full_params(), self.other)

    def shardings(self, mesh: jax.sharding.Mesh, rules=None) -> AdapterState:
        """An AdapterState-shaped tree of NamedShardings on ``mesh`` (for jit in/out)."""
        from sleep_jax.mesh import RULES
        from sleep_jax.models.sharding import state_shardings

        sh = train_state_shardings(self, mesh, rules)
        repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return sh.replace(frozen=state_shardings(self.frozen, mesh, rules or RULES), slot=repl)


def create_adapter_state(model: nnx.Module, slot: int, tx: optax.GradientTransformation
                         ) -> AdapterState:
    """An AdapterState training slot ``slot`` of ``model`` (copied: the state owns its buffers).

    The adapter starts as the slot's current values (after ``activate_slot``: random A, B = 0);
    ``tx`` is initialised on the adapter only.
    """
    graphdef, params, other = split_model(fresh_copy(model))
    slot = jnp.asarray(slot, jnp.int32)
    adapter = extract_adapter(params, slot)
    return AdapterState(graphdef=graphdef, params=adapter, frozen=params, other=other,
                        opt_state=tx.init(adapter), step=jnp.zeros((), jnp.int32), slot=slot,
                        tx=tx)


def write_back(state: AdapterState) -> nnx.Module:
    """The model with the trained adapter written into its slot (the end of a sleep)."""
    return state.model()
