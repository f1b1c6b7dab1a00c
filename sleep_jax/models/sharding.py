"""Logical axis names of any NNX model's variables -> shardings on a mesh; sharded creation.

Works for every model whose variables carry ``logical_axes`` metadata (ours and plug-ins), so
the same code runs on any mesh layout.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from sleep_jax.mesh import RULES, tree_shardings


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(tree) -> object:
    """Pytree of logical-axis tuples (None for a variable without names) mirroring ``tree``.

    ``tree`` is an NNX module or state whose leaves are ``nnx.Variable``s.
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), tree, is_leaf=_is_var)


def state_shardings(tree, mesh: Mesh, rules=RULES):
    """NamedSharding for every variable of an NNX module/state (abstract or concrete).

    ``sleep_jax.mesh.tree_shardings`` with ``strict=True``: variables without logical names are
    replicated, a variable whose names do not match its rank raises. Returns a state of the same
    structure whose leaves are NamedShardings (usable as ``out_shardings`` of ``jax.jit``).
    """
    return tree_shardings(tree, mesh, rules, strict=True)


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh, rules=RULES) -> nnx.Module:
    """Build ``factory()`` with every parameter created directly on its shard (no host copy).

    ``factory`` must be deterministic (e.g. ``lambda: Decoder(cfg, rngs=nnx.Rngs(0))``).
    """
    abstract = nnx.eval_shape(factory)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules)

    init = jax.jit(lambda: nnx.state(factory()), out_shardings=shardings)
    with jax.set_mesh(mesh):
        state = init()
    return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules=RULES) -> nnx.Module:
    """Move an existing model's variables onto ``mesh`` by their logical names (returns it)."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    nnx.update(model, state)
    return model
