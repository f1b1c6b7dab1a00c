"""Many processes, preempted: SIGTERM to ``sleep-jax launch`` running a 2-process ``sleep-jax
train`` makes both processes save one checkpoint at one step (jax's preemption sync point) and
exit 0; the same command then resumes from that step."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

# Left out of the default run (`make test`) for the suite's 20-minute budget on 2 cores (about
# 100 s here): run with PYTEST_ARGS="-m slow" (docs/LOG.md 2026-12-01, fourth session).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TRAIN = ["train", "--config", os.path.join(ROOT, "configs", "train.py:tiny"),
         "--config.train.checkpoint_every=0", "--config.train.progress_bar=false",
         "--config.train.async_checkpoints=false", "--config.train.seq_len=16",
         "--config.train.batch_size=2", "--config.model.layers=1",
         "--config.data.builtin_sentences=200", "--config.optim.decay_steps=100"]


def _metrics(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f if x.endswith("\n")]


def test_sigterm_to_a_two_process_train_saves_one_checkpoint_and_resumes(tmp_path):
    from sleep_jax.checkpoint import Checkpointer

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    for k in ("SLEEP_JAX_NUM_PROCESSES", "SLEEP_JAX_PROCESS_ID", "SLEEP_JAX_COORDINATOR"):
        env.pop(k, None)
    w = str(tmp_path / "run")
    cmd = [PY, "-m", "sleep_jax.cli", "launch", "--nproc", "2", "--devices-per-process", "1",
           "--", PY, "-m", "sleep_jax.cli", *TRAIN, "--workdir", w,
           "--config.train.steps=100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env=env)
    try:
        deadline = time.time() + 240
        while len(_metrics(w)) < 3 and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    assert "SIGTERM: passed to every process" in err
    saved = [x for x in out.splitlines() if "SIGTERM: saved a checkpoint at step" in x]
    assert {x[:4] for x in saved} == {"[0] ", "[1] "}, out[-3000:]  # both processes saved
    steps = {int(x.split("at step ")[1].split()[0]) for x in saved}
    assert len(steps) == 1, saved  # at one step
    (step,) = steps
    assert 3 <= step < 100000 and Checkpointer(os.path.join(w, "train")).latest_step() == step
    assert [r["step"] for r in _metrics(w)] == list(range(1, step + 1))

    # the same command again resumes (its programs come from the compilation cache)
    r = subprocess.run([*cmd[:-1], f"--config.train.steps={step + 2}", "--allow_config_change"],
                       capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from" in r.stderr + r.stdout and f"at step {step}\n" in r.stderr + r.stdout
    recs = _metrics(w)
    assert [x["step"] for x in recs] == list(range(1, step + 3))
    assert all(abs(x["loss"]) < 100 for x in recs[-2:])
