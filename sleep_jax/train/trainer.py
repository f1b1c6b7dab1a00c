"""LM training: ``fit`` runs the sharded train step on the run loop (``sleep_jax.train.loop``).

``fit`` drives ``train_step`` over a data iterator and writes to the run folder:
  metrics.jsonl   one JSON object per logged step (after a resume, lines past the restored step are
                  dropped first, so no step appears twice);
  tb/             TensorBoard events (tensorboardX, no TensorFlow);
  train/          orbax checkpoints (sleep_jax.checkpoint): state, RNG key, data position.
Re-running in the same folder resumes from the newest checkpoint and reproduces the
uninterrupted run exactly (same batches, same per-step keys fold_in(key, step)). SIGTERM saves a
checkpoint and returns cleanly. After ``max_consecutive_skips`` non-finite steps in a row the
loop stops without saving, so the newest checkpoint is the last good one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from sleep_jax.mesh import RULES
from sleep_jax.runtime import host_read
from sleep_jax.train.loop import (  # noqa: F401  (read_metrics, truncate_metrics: re-exported)
    IteratorSource,
    LoopConfig,
    read_metrics,
    run_loop,
    truncate_metrics,
)
from sleep_jax.train.optim import OptimConfig, lr_schedule
from sleep_jax.train.state import TrainState
from sleep_jax.train.step import LossFn, lm_loss, make_eval_step, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: sizes, cadence of logs/evals/checkpoints, the NaN guard."""

    steps: int = 200
    batch_size: int = 8  # global batch B (split into micro_batches sequential micro-batches)
    seq_len: int = 64  # T
    micro_batches: int = 1
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: no periodic eval
    eval_batches: int = 2
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    max_consecutive_skips: int = 5  # stop after this many non-finite steps in a row
    progress_bar: bool = True


@dataclasses.dataclass
class FitResult:
    """How ``fit`` ended: status is "done", "preempted" (SIGTERM) or "nonfinite"."""

    state: TrainState
    step: int
    status: str
    message: str
    history: list[dict]


# ------------------------------------------------------------------------------------ eval


def evaluate(eval_step, state: TrainState, batches: Sequence[dict]) -> float:
    """Mean loss over all loss tokens of ``batches`` (sum of sums / sum of counts)."""
    total, count = 0.0, 0.0
    for b in batches:
        s, c = host_read(eval_step(state, b))
        total += float(s)
        count += float(c)
    return total / max(count, 1.0)


# ------------------------------------------------------------------------------------ fit


def loop_config(train_cfg: TrainConfig) -> LoopConfig:
    """The run-loop settings of a TrainConfig."""
    return LoopConfig(steps=train_cfg.steps, log_every=train_cfg.log_every,
                      eval_every=train_cfg.eval_every,
                      checkpoint_every=train_cfg.checkpoint_every,
                      keep_checkpoints=train_cfg.keep_checkpoints,
                      async_checkpoints=train_cfg.async_checkpoints,
                      max_consecutive_skips=train_cfg.max_consecutive_skips,
                      progress_bar=train_cfg.progress_bar, seed=train_cfg.seed)


def fit(state: TrainState, data_iter: Iterator[dict], *, train_cfg: TrainConfig,
        optim_cfg: OptimConfig, mesh: jax.sharding.Mesh, workdir: str,
        loss_fn: LossFn = lm_loss, mask=None, eval_batches: Sequence[dict] | None = None,
        on_step: Callable[[dict], None] | None = None, tensorboard: bool = True,
        rules=None) -> FitResult:
    """Train ``state`` for ``train_cfg.steps`` steps, resuming from ``workdir`` when possible.

    Runs ``make_train_step`` on ``sleep_jax.train.loop.run_loop``.

    Args:
      state: the initial train state, sharded on ``mesh`` (also the restore target).
      data_iter: yields dict batches of [B,T] arrays; a grain DatasetIterator is checkpointed
        (its position restores on resume), any other iterator is not.
      train_cfg, optim_cfg: loop and optimizer settings (``optim_cfg`` only for the logged lr;
        ``state.tx`` must have been built from it).
      mesh: the device mesh.
      workdir: run folder (metrics.jsonl, tb/, train/).
      loss_fn: (model, batch, rng) -> (sum, count).
      mask: optional trainable mask (see ``apply_gradients``).
      eval_batches: fixed batches for the periodic eval (``train_cfg.eval_every`` > 0).
      on_step: called with each logged record, after it is written (tests inject faults).
    Returns:
      FitResult(state, step, status, message, history of this call's records).
    """
    rules = rules or RULES  # the logical-axis table the state was sharded with
    train_step = make_train_step(state, mesh, micro_batches=train_cfg.micro_batches, rules=rules,
                                 loss_fn=loss_fn, mask=mask)
    eval_fn = None
    if eval_batches and train_cfg.eval_every:
        eval_step = make_eval_step(state, mesh, loss_fn=loss_fn, rules=rules)
        eval_fn = lambda step, st: {"eval_loss": evaluate(eval_step, st, eval_batches)}
    schedule = lr_schedule(optim_cfg, train_cfg.steps)

    def record(r: dict) -> dict:
        # optimizer updates before this step (the lr index): skipped steps do not count
        applied = r["step"] - 1 - (r["skipped_total"] - r["skipped"])
        out = {"step": r["step"], "loss": float(r["loss"]), "grad_norm": float(r["grad_norm"]),
               "tokens": int(r["tokens"]), "lr": float(schedule(applied)),
               "skipped": int(r["skipped"]), "skipped_total": r["skipped_total"],
               "step_time_s": r["step_time_s"]}
        if "eval_loss" in r:
            out["eval_loss"] = r["eval_loss"]
        return out

    cfg = dataclasses.replace(loop_config(train_cfg), tensorboard=tensorboard)
    r = run_loop(train_step, state, IteratorSource(data_iter), cfg=cfg, workdir=workdir,
                 eval_fn=eval_fn, desc="train", log_fn=on_step, record_fn=record)
    return FitResult(state=r.state, step=r.step, status=r.status, message=r.message,
                     history=r.history)


def constant_batches(batches: Sequence[dict]) -> Iterator[dict]:
    """Cycle over fixed batches forever (memorisation tests, benchmarks)."""
    while True:
        yield from batches


def as_numpy_batch(batch: dict) -> dict:
    return {k: np.asarray(v) for k, v in batch.items()}
