"""Exact checkpoints: kill/resume reproduces the uninterrupted run, SIGTERM, cross-mesh restore."""

import json
import os
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from sleep_jax.checkpoint import Checkpointer
from sleep_jax.mesh import make_mesh
from sleep_jax.models import Decoder, get_preset
from sleep_jax.train.optim import OptimConfig, make_optimizer
from sleep_jax.train.state import abstract_train_state, create_sharded_train_state
from sleep_jax.train.step import make_eval_step, make_train_step
from sleep_jax.train.trainer import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "train_worker.py")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A persistent compilation cache shared by the worker subprocesses (works on CPU)."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def run_worker(workdir, steps, *extra, cache=None, check=True):
    cmd = [sys.executable, WORKER, str(workdir), str(steps), *extra]
    if cache:
        cmd += ["--cache", cache]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"worker failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, cache_dir):
    """SIGKILL right after step 7 is logged; the re-run's losses equal the uninterrupted run's.

    20 rows, batches of 8, shuffled and reshuffled each epoch: equal losses need the data
    position restored too (a restart from the first batch would give different losses).
    """
    full, broken = tmp_path / "full", tmp_path / "broken"
    out = run_worker(full, 10, cache=cache_dir)
    ref = json.loads(out.stdout.strip().splitlines()[-1])["losses"]
    killed = run_worker(broken, 10, "--kill-at", "7", cache=cache_dir, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [r["step"] for r in read_metrics(broken / "metrics.jsonl")] == list(range(1, 8))
    run_worker(broken, 10, cache=cache_dir)
    recs = read_metrics(broken / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 11))  # no duplicates after resume
    assert [r["loss"] for r in recs] == ref  # bitwise (JSON floats round-trip exactly)
    assert len(set(ref)) == 10


def test_sigterm_leaves_a_restorable_checkpoint(tmp_path, cache_dir):
    w = tmp_path / "run"
    cmd = [sys.executable, WORKER, str(w), "1000", "--sleep", "0.2", "--cache", cache_dir]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(read_metrics(w / "metrics.jsonl")) < 4 and time.time() < deadline:
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-2000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["status"] == "preempted" and 4 <= res["step"] < 1000
    ck = Checkpointer(str(w / "train"))
    assert ck.latest_step() == res["step"]
    cfg = get_preset("tiny", layers=1, vocab=64)
    tx = make_optimizer(OptimConfig(), 1000)  # the worker's structure: clip + AdamW
    target = abstract_train_state(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), tx, make_mesh("fsdp=8"))
    r = ck.restore(target)
    assert int(r.state.step) == res["step"] and r.meta["skipped_total"] == 0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(r.state.params)))


def _batch(seed, B=8, T=16, vocab=256):
    x = np.random.default_rng(seed).integers(0, vocab, (B, T + 1)).astype(np.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:],
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32), "mask": np.ones((B, T), bool),
            "loss_mask": np.ones((B, T), bool)}


def test_save_on_one_mesh_restore_on_others(tiny_cfg, tmp_path):
    """Saved on data=2,fsdp=4; restored on fsdp=4,tensor=2 and data=8: bitwise params."""
    tx = optax.adamw(1e-2)
    factory = lambda: Decoder(tiny_cfg, rngs=nnx.Rngs(0))
    mesh = make_mesh("data=2,fsdp=4")
    state = create_sharded_train_state(factory, tx, mesh)
    state, _ = make_train_step(state, mesh)(state, _batch(0), jax.random.PRNGKey(0))
    ev = _batch(1)
    ref_loss = [float(x) for x in make_eval_step(state, mesh)(state, ev)]
    ck = Checkpointer(str(tmp_path), async_save=False)
    ck.save(1, state, rng=jax.random.PRNGKey(7), meta={"note": "x"})
    ref = jax.device_get(state)
    for spec in ("fsdp=4,tensor=2", "data=8"):
        other = make_mesh(spec)
        r = ck.restore(abstract_train_state(factory, tx, other))
        got = jax.device_get(r.state)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            assert np.array_equal(a, b)
        q = r.state.params["blocks"]["q"][...]
        assert q.sharding.mesh.shape == other.shape
        s, c = make_eval_step(r.state, other)(r.state, ev)
        np.testing.assert_allclose([float(s), float(c)], ref_loss, rtol=1e-5)
        assert np.array_equal(r.rng, jax.random.PRNGKey(7)) and r.meta == {"note": "x"}
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 5 .*steps: \[1\]"):
        ck.restore(state, step=5)
    ck.close()


def test_data_iterator_position_restores(tmp_path):
    ds = grain.MapDataset.range(10).shuffle(seed=3).repeat(None).batch(4)
    it = iter(ds)
    for _ in range(3):
        next(it)
    ck = Checkpointer(str(tmp_path), async_save=False)
    state = {"w": jax.numpy.zeros(3)}
    ck.save(3, state, rng=jax.random.PRNGKey(0), data_iter=it)
    expected = [next(it) for _ in range(3)]
    it2 = iter(ds)
    ck.restore(state, data_iter=it2)
    got = [next(it2) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert not np.array_equal(got[0], next(iter(ds)))  # not simply the start again
    ck.close()
