"""The train state: a pytree of model parameters, other model variables and optimizer state.

Pure-functional: ``TrainState`` holds the NNX graph definition (static) and ``nnx.State`` trees
whose leaves are ``nnx.Variable``s, so logical axis names travel with the arrays (growth and
sharding read them). ``state.model()`` rebuilds the NNX module for a forward pass.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    graphdef: Any = struct.field(pytree_node=False)
    params: nnx.State  # trainable nnx.Param variables
    other: nnx.State  # all other variables (e.g. SlotMask), not trained
    opt_state: Any
    step: jax.Array  # int32 scalar
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.other)


def split_model(model: nnx.Module):
    """(graphdef, params, other) with params the nnx.Param variables."""
    return nnx.split(model, nnx.Param, ...)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> TrainState:
    """Initial train state (step 0) for ``model`` and the optax transformation ``tx``."""
    graphdef, params, other = split_model(model)
    return TrainState(graphdef=graphdef, params=params, other=other, opt_state=tx.init(params),
                      step=jnp.zeros((), jnp.int32), tx=tx)


def _where_tree(mask, new, old):
    return jax.tree.map(lambda m, a, b: jnp.where(m, a, b), mask, new, old)


def apply_gradients(state: TrainState, grads, mask=None) -> TrainState:
    """One optimizer step; with ``mask`` only the masked-in entries (and their moments) move.

    Args:
      state: the train state.
      grads: gradients with the structure of ``state.params``.
      mask: None (train everything) or a pytree like ``state.params`` of boolean arrays that
        broadcast to each parameter (a scalar for a whole array, or an array for part of one).
        Masked-out entries of the parameters and of every optimizer leaf shaped like the
        parameters (Adam moments) stay bitwise unchanged, weight decay included, and their
        gradients are zeroed first so they do not count in global-norm clipping.
    """
    if mask is not None:
        mask = jax.tree.map(lambda m, p: jnp.broadcast_to(jnp.asarray(m, bool), p.shape),
                            mask, state.params)
        # Frozen entries' gradients must not count in global-norm clipping either.
        grads = jax.tree.map(lambda m, g: jnp.where(m, g, jnp.zeros((), g.dtype)), mask, grads)
    updates, new_opt = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    if mask is not None:
        new_params = _where_tree(mask, new_params, state.params)
        pdef = jax.tree.structure(state.params)
        is_params_like = lambda x: jax.tree.structure(x) == pdef
        new_opt = jax.tree.map(
            lambda n, o: _where_tree(mask, n, o) if is_params_like(n) else n,
            new_opt, state.opt_state, is_leaf=is_params_like)
    return state.replace(params=new_params, opt_state=new_opt, step=state.step + 1)


def train_state_shardings(state: TrainState, mesh: jax.sharding.Mesh, rules=None) -> TrainState:
    """A TrainState-shaped tree of NamedShardings for ``state`` (abstract or concrete) on ``mesh``.

    Parameters and other variables follow their logical axis names; every optimizer subtree
    shaped like the parameters (Adam moments) follows the parameters; the remaining optimizer
    leaves (counters) and ``step`` are replicated. Usable as ``in/out_shardings`` of ``jax.jit``.
    """
    from sleep_jax.mesh import RULES, tree_shardings

    rules = rules or RULES
    params_sh = tree_shardings(state.params, mesh, rules, strict=True)
    other_sh = tree_shardings(state.other, mesh, rules, strict=True)
    # moments are variables with the parameters' names and shapes; counters are replicated
    opt_sh = tree_shardings(state.opt_state, mesh, rules)
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return state.replace(params=params_sh, other=other_sh, opt_state=opt_sh, step=repl)


def abstract_train_state(model_factory, tx: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh | None = None, rules=None) -> TrainState:
    """The train state of ``model_factory()`` as ShapeDtypeStructs, with shardings on ``mesh``.

    Nothing is allocated; this is the restore target for a checkpoint onto any mesh.
    """
    abstract = jax.eval_shape(lambda: create_train_state(model_factory(), tx))
    if mesh is None:
        return abstract
    sh = train_state_shardings(abstract, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, sh)


def create_sharded_train_state(model_factory, tx: optax.GradientTransformation,
                               mesh: jax.sharding.Mesh, rules=None) -> TrainState:
    """``create_train_state(model_factory(), tx)`` with every array created on its shard."""
    abstract = jax.eval_shape(lambda: create_train_state(model_factory(), tx))
    sh = train_state_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh):
        return jax.jit(lambda: create_train_state(model_factory(), tx), out_shardings=sh)()


def fresh_copy(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with its own buffers.

    Train steps donate their state, and jit may hand back input buffers unchanged, so a model
    that will be trained must never share arrays with one that must survive (a frozen teacher).
    """
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
