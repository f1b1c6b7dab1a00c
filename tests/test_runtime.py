"""Many processes: environment parsing, process rows, host reads, the local launcher, and a
2-process train run against a 1-process one (same losses, checkpoint restored on 1 process).

The multi-process runs are subprocesses on fake CPU devices (JAX_NUM_CPU_DEVICES per process),
sharing one persistent compilation cache so the two 1-process runs compile once.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sleep_jax import runtime
from sleep_jax.launch_cli import process_env
from sleep_jax.runtime import RuntimeConfig, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


# ------------------------------------------------------------------------------ env parsing


def test_resolve_single_process_without_a_cluster():
    assert resolve(env={}).kind == "single"
    assert resolve(env={"SLEEP_JAX_NUM_PROCESSES": "1"}).kind == "single"
    assert resolve(RuntimeConfig(distributed="none"),
                   env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "1"}
                   ).kind == "single"
    assert resolve(env={}).init_timeout_s == 300  # the documented default


@pytest.mark.parametrize("index_var", ["SLEEP_JAX_PROCESS_ID", "JOB_COMPLETION_INDEX",
                                       "SLURM_PROCID", "TPU_WORKER_ID"])
def test_resolve_explicit_takes_the_platform_index(index_var):
    env = {"SLEEP_JAX_NUM_PROCESSES": "4", "SLEEP_JAX_COORDINATOR": "10.0.0.2:1234",
           index_var: "3", "SLEEP_JAX_INIT_TIMEOUT": "9"}
    plan = resolve(env=env)
    assert (plan.kind, plan.num_processes, plan.process_id, plan.coordinator_address,
            plan.init_timeout_s) == ("explicit", 4, 3, "10.0.0.2:1234", 9)


def test_resolve_flags_override_the_environment():
    env = {"SLEEP_JAX_NUM_PROCESSES": "4", "SLEEP_JAX_COORDINATOR": "a:1", "TPU_WORKER_ID": "3"}
    plan = resolve(RuntimeConfig(num_processes=2, process_id=1, coordinator_address="b:2",
                                 local_device_ids="0,1", init_timeout_s=5), env=env)
    assert (plan.num_processes, plan.process_id, plan.coordinator_address,
            plan.local_device_ids, plan.init_timeout_s) == (2, 1, "b:2", (0, 1), 5)


def test_resolve_slurm_and_tpu_leave_detection_to_jax():
    slurm = resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"})
    assert (slurm.kind, slurm.num_processes, slurm.process_id) == ("slurm", 4, 2)
    assert resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
                   ).kind == "single"  # a one-task job
    tpu = resolve(env={"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "1"})
    assert (tpu.kind, tpu.num_processes, tpu.process_id) == ("tpu", 4, 1)
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "h0", "TPU_WORKER_ID": "0"}).kind == "single"
    # what libtpu leaves in the variable on a host that is not a TPU VM
    warning = ("WARNING: could not determine TPU worker hostnames or IP addresses, please set "
               "env var `TPU_WORKER_HOSTNAMES` manually, otherwise libtpu.so may not properly "
               "initialize.")
    assert resolve(env={"TPU_WORKER_HOSTNAMES": warning}).kind == "single"
    assert resolve(env={"SLEEP_JAX_DISTRIBUTED": "jax"}).kind == "jax"


@pytest.mark.parametrize("env,match", [
    ({"SLEEP_JAX_NUM_PROCESSES": "2", "SLEEP_JAX_COORDINATOR": "h:1"}, "no process id"),
    ({"SLEEP_JAX_NUM_PROCESSES": "2", "SLEEP_JAX_PROCESS_ID": "0"}, "no coordinator"),
    ({"SLEEP_JAX_NUM_PROCESSES": "2", "SLEEP_JAX_PROCESS_ID": "2",
      "SLEEP_JAX_COORDINATOR": "h:1"}, r"outside \[0, 2\)"),
    ({"SLEEP_JAX_NUM_PROCESSES": "two"}, "SLEEP_JAX_NUM_PROCESSES='two'"),
    ({"SLEEP_JAX_NUM_PROCESSES": "2", "SLEEP_JAX_PROCESS_ID": "0",
      "SLEEP_JAX_COORDINATOR": "host"}, "host:port"),
    ({"SLEEP_JAX_DISTRIBUTED": "mpi"}, "allowed: auto, none, jax"),
])
def test_resolve_bad_environment_is_named(env, match):
    with pytest.raises(ValueError, match=match):
        resolve(env=env)


def test_launcher_environment_per_rank():
    env = process_env(1, 2, "127.0.0.1:9", devices_per_process=4, rank_env="TPU_WORKER_ID",
                      base={"SLEEP_JAX_PROCESS_ID": "0", "KEEP": "x"})
    assert env["TPU_WORKER_ID"] == "1" and "SLEEP_JAX_PROCESS_ID" not in env
    assert env["JAX_NUM_CPU_DEVICES"] == "4" and env["KEEP"] == "x"
    assert env["SLEEP_JAX_LOCAL_DEVICE_IDS"] == "4,5,6,7"  # rank 1's devices
    plan = resolve(env=env)
    assert (plan.num_processes, plan.process_id, plan.coordinator_address,
            plan.local_device_ids) == (2, 1, "127.0.0.1:9", (4, 5, 6, 7))


# ------------------------------------------------------------------------------ one process


def test_rows_batches_and_host_read_on_one_process():
    from sleep_jax.mesh import device_order, make_mesh

    mesh = make_mesh("data=2,fsdp=4")
    assert list(mesh.devices.ravel()) == device_order()  # one flat order, reshaped
    assert list(make_mesh("tensor=8").devices.ravel()) == device_order()
    np.testing.assert_array_equal(runtime.process_rows(8, mesh, P(("data", "fsdp"))),
                                  np.arange(8))
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    g = runtime.shard_batch({"x": x}, mesh, P(("data", "fsdp")))["x"]
    assert g.sharding.spec == P(("data", "fsdp")) and g.shape == (8, 3)
    out = runtime.host_read({"g": g, "s": jax.jit(lambda a: a.sum())(g), "n": 3})
    np.testing.assert_array_equal(out["g"], x)
    assert out["s"] == x.sum() and out["n"] == 3 and runtime.is_writer()


# ------------------------------------------------------------------------------ processes

TRAIN = ["--config", os.path.join(ROOT, "configs", "train.py:tiny"),
         "--config.train.checkpoint_every=0", "--config.train.progress_bar=false",
         "--config.train.async_checkpoints=false", "--config.train.seq_len=32",
         "--config.train.batch_size=4", "--config.model.layers=1",
         "--config.data.builtin_sentences=200",
         "--config.optim.decay_steps=100"]  # the lr schedule does not depend on train.steps


def _env(cache):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("SLEEP_JAX_NUM_PROCESSES", None)
    return env


def _run(args, env, timeout=240):
    p = subprocess.run([PY, "-m", "sleep_jax.cli", *args], env=env, capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x 2 devices for 6 steps; 2 processes x 1 device for 4 steps (a checkpoint at
    the end, step 4), then 1 process continuing that run to step 6."""
    tmp = tmp_path_factory.mktemp("runtime")
    env = _env(tmp / "cache")
    one, two = str(tmp / "one"), str(tmp / "two")
    t0 = time.perf_counter()
    _run(["train", *TRAIN, "--workdir", one, "--config.train.steps=6"], env)
    t1 = time.perf_counter()
    launched = _run(["launch", "--nproc", "2", "--devices-per-process", "1", "--", PY, "-m",
                     "sleep_jax.cli", "train", *TRAIN, "--workdir", two,
                     "--config.train.steps=4"], env)
    t2 = time.perf_counter()
    after_two = _losses(two)
    files_two = sorted(os.listdir(two))
    resumed = _run(["train", *TRAIN, "--workdir", two, "--config.train.steps=6",
                    "--allow_config_change"], env)
    t3 = time.perf_counter()
    # growth of the trained model (width, FFN and 2 expert slots, with noise so the random
    # draws count) on 1 process x 2 devices and on 2 processes x 1 device: the same mesh
    grow = ["grow", "--checkpoint", os.path.join(one, "model"),
            "--config.to=embed=64,mlp=256,expert_slots=2,expert_rank=4",
            "--config.options.noise=0.01"]
    _run([*grow, "--out", str(tmp / "grown1")], env)
    grown_two = _run(["launch", "--nproc", "2", "--devices-per-process", "1", "--", PY, "-m",
                      "sleep_jax.cli", *grow, "--out", str(tmp / "grown2")], env)
    t4 = time.perf_counter()
    print(f"runtime runs: 1 process {t1 - t0:.1f} s, 2 processes {t2 - t1:.1f} s, "
          f"resume on 1 process {t3 - t2:.1f} s, grow on 1 and 2 processes {t4 - t3:.1f} s")
    return dict(one=_losses(one), two=after_two, resumed=_losses(two), files_two=files_two,
                launched=launched, resumed_out=resumed.stdout + resumed.stderr, workdir=two,
                grown=(str(tmp / "grown1"), str(tmp / "grown2")), grown_two=grown_two.stdout)


def test_two_processes_match_one_process(runs):
    one, two = runs["one"], runs["two"]
    assert sorted(two) == [1, 2, 3, 4]  # one writer: no step twice
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)],
                               rtol=0, atol=1e-5)
    assert one[6] < one[1] - 0.1  # it trains (a control that the losses carry signal)
    out = runs["launched"].stdout
    assert "[0] " in out and "[1] " in out  # rank-prefixed lines of both processes
    assert "process 1 of 2" in out and "final loss" in out
    assert {"config.json", "metrics.jsonl", "model", "train", "tokenizer.json"} <= \
        set(runs["files_two"])


def test_checkpoint_of_two_processes_continues_on_one(runs):
    assert "resumed from" in runs["resumed_out"] and "at step 4" in runs["resumed_out"]
    resumed, one = runs["resumed"], runs["one"]
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([resumed[5], resumed[6]], [one[5], one[6]], rtol=0, atol=1e-5)


def test_grow_on_two_processes_writes_the_same_checkpoint_as_one(runs):
    from flax import nnx

    from sleep_jax.models.checkpoint_dir import load_checkpoint, read_config

    one, two = runs["grown"]
    assert read_config(one)[0] == read_config(two)[0]
    assert read_config(one)[0].embed == 64 and read_config(one)[0].expert_slots == 2
    p1 = nnx.to_pure_dict(nnx.state(load_checkpoint(one)[0]))
    p2 = nnx.to_pure_dict(nnx.state(load_checkpoint(two)[0]))
    flat1, flat2 = jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p2)
    assert len(flat1) == len(flat2)
    for (path, a), b in zip(flat1, flat2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    out = runs["grown_two"]
    assert out.count("grew ") == 1 and "[0] grew" in out  # process 0 alone reports


def test_a_failing_process_stops_the_launch_with_its_rank(tmp_path):
    code = ("import os, sys, time\n"
            "r = int(os.environ['SLEEP_JAX_PROCESS_ID'])\n"
            "print('rank', r, 'up', flush=True)\n"
            "sys.exit(7) if r == 1 else time.sleep(60)\n")
    t0 = time.perf_counter()
    p = subprocess.run([PY, "-m", "sleep_jax.cli", "launch", "--nproc", "2", "--grace-s", "1",
                        "--", PY, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=_env(tmp_path))
    assert p.returncode == 7, p.stderr
    assert "process 1 of 2 exited with status 7; stopped the others" in p.stderr
    assert "[0] rank 0 up" in p.stdout and "[1] rank 1 up" in p.stdout
    assert time.perf_counter() - t0 < 30  # not the 60 s sleep of rank 0


def test_a_process_that_never_starts_gives_a_clear_error_in_time(tmp_path):
    """Process 0 of 2 alone: its wait for process 1 ends at the configured timeout."""
    from sleep_jax.launch_cli import free_port

    env = dict(_env(tmp_path), SLEEP_JAX_NUM_PROCESSES="2", SLEEP_JAX_PROCESS_ID="0",
               SLEEP_JAX_COORDINATOR=f"127.0.0.1:{free_port()}", SLEEP_JAX_INIT_TIMEOUT="3")
    code = "from sleep_jax import runtime; runtime.initialize(); print('joined')"
    t0 = time.perf_counter()
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env=env)
    took = time.perf_counter() - t0
    assert p.returncode == runtime.INIT_TIMEOUT_EXIT, p.stderr[-2000:]
    assert "process 0 of 2 could not join" in p.stderr and "within 3 s" in p.stderr
    assert "joined" not in p.stdout and took < 25, took


def test_initialize_after_device_use_says_so(monkeypatch):
    """In this process jax is already in use: joining others then is refused with the reason
    (one process alone is a no-op, so nothing here starts a coordinator)."""
    jax.devices()
    assert runtime.initialize(RuntimeConfig(num_processes=1)).kind == "single"
    with pytest.raises(RuntimeError, match="before anything touches a device"):
        runtime.initialize(RuntimeConfig(num_processes=2, process_id=1,
                                         coordinator_address="127.0.0.1:1", init_timeout_s=5))


def test_meshes_of_different_shapes_share_devices_in_one_jit():
    """Arrays on data=2,fsdp=4 and on tensor=8 meet in one jit; with the devices of one mesh
    in another order the same jit is refused (the failure one device order prevents)."""
    from jax.sharding import NamedSharding

    from sleep_jax.mesh import device_order, make_mesh

    a_mesh, b_mesh = make_mesh("data=2,fsdp=4"), make_mesh("tensor=8")
    x = jax.device_put(np.ones((8, 8), np.float32), NamedSharding(a_mesh, P("fsdp", None)))
    y = jax.device_put(np.ones((8, 8), np.float32), NamedSharding(b_mesh, P(None, "tensor")))
    f = jax.jit(lambda u, v: (u + v).sum())
    assert float(f(x, y)) == 128.0
    shuffled = make_mesh("tensor=8", devices=device_order()[::-1])
    z = jax.device_put(np.ones((8, 8), np.float32), NamedSharding(shuffled, P(None, "tensor")))
    with pytest.raises(ValueError, match="incompatible devices"):
        f(x, z)


def test_sigterm_to_the_launcher_reaches_every_process(tmp_path):
    code = ("import os, signal, sys, time\n"
            "r = os.environ['SLEEP_JAX_PROCESS_ID']\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('rank', r, 'got TERM', flush=True),"
            " sys.exit(0)))\n"
            "print('rank', r, 'up', flush=True)\n"
            "time.sleep(30); sys.exit(9)\n")
    p = subprocess.Popen([PY, "-m", "sleep_jax.cli", "launch", "--nproc", "2", "--", PY, "-c",
                          code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env=_env(tmp_path))
    seen = []
    while len([s for s in seen if " up" in s]) < 2:
        line = p.stdout.readline()
        assert line, "".join(seen) + p.stderr.read()
        seen.append(line)
    t0 = time.perf_counter()
    p.terminate()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "[0] rank 0 got TERM" in out and "[1] rank 1 got TERM" in out
    assert "SIGTERM: passed to every process" in err and time.perf_counter() - t0 < 15
