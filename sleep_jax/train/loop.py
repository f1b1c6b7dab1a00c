"""The one run loop: any ``step(state, batch, rng) -> (state, metrics)`` over a batch source.

``run_loop`` is what every host loop of the package runs on (``trainer.fit``, seeding's
``run_seeding``, ``rl.loop.train_rl``, the demo's base training): a tqdm progress bar, step time
and the first step's compile time, an eval callback, and with a ``workdir``
  metrics.jsonl   one JSON object per logged step (after a resume, lines past the restored step
                  are dropped first, so no step appears twice);
  tb/             TensorBoard events (tensorboardX, no TensorFlow);
  train/          orbax checkpoints (``sleep_jax.checkpoint``): state, RNG key, the batch
                  source's position (a grain iterator as grain's own item, any other source's
                  ``get_state()`` as JSON in ``meta``), the skip counters.
With many processes, process 0 alone writes metrics.jsonl and tb/ and shows the bar; every
process saves the checkpoints (orbax writes each process's shards). Re-running with the same
workdir resumes from the newest checkpoint and reproduces the uninterrupted run exactly:
per-step keys are ``jax.random.fold_in(rng, step)`` (step counted from 0), the source
continues where it stood. SIGTERM saves a checkpoint and returns cleanly.

Device reads happen only at read points: log steps (every ``log_every``), eval steps,
checkpoint steps, the last step and a SIGTERM. Between them metrics stay on the device; at a
read point the pending steps' ``skipped`` flags and the current step's metrics come to the host
in one ``runtime.host_read``. The first step is waited for (not read) to time the compilation.
Step times between read points are the window's wall time spread evenly over its steps.

A step that guards against non-finite values reports ``metrics["skipped"]`` (> 0: its update was
not applied). After ``max_consecutive_skips`` skipped steps in a row the loop stops without
saving (noticed at the next read point), so the newest checkpoint is the last good one; no
periodic checkpoint is written inside a run of skipped steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Length and cadence of a run.

    steps: total steps (a resumed run continues up to it).
    log_every: read metrics from the device and write a record every this many steps (the last
      step, eval steps and a stop are always recorded).
    eval_every: run ``eval_fn`` every this many steps (0: only at the end).
    checkpoint_every: save every this many steps (0: only at the end and on SIGTERM).
    keep_checkpoints, async_checkpoints: orbax manager options.
    max_consecutive_skips: stop after this many skipped steps in a row (0: never stop).
    progress_bar: show a tqdm bar.
    seed: the base key when ``run_loop`` gets ``rng=None``.
    tensorboard: also write TensorBoard events (with a workdir).
    """

    steps: int
    log_every: int = 1
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    max_consecutive_skips: int = 5
    progress_bar: bool = True
    seed: int = 0
    tensorboard: bool = True


@dataclasses.dataclass
class LoopResult:
    """How ``run_loop`` ended: status is "done", "preempted" (SIGTERM) or "nonfinite".

    history: the host records of this call (log steps, eval steps, the last step);
    times: wall seconds of each step of this call (the first includes compilation).
    """

    state: Any
    step: int
    status: str
    message: str
    history: list[dict]
    times: list[float]

    @property
    def compile_s(self) -> float:
        """Wall time of this call's first step (compilation included); 0 when none ran."""
        return float(self.times[0]) if self.times else 0.0

    @property
    def step_s(self) -> float:
        """Typical step time: median after the first two steps (mean for short runs)."""
        return typical_step_s(self.times)


def typical_step_s(times) -> float:
    """Median step time after the first two steps (the mean for short runs; 0 for none)."""
    if len(times) > 3:
        return float(np.median(times[2:]))
    return float(np.mean(times)) if len(times) else 0.0


# ------------------------------------------------------------------------------------ sources


class Source(Protocol):
    """A batch source: ``next(state, step) -> batch`` (host work allowed); for exact resume
    also ``get_state() -> JSON-able`` and ``set_state(s)``."""

    def next(self, state, step: int): ...


def _is_grain_iterator(it) -> bool:
    return (type(it).__module__.startswith("grain") and hasattr(it, "get_state")
            and hasattr(it, "set_state"))


class IteratorSource:
    """Batches from an iterator. A grain DatasetIterator keeps its position through
    checkpoints (saved as grain's own checkpoint item); another iterator with
    ``get_state``/``set_state`` (JSON-able) is saved in the checkpoint's meta; a plain iterator
    is not resumable (on resume it continues from wherever it stands, and the loop says so)."""

    def __init__(self, it):
        self.it = it
        self.grain_iterator = it if _is_grain_iterator(it) else None
        self.resumable = hasattr(it, "get_state") and hasattr(it, "set_state")

    def next(self, state, step: int):
        return next(self.it)

    def get_state(self):
        return self.it.get_state() if self.resumable else None

    def set_state(self, s) -> None:
        if self.resumable:
            self.it.set_state(s)


class RngSource:
    """Batches ``fn(np_rng)`` from a numpy Generator; its ``bit_generator.state`` is the
    position, so a resumed run draws the same batches. Given a Generator, it is used as is
    (the same batch sequence as calling ``fn`` on it directly); given an int, a fresh
    ``np.random.default_rng(seed)``."""

    def __init__(self, fn: Callable[[np.random.Generator], Any],
                 seed_or_generator: int | np.random.Generator):
        self.fn = fn
        g = seed_or_generator
        self.rng = g if isinstance(g, np.random.Generator) else np.random.default_rng(g)

    def next(self, state, step: int):
        return self.fn(self.rng)

    def get_state(self):
        return self.rng.bit_generator.state

    def set_state(self, s) -> None:
        self.rng.bit_generator.state = s


def as_source(source):
    """A source as is; a bare iterator wrapped in ``IteratorSource``."""
    if hasattr(source, "next") and callable(source.next):
        return source
    if hasattr(source, "__next__"):
        return IteratorSource(source)
    raise TypeError(f"a batch source needs next(state, step) (or is an iterator); got "
                    f"{type(source).__name__}")


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


class MetricsWriter:
    """metrics.jsonl lines (flushed each record) plus TensorBoard scalars under ``tag/``."""

    def __init__(self, workdir: str, start_step: int, tensorboard: bool = True,
                 tag: str = "train"):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tb") if tensorboard else None
        self.tag = tag
        truncate_metrics(self.path, start_step)
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step hides events a killed run wrote past the restored step.
            self._tb = SummaryWriter(self.tb_dir, purge_step=start_step + 1)

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{self.tag}/{k}", v, rec["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _host(v):
    """A fetched metric as a Python scalar (0-d) or nested list."""
    if isinstance(v, (int, float, bool, str)) or v is None:
        return v
    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()


# ------------------------------------------------------------------------------------ signals


class Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (main thread only).

    With many processes the processes must stop at one step: jax's preemption sync manager
    (started by jax.distributed) takes the SIGTERM notice, spreads it to every process and
    names the step where all of them save (``multihost_utils.reached_preemption_sync_point``);
    no Python handler is installed then.
    """

    def __init__(self, enabled: bool = True):
        self.requested = False
        self._enabled = enabled
        self._multi = enabled and jax.process_count() > 1
        self._prev = None

    def __enter__(self):
        if self._enabled and not self._multi and \
                threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, step: int) -> bool:
        """True when the run should save and stop after ``step`` (every process alike)."""
        if self._multi:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


# ------------------------------------------------------------------------------------ loop


def _wait(metrics) -> None:
    jax.block_until_ready([x for x in jax.tree.leaves(metrics) if isinstance(x, jax.Array)])


def _postfix(rec: dict, step_s: float) -> dict:
    out = {k: f"{rec[k]:.4g}" for k in ("loss", "divergence", "reward_mean", "eval_loss")
           if isinstance(rec.get(k), (int, float))}
    out["ms/step"] = f"{1e3 * step_s:.1f}"
    return out


def _duration(seconds: float) -> str:
    """'42 s', '3.5 min' or '1.2 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def run_loop(step: Callable, state, source, *, cfg: LoopConfig, rng=None,
             workdir: str | None = None, eval_fn: Callable[[int, Any], dict] | None = None,
             desc: str = "train", log_fn: Callable[[dict], None] | None = None,
             record_fn: Callable[[dict], dict] | None = None) -> LoopResult:
    """Run ``step`` until ``cfg.steps`` steps are done, resuming from ``workdir`` when possible.

    Args:
      step: ``step(state, batch, rng) -> (state, metrics)``; metrics a dict of device scalars
        (or host numbers); ``metrics["skipped"]`` > 0 marks a skipped (non-finite) update.
      state: the initial state (any pytree of arrays; also the restore target's structure and
        shardings).
      source: ``next(state, step) -> batch`` (``IteratorSource``, ``RngSource``, or an iterator,
        which is wrapped in ``IteratorSource``).
      cfg: a LoopConfig.
      rng: the base key (typed or raw uint32); step i gets ``fold_in(rng, i)``. None: from
        ``cfg.seed`` (raw key data, as ``fit`` always had).
      workdir: run folder (metrics.jsonl, tb/, train/); None writes nothing (no checkpoints,
        no metrics, no SIGTERM handler).
      eval_fn: ``eval_fn(step, state) -> {name: float}`` every ``cfg.eval_every`` steps and at
        the end; its results join that step's record.
      desc: progress-bar label and message prefix.
      log_fn: called with each record after it is written (e.g. to inject faults in tests).
      record_fn: ``record_fn(record) -> record``: host fields derived from a record before it
        is written (``fit`` adds the learning rate).
    Returns:
      LoopResult(state, step, status, message, history, times).
    """
    from sleep_jax.checkpoint import Checkpointer
    from sleep_jax.runtime import host_read, is_writer

    source = as_source(source)
    if rng is None:
        rng = jax.random.key_data(jax.random.key(cfg.seed))
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    grain_it = getattr(source, "grain_iterator", None)
    json_state = grain_it is None and callable(getattr(source, "get_state", None))
    meta = {"skipped_total": 0, "consecutive_skips": 0}
    n = 0
    ckpt = writer = None
    last_saved = None
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        ckpt = Checkpointer(os.path.join(workdir, "train"), max_to_keep=cfg.keep_checkpoints,
                            async_save=cfg.async_checkpoints)
        if ckpt.latest_step() is not None:
            r = ckpt.restore(state, data_iter=grain_it)
            state, n = r.state, r.step
            rng = jax.random.wrap_key_data(r.rng, impl=jax.random.key_impl(rng)) if typed \
                else r.rng
            saved_source = r.meta.pop("source", None)
            meta.update(r.meta)
            last_saved = n
            if grain_it is None:
                if json_state and saved_source is not None and \
                        getattr(source, "resumable", True):
                    source.set_state(saved_source)
                else:
                    log.warning("%s: resuming at step %d, but the batch source (%s) does not "
                                "keep its position: batches continue from wherever it stands",
                                desc, n, type(getattr(source, "it", source)).__name__)
            log.info("%s: resumed from %s at step %d", desc, ckpt.directory, n)
        if is_writer():  # one process writes the files; all of them save checkpoints
            writer = MetricsWriter(workdir, n, cfg.tensorboard)
    start = n
    history: list[dict] = []
    times: list[float] = []
    status, message = "done", ""
    bar = None
    if cfg.progress_bar and is_writer():
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=n, desc=desc, dynamic_ncols=True, mininterval=1,
                   leave=False)
    every = lambda k: k > 0 and n % k == 0
    pending_skips: list = []  # device "skipped" flags since the last read point
    window = 0  # steps since the last read point (after the first step)
    t_run = t_win = time.perf_counter()
    stop_run = 0
    estimated = False
    try:
        with Preemption(enabled=ckpt is not None) as pre:
            while n < cfg.steps:
                batch = source.next(state, n)
                state, m = step(state, batch, jax.random.fold_in(rng, n))
                n += 1
                if "skipped" in m:
                    pending_skips.append(m["skipped"])
                if bar is not None:
                    bar.update(1)
                if n == start + 1:  # the first step in full: compile + run (a wait, no read)
                    _wait(m)
                    now = time.perf_counter()
                    times.append(now - t_win)
                    t_win = now
                else:
                    window += 1
                preempt = pre.check(n)
                last = n == cfg.steps
                do_eval = eval_fn is not None and (every(cfg.eval_every) or last)
                periodic = ckpt is not None and (every(cfg.checkpoint_every) or last)
                do_record = every(max(cfg.log_every, 1)) or last or do_eval
                if not (do_record or periodic or preempt):
                    continue
                # ---- read point: one transfer for the pending flags and this step's metrics
                host = host_read({"skips": pending_skips, "m": m})
                pending_skips = []
                now = time.perf_counter()
                if window:
                    times.extend([(now - t_win) / window] * window)
                    window = 0
                for s in host["skips"]:
                    s = int(s)
                    meta["skipped_total"] += s
                    meta["consecutive_skips"] = meta["consecutive_skips"] + 1 if s else 0
                    if cfg.max_consecutive_skips > 0 and not stop_run and \
                            meta["consecutive_skips"] >= cfg.max_consecutive_skips:
                        stop_run = meta["consecutive_skips"]
                if not estimated and len(times) >= 2 and n < cfg.steps and is_writer():
                    estimated = True  # the first steady step time: say how long the rest is
                    left = (cfg.steps - n) * times[-1]
                    log.info("%s: step %d/%d; %.2f s per step after %.1f s for the first "
                             "(compilation): the remaining %d steps take about %s (without "
                             "evaluations and checkpoints)", desc, n, cfg.steps, times[-1],
                             times[0], cfg.steps - n, _duration(left))
                if do_record or stop_run:
                    rec = {"step": n, **{k: _host(v) for k, v in host["m"].items()}}
                    if "skipped" in host["m"]:
                        rec["skipped_total"] = meta["skipped_total"]
                    rec["step_time_s"] = round(times[-1], 6)
                    if do_eval:
                        rec.update({k: _host(v) for k, v in eval_fn(n, state).items()})
                    if record_fn is not None:
                        rec = record_fn(rec)
                    if writer is not None:
                        writer.write(rec)
                    history.append(rec)
                    if log_fn is not None:
                        log_fn(rec)
                    if bar is not None:
                        bar.set_postfix(_postfix(rec, times[-1]), refresh=False)
                if stop_run:
                    status = "nonfinite"
                    where = (f"the last good checkpoint is step {last_saved} in {ckpt.directory}"
                             if ckpt is not None else "no checkpoint (no workdir)")
                    message = (f"{desc}: stopped at step {n}: "
                               f"{max(stop_run, meta['consecutive_skips'])} consecutive steps "
                               f"had a non-finite loss or gradient norm (updates skipped); "
                               f"{where}. Lower the learning rate (optim.lr), raise the "
                               f"clipping protection (optim.clip_norm) or check the data "
                               f"before resuming.")
                    break
                # No periodic save inside a run of skipped steps: the newest checkpoint then
                # always ends on an applied update (the "last good" one).
                if ckpt is not None and (preempt or (periodic
                                                     and meta["consecutive_skips"] == 0)):
                    saved_meta = dict(meta)
                    if json_state:
                        saved_meta["source"] = source.get_state()
                    ckpt.save(n, state, rng=rng, data_iter=grain_it, meta=saved_meta)
                    last_saved = n
                if preempt:
                    ckpt.wait()
                    status = "preempted"
                    message = (f"{desc}: SIGTERM: saved a checkpoint at step {n} in "
                               f"{ckpt.directory}; re-run the same command to resume")
                    break
                t_win = time.perf_counter()  # evals, saves and callbacks are not step time
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if ckpt is not None:
            ckpt.close()
    if status == "done":
        ran = n - start
        timing = "nothing left to run"
        if ran:
            timing = (f"{ran} steps in {time.perf_counter() - t_run:.1f} s, compile "
                      f"{times[0]:.2f} s, {1e3 * typical_step_s(times):.1f} ms/step")
        if workdir is None:
            where = "nothing written (no workdir)"
        elif writer is None:
            where = f"checkpoints {ckpt.directory} (newest step {last_saved}); process 0 " \
                    f"writes the metrics"
        else:
            where = (f"metrics {writer.path}"
                     + (f", TensorBoard {writer.tb_dir}" if writer.tb_dir else "")
                     + f", checkpoints {ckpt.directory} (newest step {last_saved})")
        message = f"{desc}: trained to step {n} ({timing}); {where}"
    (log.warning if status != "done" else log.info)(message)
    return LoopResult(state=state, step=n, status=status, message=message, history=history,
                      times=times)
