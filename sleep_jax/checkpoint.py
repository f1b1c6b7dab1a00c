"""Exact training checkpoints: orbax CheckpointManager over train state, RNG, data and counters.

One step directory ``<dir>/<step>/`` holds four items:
  state  the TrainState arrays (params, other variables, optimizer state, step), StandardSave;
  rng    the base PRNG key data (uint32);
  data   the grain iterator state (grain.checkpoint.CheckpointSave), when an iterator is given;
  meta   host-side counters as JSON (e.g. skipped steps).
Saves are asynchronous (the device-to-host copy happens before ``save`` returns, so the caller may
donate the state right away), keep the newest ``max_to_keep``, and are atomic (a step directory
appears only when complete, so a killed process leaves the previous checkpoint usable).

Restoring takes a target tree: a concrete state or an abstract one (``jax.ShapeDtypeStruct``
leaves with ``NamedSharding``s, see ``sleep_jax.train.state.abstract_train_state``); the arrays
land directly on the target's shardings, so a checkpoint written on one mesh restores onto any
other.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


@dataclasses.dataclass
class Restored:
    """What ``Checkpointer.restore`` returns."""

    step: int
    state: Any
    rng: jax.Array  # uint32 key data [2]
    meta: dict


def abstract_like(tree) -> Any:
    """ShapeDtypeStructs (with the arrays' shardings) for a concrete or abstract tree."""
    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, tree)


class Checkpointer:
    """Save and restore full training checkpoints in ``directory`` (created if missing).

    Args:
      directory: the checkpoint root, e.g. ``<workdir>/train``.
      max_to_keep: newest checkpoints kept (older ones are deleted).
      async_save: write in a background thread.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                            enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, step: int, state, *, rng: jax.Array, data_iter=None,
             meta: dict | None = None, force: bool = True) -> bool:
        """Start saving ``state`` (any pytree of arrays) at ``step``; True if a save started.

        Args:
          step: the step number (directory name).
          state: the TrainState (or any pytree of jax arrays).
          rng: the base PRNG key (raw uint32 [2] or a typed key).
          data_iter: a grain DatasetIterator whose position is saved with the state.
          meta: JSON-serialisable host counters.
        """
        items = dict(state=ocp.args.StandardSave(state),
                     rng=ocp.args.StandardSave(np.asarray(_key_data(rng))),
                     meta=ocp.args.JsonSave(dict(meta or {})))
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self._mgr.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, target, step: int | None = None, *, data_iter=None) -> Restored:
        """Restore ``step`` (default latest) into the structure/shardings of ``target``.

        Args:
          target: a TrainState (concrete, or abstract with ShapeDtypeStruct(sharding=...) leaves).
          step: the step to restore; None for the latest.
          data_iter: a grain iterator whose position is set to the saved one (in place).
        Returns:
          Restored(step, state, rng, meta).
        Raises:
          FileNotFoundError: no checkpoint in the directory (or no such step).
        """
        steps = self.all_steps()
        if step is None:
            step = steps[-1] if steps else None
        if step is None or step not in steps:
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} "
                                    f"in {self.directory}; available steps: {steps or 'none'}")
        items = dict(state=ocp.args.StandardRestore(abstract_like(target)),
                     rng=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        return Restored(step=step, state=out["state"], rng=jax.numpy.asarray(out["rng"]),
                        meta=dict(out["meta"] or {}))

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def _key_data(rng: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return rng
