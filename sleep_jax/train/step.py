"""The sharded train step: exact gradient accumulation, trainable masks, a NaN/inf guard.

``make_train_step`` returns ``train_step(state, batch, rng) -> (state, metrics)``, jitted with
explicit in/out shardings on a mesh and the state donated. A batch is a dict of [B,T] arrays:
``inputs``, ``targets`` (int32), ``positions``, ``segment_ids`` (int), ``mask`` (bool, real
tokens) and ``loss_mask`` (bool, tokens that count in the loss).

Gradient accumulation (k micro-batches): a ``lax.scan`` sums (loss_sum, count, grad_sum) and
divides once, so the update equals the full-batch one up to float summation order:
g = (sum_j grad sum_{t in mb_j} nll_t) / (sum_j count_j).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sleep_jax.mesh import RULES, batch_sharding
from sleep_jax.train.finite import skip_if_nonfinite
from sleep_jax.train.loss import cross_entropy
from sleep_jax.train.state import TrainState, apply_gradients, train_state_shardings

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "mask", "loss_mask")

# loss_fn(model, batch, rng) -> (loss_sum, count): a plug-in point (distillation, tests).
LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, jax.Array]]


def lm_loss(model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy of ``model`` on ``batch`` as (sum over loss tokens, count).

    Args:
      model: a model following the sleep_jax protocol.
      batch: dict of [B,T] arrays (see module docstring).
      rng: unused (the Llama decoder has no dropout); kept for stochastic plug-ins.
    Returns:
      (sum of -log p(target) over loss_mask tokens, number of such tokens), fp32 scalars.
    """
    del rng
    logits_btv, _ = model(batch["inputs"], batch["positions"], mask=batch["mask"],
                          segment_ids=batch.get("segment_ids"))
    return cross_entropy(logits_btv, batch["targets"], batch["loss_mask"])


def _grads(graphdef, params, other, batch, rng, loss_fn, compose=None):
    # ``compose``: an AdapterState's full_params (the adapter written into its slot)
    def f(p):
        s, c = loss_fn(nnx.merge(graphdef, p if compose is None else compose(p), other),
                       batch, rng)
        return s, c

    (loss_sum, count), g = jax.value_and_grad(f, has_aux=True)(params)
    return loss_sum, count, g


def _split_micro(x, k: int):
    """[B,...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ...

    Strided rather than contiguous: each device's batch shard then splits evenly across the
    micro-batches, so the reshape needs no communication.
    """
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)


def _num_shards(sharding: NamedSharding) -> int:
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
    return int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1


def accumulate_gradients(state: TrainState, batch: dict, rng: jax.Array, micro_batches: int,
                         loss_fn: LossFn = lm_loss, micro_sharding=None):
    """(loss_sum, count, grad_sum) over ``micro_batches`` sequential micro-batches.

    Args:
      state: the train state.
      batch: dict of [B,T] arrays; B must divide by ``micro_batches``.
      rng: key passed to ``loss_fn`` (folded with the micro-batch index when k > 1).
      micro_batches: k.
      loss_fn: (model, batch, rng) -> (sum, count).
      micro_sharding: optional sharding for each [B/k, T] micro-batch array.
    Returns:
      (loss_sum, count, grads) with grads the gradient of loss_sum (not yet divided).
    """
    k = micro_batches
    compose = getattr(state, "full_params", None)  # an AdapterState trains its slot only
    if k == 1:
        return _grads(state.graphdef, state.params, state.other, batch, rng, loss_fn, compose)
    micro = {n: _split_micro(v, k) for n, v in batch.items()}
    zero = jax.tree.map(jnp.zeros_like, state.params)

    def body(carry, xs):
        i, mb = xs
        if micro_sharding is not None and mb["inputs"].shape[0] % _num_shards(micro_sharding) == 0:
            mb = {n: jax.lax.with_sharding_constraint(v, micro_sharding) for n, v in mb.items()}
        s, c, g = _grads(state.graphdef, state.params, state.other, mb,
                         jax.random.fold_in(rng, i), loss_fn, compose)
        ls, cs, gs = carry
        return (ls + s, cs + c, jax.tree.map(jnp.add, gs, g)), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zero)
    (ls, cs, gs), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
    return ls, cs, gs


def train_step_fn(state: TrainState, batch: dict, rng: jax.Array, mask=None, *,
                  micro_batches: int = 1, loss_fn: LossFn = lm_loss, micro_sharding=None
                  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (pure; ``make_train_step`` jits it with shardings).

    Args:
      state: the train state.
      batch: dict of [B,T] arrays.
      rng: this step's key (the trainer passes fold_in(key, step)).
      mask: None or a trainable mask like ``state.params`` (see ``apply_gradients``).
    Returns:
      (new state, metrics) with metrics loss (mean over loss tokens), tokens (count),
      grad_norm (before clipping), skipped (1 when the loss or gradient norm is not finite:
      then params, other variables and optimizer state are unchanged and only ``step``
      advances; ``finite.skip_if_nonfinite``).
    """
    loss_sum, count, grad_sum = accumulate_gradients(state, batch, rng, micro_batches, loss_fn,
                                                     micro_sharding)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    loss = loss_sum / denom
    gnorm = optax.tree.norm(grads)
    new, skipped = skip_if_nonfinite(apply_gradients(state, grads, mask), state, loss, grads)
    metrics = {"loss": loss, "tokens": count, "grad_norm": gnorm, "skipped": skipped}
    return new, metrics


def make_train_step(state: TrainState, mesh: Mesh, *, micro_batches: int = 1,
                    loss_fn: LossFn = lm_loss, mask=None, rules=RULES, donate: bool = True
                    ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """``train_step(state, batch, rng) -> (state, metrics)`` jitted on ``mesh``.

    Args:
      state: a train state (abstract or concrete) fixing the tree structure and shardings.
      mesh: the device mesh; the state follows its logical axis names, the batch is split over
        the ``batch`` rule (data x fsdp).
      micro_batches: k sequential micro-batches per step (exact accumulation).
      loss_fn: (model, batch, rng) -> (sum, count).
      mask: optional trainable mask like ``state.params`` (bool arrays broadcastable to each
        parameter, or Python bools); it is a jit argument, not a baked-in constant.
      donate: donate the input state's buffers.
    Returns:
      the step function; its jitted core is ``train_step.jitted`` (for ``_cache_size()``).
    """
    state_sh = (state.shardings(mesh, rules) if hasattr(state, "shardings")  # AdapterState
                else train_state_shardings(state, mesh, rules))
    data_sh = batch_sharding(mesh, 2, rules=rules)
    repl = NamedSharding(mesh, PartitionSpec())
    micro_sh = data_sh if micro_batches > 1 else None
    if mask is not None:
        mask = jax.tree.map(lambda m: jnp.asarray(m, bool), mask)
        mask = jax.device_put(mask, jax.tree.map(lambda _: repl, mask))

    def core(st, batch, rng, m):
        return train_step_fn(st, batch, rng, m, micro_batches=micro_batches, loss_fn=loss_fn,
                             micro_sharding=micro_sh)

    jitted = jax.jit(core, in_shardings=(state_sh, data_sh, repl, repl),
                     out_shardings=(state_sh, repl), donate_argnums=(0,) if donate else ())

    def train_step(st: TrainState, batch: dict, rng: jax.Array):
        # The step puts its inputs onto the mesh itself (a no-op for arrays already there): a
        # batch built on one device or replicated would not match the jit's in_shardings.
        batch = jax.device_put(_check_batch(batch, micro_batches), data_sh)
        with jax.set_mesh(mesh):  # activations constrain to the batch axes under the mesh
            return jitted(jax.device_put(st, state_sh), batch, rng, mask)

    train_step.jitted = jitted
    train_step.state_shardings = state_sh
    train_step.batch_sharding = data_sh
    return train_step


def make_eval_step(state: TrainState, mesh: Mesh, *, loss_fn: LossFn = lm_loss, rules=RULES
                   ) -> Callable[[TrainState, dict], tuple[jax.Array, jax.Array]]:
    """``eval_step(state, batch) -> (loss_sum, count)`` jitted on ``mesh`` (no donation)."""
    state_sh = (state.shardings(mesh, rules) if hasattr(state, "shardings")  # AdapterState
                else train_state_shardings(state, mesh, rules))
    data_sh = batch_sharding(mesh, 2, rules=rules)
    repl = NamedSharding(mesh, PartitionSpec())

    def core(st, batch):
        return loss_fn(st.model(), batch, jax.random.PRNGKey(0))

    jitted = jax.jit(core, in_shardings=(state_sh, data_sh), out_shardings=(repl, repl))

    def eval_step(st: TrainState, batch: dict):
        batch = jax.device_put(_check_batch(batch, 1), data_sh)
        with jax.set_mesh(mesh):
            return jitted(jax.device_put(st, state_sh), batch)

    eval_step.jitted = jitted
    return eval_step


def _check_batch(batch: dict[str, Any], micro_batches: int) -> dict:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; a batch has {list(BATCH_KEYS)} "
                         f"(got {sorted(batch)})")
    b = batch["inputs"].shape[0]
    if b % micro_batches:
        raise ValueError(f"batch size {b} is not divisible by micro_batches={micro_batches}")
    return {k: batch[k] for k in BATCH_KEYS}
