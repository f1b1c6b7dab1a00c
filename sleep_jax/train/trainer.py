"""The training loop: steps, logs, evals, checkpoints, resume, preemption, the NaN stop.

``fit`` drives ``train_step`` over a data iterator and writes to the run folder:
  metrics.jsonl   one JSON object per step (after a resume, lines past the restored step are
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
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from sleep_jax.checkpoint import Checkpointer
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


# ------------------------------------------------------------------------------------ metrics


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl file (empty when missing)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop records with step > ``last_step`` (and a torn last line from a killed writer)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by SIGKILL: nothing after it can be trusted
            if rec.get("step", 0) <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class _MetricsWriter:
    """metrics.jsonl lines (flushed each step) plus TensorBoard scalars."""

    def __init__(self, workdir: str, start_step: int, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        truncate_metrics(self.path, start_step)
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step hides events a killed run wrote past the restored step.
            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1)

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


# ------------------------------------------------------------------------------------ signals


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.requested = False
        self._prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


# ------------------------------------------------------------------------------------ eval


def evaluate(eval_step, state: TrainState, batches: Sequence[dict]) -> float:
    """Mean loss over all loss tokens of ``batches`` (sum of sums / sum of counts)."""
    total, count = 0.0, 0.0
    for b in batches:
        s, c = eval_step(state, b)
        total += float(s)
        count += float(c)
    return total / max(count, 1.0)


# ------------------------------------------------------------------------------------ loop


def fit(state: TrainState, data_iter: Iterator[dict], *, train_cfg: TrainConfig,
        optim_cfg: OptimConfig, mesh: jax.sharding.Mesh, workdir: str,
        loss_fn: LossFn = lm_loss, mask=None, eval_batches: Sequence[dict] | None = None,
        on_step: Callable[[dict], None] | None = None, tensorboard: bool = True) -> FitResult:
    """Train ``state`` for ``train_cfg.steps`` steps, resuming from ``workdir`` when possible.

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
      on_step: called with each step's record (tests use it to inject faults).
    Returns:
      FitResult(state, step, status, message, history of this call's records).
    """
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, "train"), max_to_keep=train_cfg.keep_checkpoints,
                        async_save=train_cfg.async_checkpoints)
    grain_iter = data_iter if hasattr(data_iter, "get_state") else None
    rng = jax.random.key_data(jax.random.key(train_cfg.seed))
    meta = {"skipped_total": 0, "consecutive_skips": 0}
    step = 0
    if ckpt.latest_step() is not None:
        r = ckpt.restore(state, data_iter=grain_iter)
        state, rng, step = r.state, r.rng, r.step
        meta.update(r.meta)
        log.info("resumed from %s at step %d", ckpt.directory, step)
    train_step = make_train_step(state, mesh, micro_batches=train_cfg.micro_batches,
                                 loss_fn=loss_fn, mask=mask)
    eval_step = make_eval_step(state, mesh, loss_fn=loss_fn) if eval_batches else None
    schedule = lr_schedule(optim_cfg, train_cfg.steps)
    writer = _MetricsWriter(workdir, step, tensorboard)
    history: list[dict] = []
    status, message = "done", f"trained to step {train_cfg.steps}"
    bar = None
    if train_cfg.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=train_cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    last_saved = step if ckpt.latest_step() is not None else None
    try:
        with _Preemption() as pre:
            while step < train_cfg.steps:
                t0 = time.perf_counter()
                batch = next(data_iter)
                applied = step - meta["skipped_total"]  # optimizer updates so far (lr index)
                state, m = train_step(state, batch, jax.random.fold_in(rng, step))
                m = jax.device_get(m)
                step += 1
                skipped = int(m["skipped"])
                meta["skipped_total"] += skipped
                meta["consecutive_skips"] = meta["consecutive_skips"] + 1 if skipped else 0
                rec = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                       "tokens": int(m["tokens"]), "lr": float(schedule(applied)),
                       "skipped": skipped, "skipped_total": meta["skipped_total"],
                       "step_time_s": round(time.perf_counter() - t0, 6)}
                if eval_step is not None and train_cfg.eval_every and (
                        step % train_cfg.eval_every == 0 or step == train_cfg.steps):
                    rec["eval_loss"] = evaluate(eval_step, state, eval_batches)
                if step % max(train_cfg.log_every, 1) == 0 or step == train_cfg.steps:
                    writer.write(rec)
                history.append(rec)
                if on_step is not None:
                    on_step(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if meta["consecutive_skips"] >= train_cfg.max_consecutive_skips:
                    status = "nonfinite"
                    message = (f"stopped at step {step}: {meta['consecutive_skips']} consecutive "
                               f"steps had a non-finite loss or gradient norm (updates skipped); "
                               f"the last good checkpoint is step {last_saved} in "
                               f"{ckpt.directory}. Lower optim.lr, raise optim.clip_norm "
                               f"protection or check the data before resuming.")
                    break
                # No periodic save inside a run of skipped steps: the newest checkpoint then
                # always ends on an applied update (the "last good" one).
                periodic = (step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps)
                if pre.requested or (periodic and meta["consecutive_skips"] == 0):
                    ckpt.save(step, state, rng=rng, data_iter=grain_iter, meta=meta)
                    last_saved = step
                if pre.requested:
                    ckpt.wait()
                    status = "preempted"
                    message = (f"SIGTERM: saved a checkpoint at step {step} in {ckpt.directory};"
                               f" re-run the same command to resume")
                    break
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()
    (log.warning if status != "done" else log.info)(message)
    return FitResult(state=state, step=step, status=status, message=message, history=history)


def constant_batches(batches: Sequence[dict]) -> Iterator[dict]:
    """Cycle over fixed batches forever (memorisation tests, benchmarks)."""
    while True:
        yield from batches


def as_numpy_batch(batch: dict) -> dict:
    return {k: np.asarray(v) for k, v in batch.items()}
