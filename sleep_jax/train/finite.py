"""One NaN/inf guard for every optimizer step (train, Knowledge Seeding, RL updates).

``skip_if_nonfinite`` is optax's ``apply_if_finite`` at the level of a whole ``TrainState``:
after a step has been computed, keep it only when the loss and the gradients are finite.
Written as a pure function of (new state, old state, loss, grads) so that any step that ends in
``apply_gradients`` can call it inside its jit:

    new = apply_gradients(state, grads, mask)
    state, skipped = skip_if_nonfinite(new, state, loss, grads)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def is_finite(loss, grads) -> jax.Array:
    """True when ``loss`` and the global norm of ``grads`` are finite (bool scalar).

    The global norm is inf or NaN exactly when some gradient entry is (or when the squares
    overflow fp32, which is a step worth skipping too).
    """
    return jnp.all(jnp.isfinite(loss)) & jnp.isfinite(optax.tree.norm(grads))


def skip_if_nonfinite(new_state, old_state, loss, grads):
    """Keep ``new_state`` only if ``loss`` and ``grads`` are finite.

    Args:
      new_state: the state after the optimizer step (``apply_gradients``).
      old_state: the state before it.
      loss: the step's loss (scalar, or any array: every entry must be finite).
      grads: the gradients the step applied (any pytree of arrays).
    Returns:
      (state, skipped): when finite, ``new_state`` and 0; otherwise ``old_state``'s params,
      other variables and optimizer state (bitwise: the optimizer's own step count inside
      ``opt_state``, hence the learning-rate schedule, does not advance) and 1 (int32). The
      ``step`` field is taken from ``new_state`` in both cases: it counts batches consumed,
      skipped ones included (the trainer's per-step keys and checkpoints follow it).
    """
    ok = is_finite(loss, grads)

    def keep(new, old):
        if new is old:  # untouched by the step (``apply_gradients`` leaves ``other`` as is)
            return new
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    state = new_state.replace(params=keep(new_state.params, old_state.params),
                              other=keep(new_state.other, old_state.other),
                              opt_state=keep(new_state.opt_state, old_state.opt_state))
    return state, (~ok).astype(jnp.int32)
