"""The run loop: exact resume (RngSource, grain IteratorSource), SIGTERM, reads only at read
points, eval cadence, the skip stop. A toy jitted step on a dict state keeps it cheap."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.checkpoint import Checkpointer
from sleep_jax.train import loop as loop_mod
from sleep_jax.train.loop import IteratorSource, LoopConfig, RngSource, read_metrics, run_loop

D = 4


@jax.jit
def _step(state, batch, key):
    noise = jax.random.normal(key, (D,))
    w = state["w"] * 0.9 + jnp.mean(batch, 0) + 0.01 * noise
    return {"w": w, "n": state["n"] + 1}, {"loss": jnp.sum(w * w),
                                           "skipped": jnp.int32(0)}


def _state():
    return {"w": jnp.zeros(D), "n": jnp.zeros((), jnp.int32)}


def _rng_batch(g: np.random.Generator):
    return g.normal(size=(3, D)).astype(np.float32)


def _grain_iter():
    rows = np.random.default_rng(5).normal(size=(10, D)).astype(np.float32)
    ds = (grain.MapDataset.range(10).shuffle(seed=1).repeat(None).map(lambda i: rows[i])
          .batch(3, drop_remainder=True))
    # no reader threads: the same iterator state, far cheaper on a busy 2-core host
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


class _Stop(Exception):
    pass


def _kill_at(k):
    """A log_fn that dies right after step k's record is written (a crash mid-run)."""
    def f(rec):
        if rec["step"] == k:
            raise _Stop
    return f


def _strip(recs):
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in recs]


def _same(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        assert np.array_equal(x, y)


CFG = LoopConfig(steps=10, checkpoint_every=3, progress_bar=False, tensorboard=False,
                 async_checkpoints=False)


@pytest.mark.parametrize("kind", ["rng", "grain"])
def test_crash_then_resume_is_bitwise_identical(tmp_path, kind):
    make = ((lambda: RngSource(_rng_batch, 7)) if kind == "rng"
            else (lambda: IteratorSource(_grain_iter())))
    key = jax.random.key(3) if kind == "rng" else jax.random.key_data(jax.random.key(3))
    full = run_loop(_step, _state(), make(), cfg=CFG, rng=key, workdir=str(tmp_path / "a"))
    assert full.status == "done" and full.step == 10 and len(full.times) == 10
    w = str(tmp_path / "b")
    with pytest.raises(_Stop):
        run_loop(_step, _state(), make(), cfg=CFG, rng=key, workdir=w, log_fn=_kill_at(7))
    assert [r["step"] for r in read_metrics(os.path.join(w, "metrics.jsonl"))] == list(
        range(1, 8))
    assert Checkpointer(os.path.join(w, "train")).latest_step() == 6
    res = run_loop(_step, _state(), make(), cfg=CFG, rng=key, workdir=w)
    assert res.status == "done" and res.step == 10 and [h["step"] for h in res.history] == [
        7, 8, 9, 10]
    _same(res.state, full.state)
    assert int(res.state["n"]) == 10
    a = read_metrics(str(tmp_path / "a" / "metrics.jsonl"))
    b = read_metrics(os.path.join(w, "metrics.jsonl"))
    assert _strip(a) == _strip(b) and len({r["loss"] for r in a}) == 10
    # a restart without the position would differ: the source's position matters here
    fresh = run_loop(_step, _state(), make(), cfg=CFG, rng=key, workdir=None)
    _same(fresh.state, full.state)
    assert "nothing written" in fresh.message


def test_rng_source_is_the_generators_own_sequence():
    g1, g2 = np.random.default_rng(11), np.random.default_rng(11)
    src = RngSource(_rng_batch, g1)
    for i in range(3):
        assert np.array_equal(src.next(None, i), _rng_batch(g2))
    s = src.get_state()
    nxt = src.next(None, 3)
    src.set_state(s)
    assert np.array_equal(src.next(None, 3), nxt)


def test_plain_iterator_resume_says_it_is_not_resumable(tmp_path, caplog):
    def batches():
        while True:
            yield np.ones((3, D), np.float32)

    cfg = LoopConfig(steps=4, checkpoint_every=2, progress_bar=False, tensorboard=False,
                     async_checkpoints=False)
    with pytest.raises(_Stop):
        run_loop(_step, _state(), batches(), cfg=cfg, workdir=str(tmp_path), log_fn=_kill_at(3))
    with caplog.at_level("WARNING", logger="sleep_jax.train.loop"):
        r = run_loop(_step, _state(), batches(), cfg=cfg, workdir=str(tmp_path))
    assert r.step == 4 and int(r.state["n"]) == 4
    warned = [m for m in caplog.messages if "does not keep its position" in m]
    assert len(warned) == 1


def test_sigterm_saves_and_the_rerun_finishes_the_same(tmp_path):
    ref = run_loop(_step, _state(), RngSource(_rng_batch, 2), cfg=CFG, workdir=None)

    def term(rec):
        if rec["step"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # noticed after the next step

    w = str(tmp_path)
    r = run_loop(_step, _state(), RngSource(_rng_batch, 2), cfg=CFG, workdir=w, log_fn=term)
    assert r.status == "preempted" and r.step == 5 and "re-run" in r.message
    assert Checkpointer(os.path.join(w, "train")).latest_step() == 5
    r2 = run_loop(_step, _state(), RngSource(_rng_batch, 2), cfg=CFG, workdir=w)
    assert r2.status == "done" and r2.history[0]["step"] == 6
    _same(r2.state, ref.state)
    assert "metrics " in r2.message and "checkpoints " in r2.message


def test_device_reads_only_at_read_points(monkeypatch):
    """log_every=4 over 10 steps: one device_get at steps 4, 8 and 10 (the last), nothing
    else; records only there; step times for every step."""
    calls = []
    real = jax.device_get
    monkeypatch.setattr(loop_mod.jax, "device_get", lambda x: calls.append(1) or real(x))
    cfg = LoopConfig(steps=10, log_every=4, progress_bar=False)
    r = run_loop(_step, _state(), RngSource(_rng_batch, 0), cfg=cfg)
    assert len(calls) == 3
    assert [h["step"] for h in r.history] == [4, 8, 10]
    assert len(r.times) == 10 and r.times[0] > 0
    ref = run_loop(_step, _state(), RngSource(_rng_batch, 0), cfg=LoopConfig(
        steps=10, progress_bar=False))
    assert [h["loss"] for h in ref.history if h["step"] in (4, 8, 10)] == [
        h["loss"] for h in r.history]


def test_eval_cadence_and_records():
    seen = []

    def ev(step, state):
        seen.append(step)
        return {"eval_n": int(state["n"])}

    cfg = LoopConfig(steps=10, log_every=5, eval_every=3, progress_bar=False)
    r = run_loop(_step, _state(), RngSource(_rng_batch, 0), cfg=cfg, eval_fn=ev)
    assert seen == [3, 6, 9, 10]
    assert [h["step"] for h in r.history] == [3, 5, 6, 9, 10]
    assert [h.get("eval_n") for h in r.history] == [3, None, 6, 9, 10]


def test_the_loop_says_once_how_long_the_remaining_steps_take(caplog):
    import logging
    import re

    cfg = LoopConfig(steps=10, log_every=3, progress_bar=False)
    with caplog.at_level(logging.INFO, logger="sleep_jax.train.loop"):
        r = run_loop(_step, _state(), RngSource(_rng_batch, 0), cfg=cfg, desc="unit")
    said = [m for m in caplog.messages if "remaining" in m]
    assert len(said) == 1, caplog.messages
    # the first read point after a timed step (step 3): 7 steps left at its step time
    m = re.search(r"unit: step 3/10; ([0-9.]+) s per step .* the remaining 7 steps take about "
                  r"([0-9.]+) (s|min)", said[0])
    assert m, said[0]
    assert float(m.group(1)) == pytest.approx(r.times[1], abs=0.006)


@jax.jit
def _bad_step(state, batch, key):
    bad = state["n"] >= 2  # steps 3.. are "non-finite"
    new, m = _step(state, batch, key)
    new = {"w": jnp.where(bad, state["w"], new["w"]), "n": new["n"]}
    return new, {**m, "skipped": bad.astype(jnp.int32)}


@pytest.mark.parametrize("log_every,stop_at", [(1, 5), (4, 6)])
def test_consecutive_skips_stop(tmp_path, log_every, stop_at):
    """Steps 3.. skip; 3 in a row reach the limit at step 5, seen at the next read point (a log
    or checkpoint step: 6 with log_every=4 and checkpoint_every=2); the
    periodic save at step 4 is not written (inside the run of skips)."""
    cfg = LoopConfig(steps=20, log_every=log_every, checkpoint_every=2, max_consecutive_skips=3,
                     progress_bar=False, tensorboard=False, async_checkpoints=False)
    r = run_loop(_bad_step, _state(), RngSource(_rng_batch, 0), cfg=cfg, workdir=str(tmp_path))
    assert r.status == "nonfinite" and r.step == stop_at
    assert "consecutive steps had a non-finite" in r.message
    assert "last good checkpoint is step 2" in r.message
    assert r.history[-1]["skipped_total"] == stop_at - 2
    assert Checkpointer(str(tmp_path / "train")).all_steps() == [2]
