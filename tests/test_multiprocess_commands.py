"""Many processes, the remaining commands: ``sleep-jax demo``, ``sleep-jax dream`` and the cycle
demo (``sleep-jax cycle --config configs/cycle.py:demo``) on 2 processes x 1 CPU device write
the same figures as 1 process x 2 devices over the same mesh (fsdp=2), process 0 alone
reporting.

What each run goes through: the base trained from global batches that each process feeds its
rows of (the data pipeline read whole on every process), growth onto the mesh, seeding and SFT
into a slot, checkpoint selection from a host copy read across processes, the dream iteration
with its contexts over the batch axes, every checkpoint saved shard by shard.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# Left out of the default run (`make test`) for the suite's 20-minute budget on 2 cores (about
# 6 minutes here): PYTEST_ARGS="-m slow -k multiprocess_commands" make test.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
PY = sys.executable
# the demo at smoke size (tests/test_demo.py's sizes); nothing here depends on learning
SMALL = dict(n_old=8, n_new=4, n_task=4, rc_items=40, general_items=10, dream_items=10,
             embed=32, mlp=64, expert_rank=4, base_steps=6, base_batch=8, base_warmup=2,
             sleep_steps=4, sleep_batch=8, eval_every=2)
TIMES = ("wall_s", "base_train_s", "base_eval_s", "sft_step_s", "timing", "train_s", "step_s",
         "compile_s", "time_s", "time_per_cycle_s", "seconds", "dream_s", "checkpoint")


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    for k in ("SLEEP_JAX_NUM_PROCESSES", "SLEEP_JAX_PROCESS_ID", "SLEEP_JAX_COORDINATOR"):
        env.pop(k, None)
    return env


def _run(cmd, env):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _one_and_two(cmd, tmp):
    """Runs ``cmd`` (without --workdir) on 1 process x 2 devices and 2 processes x 1 device;
    returns the second run's output."""
    env = _env()
    _run([*cmd, "--workdir", str(tmp / "one")], dict(env, JAX_NUM_CPU_DEVICES="2"))
    return _run([PY, "-m", "sleep_jax.cli", "launch", "--nproc", "2", "--devices-per-process",
                 "1", "--", *cmd, "--workdir", str(tmp / "two")], env)


def _same(a, b, where=""):
    """Equal JSON trees: numbers to 1e-5, wall times left out."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            if k not in TIMES:
                _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=where)
    else:
        assert a == b, where


def test_two_process_demo_equals_one_process(tmp_path):
    methods = ("sft_slot_replay", "sleep")  # SFT into a slot with replay; seeding into one
    cmd = [PY, "-m", "sleep_jax.cli", "demo", "--config", f"{CONFIGS}/demo.py:quick",
           f"--config.demo.methods={methods!r}",
           *[f"--config.demo.{k}={v}" for k, v in SMALL.items()]]
    out = _one_and_two(cmd, tmp_path)
    one, two = (json.loads((tmp_path / w / "seed0" / "report.json").read_text())
                for w in ("one", "two"))
    assert tuple(two["methods"]) == methods
    _same(one, two)
    assert two["methods"]["sleep"]["end"]["kl_to_base"] > 0  # the slot moved the model
    assert two["methods"]["sleep"]["extra"]["expert_rms_memory_rows"] > 0
    assert sorted(os.listdir(tmp_path / "two" / "seed0")) == \
        sorted(os.listdir(tmp_path / "one" / "seed0"))
    lines = out.splitlines()
    assert any(x.startswith("[0] | sleep |") for x in lines)  # the summary, by process 0
    assert not any(x.startswith("[1] |") for x in lines)


def _dream_inputs(tmp):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_dream_cli import RECORDS, TOKENS, _tokenizer

    from sleep_jax.models import create_model, get_preset
    from sleep_jax.models.checkpoint_dir import save_checkpoint

    cfg = get_preset("tiny", vocab=48, embed=32, mlp=64, layers=1, heads=4, kv_heads=2,
                     head_dim=8)
    save_checkpoint(tmp / "base", create_model(cfg, seed=0), _tokenizer(), tokens=TOKENS)
    with open(tmp / "tasks.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in RECORDS)


@pytest.fixture(scope="module")
def dreams(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mproc_dream")
    _dream_inputs(tmp)
    cmd = [PY, "-m", "sleep_jax.cli", "dream", "--config", f"{CONFIGS}/dream.py:quick",
           "--checkpoint", str(tmp / "base"), "--tasks", str(tmp / "tasks.jsonl"),
           "--config.run.slots=2", "--config.run.rank=4", "--config.run.steps=3"]
    return tmp, _one_and_two(cmd, tmp)


def test_two_process_dream_equals_one_process(dreams):
    tmp_path, out = dreams
    recs = [[{k: v for k, v in json.loads(x).items() if k not in ("time_s",) and
              not k.endswith("_s") and k != "ms/step"}
             for x in (tmp_path / w / "metrics.jsonl").read_text().splitlines()]
            for w in ("one", "two")]
    assert [r["step"] for r in recs[1]] == [1, 2, 3]  # one writer: no row twice
    _same(recs[0], recs[1])
    assert any(abs(r.get("reward_mean", 0)) > 0 for r in recs[1])  # rewards to compare
    gens = [np.load(tmp_path / w / "model" / "dream_generator.npz") for w in ("one", "two")]
    assert sorted(gens[0].files) == sorted(gens[1].files)
    for k in gens[0].files:
        np.testing.assert_allclose(gens[1][k], gens[0][k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert out.count("outputs in ") == 1


def test_two_process_cycle_demo_equals_one_process(tmp_path):
    cmd = [PY, "-m", "sleep_jax.cli", "cycle", "--config", f"{CONFIGS}/cycle.py:demo",
           *[f"--config.demo.{k}={v}" for k, v in SMALL.items()],
           "--config.cycle_demo.memories=4", "--config.cycle_demo.steps=2",
           "--config.cycle_demo.batch_size=8", "--config.cycle_demo.slots=1",
           "--config.cycle_demo.old_entities=4", "--config.cycle_demo.base=",
           "--config.cycle_demo.methods=('sleep','sft_replay')", "--config.cycle.sleep_every=2",
           "--config.cycle.store_size=2", "--config.cycle.kl_texts=8",
           "--config.progress_bar=False"]
    out = _one_and_two(cmd, tmp_path)
    for method in ("sleep", "sft_replay"):
        ev = [[json.loads(x) for x in (tmp_path / w / method / "events.jsonl").read_text()
               .splitlines()] for w in ("one", "two")]
        assert [e["cycle"] for e in ev[1]] == [0, 1, 2], method
        _same(ev[0], ev[1], method)
    one, two = (json.loads((tmp_path / w / "report.json").read_text()) for w in ("one", "two"))
    _same(one["methods"], two["methods"], "report")
    assert out.count("outputs in ") == 1  # process 0 alone reports


def test_two_process_sleep_with_dreaming_rehearsal_equals_one_process(dreams, tmp_path):
    """``sleep-jax sleep`` with the trained generator (``sleep.rehearse.generator``): seeding
    into a slot, then dreams about the memories (their contexts over the batch axes) and
    rehearsal of the slot on them; the dreams and the slot come out alike."""
    from test_dream_cli import RECORDS

    gen = dreams[0] / "one" / "model"
    with open(tmp_path / "m.jsonl", "w") as f:
        f.writelines(json.dumps({"id": r["id"], "text": r["context"]}) + "\n" for r in RECORDS)
    with open(tmp_path / "p.jsonl", "w") as f:
        f.writelines(json.dumps({"memory_id": r["id"], "question": q["question"],
                                 "answers": q["answers"]}) + "\n"
                     for r in RECORDS for q in r["questions"][:1])
    cmd = [PY, "-m", "sleep_jax.cli", "sleep", "--config", f"{CONFIGS}/sleep.py:quick",
           "--checkpoint", str(gen), "--memories", str(tmp_path / "m.jsonl"), "--probes",
           str(tmp_path / "p.jsonl"), "--config.sleep.steps=2", "--config.sleep.batch_size=4",
           "--config.sleep.progress_bar=False", "--config.sleep.eval_tokens=1",
           "--config.replay.source=none", "--config.seeding.max_new_tokens=2",
           "--config.mesh=fsdp=2", "--config.sleep.when_full=grow",
           f"--config.sleep.rehearse.generator={gen}",
           "--config.sleep.rehearse.steps=2", "--config.sleep.rehearse.batch_size=4",
           "--config.sleep.rehearse.replay_fraction=0",
           "--config.sleep.rehearse.contexts_per_call=2",
           "--config.sleep.rehearse.dream.max_dream_tokens=4"]
    _one_and_two(cmd, tmp_path)
    one, two = (json.loads((tmp_path / w / "report.json").read_text()) for w in ("one", "two"))
    rh = two["rehearsal"]
    assert rh["steps"] == 2 and rh["status"] == "done" and rh["dreams"]["kept"] > 0
    _same(one["rehearsal"], rh, "rehearsal")
    d1, d2 = ([json.loads(x) for x in (tmp_path / w / "rehearse" / "dreams.jsonl").read_text()
               .splitlines()] for w in ("one", "two"))
    assert len(d2) == 1 + rh["dreams"]["rows"]  # the summary, then one line per dream
    _same(d1, d2, "dreams")  # the same dreams, token for token
