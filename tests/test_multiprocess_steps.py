"""Many processes, step by step: one seeding step and one GRPO update on 2 processes equal the
same on 1 process (to 1e-5), each process feeding only its rows of the global batch.

The worker (tests/steps_worker.py) runs both steps in one process (2 fake CPU devices) and in a
pair started by ``sleep-jax launch`` (1 device each), over the same mesh shape (fsdp=2), so the
2-process run splits the parameters and the batch rows across the processes.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
WORKER = os.path.join(ROOT, "tests", "steps_worker.py")


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    for k in ("SLEEP_JAX_NUM_PROCESSES", "SLEEP_JAX_PROCESS_ID", "SLEEP_JAX_COORDINATOR"):
        env.pop(k, None)
    return env


def _run(cmd, env):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mproc_steps")
    env = _env()
    _run([PY, WORKER, str(tmp / "one.npz")], dict(env, JAX_NUM_CPU_DEVICES="2"))
    two = _run([PY, "-m", "sleep_jax.cli", "launch", "--nproc", "2", "--devices-per-process",
                "1", "--", PY, WORKER, str(tmp / "two.npz")], env)
    assert "[0] process 0 of 2: done" in two.stdout and "[1] process 1 of 2: done" in two.stdout
    one, two = np.load(tmp / "one.npz"), np.load(tmp / "two.npz")
    return {k: one[k] for k in one}, {k: two[k] for k in two}


def test_each_process_feeds_only_its_rows(runs):
    one, two = runs
    assert int(one["processes"]) == 1 and int(two["processes"]) == 2
    names = {k.split("/")[1] for k in two if k.startswith("rows/")}
    assert {"seed0", "seed3", "prompt", "completion", "mask", "rewards"} <= names
    for name in names:
        np.testing.assert_array_equal(one[f"rows/{name}/0"], np.arange(8))  # one: all rows
        np.testing.assert_array_equal(two[f"rows/{name}/0"], np.arange(4))  # process 0
        np.testing.assert_array_equal(two[f"rows/{name}/1"], np.arange(4, 8))  # process 1


def test_seeding_step_on_two_processes_equals_one(runs):
    one, two = runs
    keys = sorted(k for k in one if k.startswith(("seed/", "seed_metric/")))
    assert "seed_metric/divergence" in keys and "seed/['blocks.expert_b'].value" in keys
    for k in keys:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # the step did something to compare: a divergence over sampled tokens, and the slot's B
    # (0 before the step: activate_slot) moved
    assert one["seed_metric/divergence"] > 0.01 and one["seed_metric/tokens"] == 24
    assert np.abs(one["seed/['blocks.expert_b'].value"]).max() > 1e-4


def test_grpo_update_on_two_processes_equals_one(runs):
    one, two = runs
    keys = sorted(k for k in one if k.startswith(("grpo/", "grpo_metric/")))
    assert "grpo_metric/loss" in keys and "grpo/['embed'].value" in keys
    for k in keys:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert abs(float(one["grpo_metric/pg_loss"])) > 1e-3 and one["grpo_metric/kl"] > 1e-3
    moved = max(float(np.abs(one[k] - one["grpo_before/" + k[5:]]).max())
                for k in keys if k.startswith("grpo/"))
    assert moved > 1e-3  # the update changed the parameters it compares
