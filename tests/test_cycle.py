"""The wake/sleep cycle (sleep_jax/cycle.py): the schedule, the slot policy when slots run out,
the accuracy matrix row by row, and SIGKILL at three points (an event-log write, a wake, a
sleep's seeding) resumed to the figures of an uninterrupted run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sleep_jax.cycle import CycleConfig, schedule
from sleep_jax.sleep import SleepConfig

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cycle_worker.py")


def test_schedule_sleeps_every_period_and_at_the_end():
    assert schedule(list(range(7)), CycleConfig(sleep_every=3, store_size=5)) == \
        [[0, 1, 2], [3, 4, 5], [6]]
    assert CycleConfig(sleep_every=4, store_size=2).period == 2  # a full store sleeps first
    with pytest.raises(ValueError, match="sleep_every=0 must be an integer >= 1"):
        CycleConfig(sleep_every=0)
    with pytest.raises(ValueError, match="empty"):
        schedule([], CycleConfig())
    with pytest.raises(ValueError, match="when_full='overwrite'; allowed: \\('error', 'grow'\\)"):
        SleepConfig(when_full="overwrite")


def _run(workdir, cache, kill=None):
    cmd = [sys.executable, WORKER, str(workdir), "--cache", str(cache)]
    if kill:
        cmd += ["--kill", kill]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # ~80-110 s (three cycle subprocesses): the suite was 20 min 6 s on a slow host
def test_killed_cycles_resume_to_the_same_figures(tmp_path):
    cache = tmp_path / "jax_cache"
    full = _run(tmp_path / "full", cache)
    assert full.returncode == 0, full.stderr[-3000:]
    ref = json.loads(full.stdout.strip().splitlines()[-1])
    matrix = np.asarray(ref["matrix"])
    assert matrix.shape == (3, 2) and ((0 <= matrix) & (matrix <= 1)).all()
    ev = ref["events"]
    assert [e["cycle"] for e in ev] == [0, 1, 2]
    assert [e["memories"] for e in ev[1:]] == [["m0", "m1"], ["m2", "m3"]]
    # one slot, two sleeps: the second grows one more (when_full="grow"), none overwritten
    assert [e["slot"] for e in ev[1:]] == [0, 1]
    assert [e["slots"] for e in ev[1:]] == [1, 2]
    assert all(e["kl_to_base"] >= 0 for e in ev[1:])
    run = tmp_path / "full" / "run"
    for f in ("report.json", "report.md", "events.jsonl"):
        assert (run / f).exists(), f
    rep = json.loads((run / "report.json").read_text())["methods"]["sleep"]
    assert rep["matrix"] == ref["matrix"]

    w = tmp_path / "killed"
    for point in ("events", "wake", "seeding", "checkpoint"):
        p = _run(w, cache, kill=point)
        assert p.returncode == -9, (point, p.stderr[-3000:])
    assert len(open(w / "run" / "events.jsonl").readlines()) == 2  # rows 0 and 1 survived
    done = _run(w, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ref


def test_cycle_cli_checks_options_and_files_before_work(tmp_path, capsys):
    from sleep_jax.cycle_cli import main

    w = tmp_path / "run"
    base = ["--checkpoint", str(tmp_path / "nope"), "--memories", str(tmp_path / "m.jsonl"),
            "--probes", str(tmp_path / "p.jsonl"), "--workdir", str(w)]
    assert main(base + ["--config.cycle.sleep_every=0"]) == 2
    assert "sleep_every=0 must be an integer >= 1" in capsys.readouterr().err
    assert main(base + ["--config.sleep.when_full=overwrite"]) == 2
    assert "when_full='overwrite'" in capsys.readouterr().err
    assert main(base + ["--config.mesh=data=3"]) == 2
    assert "config.mesh='data=3'" in capsys.readouterr().err
    assert main(base) == 2  # the memories file does not exist
    assert "m.jsonl" in capsys.readouterr().err
    assert not w.exists()
