"""The demo's dreaming rows at smoke size (sleep_jax/demo_dream.py): the generator trains on
the TASK split only, and sleep_dream / sleep_long run their extra steps; learning itself is
tested in test_dream_learning.py and test_rehearse.py."""

import json
import os

import pytest

from sleep_jax.data import world as worldlib
from sleep_jax.demo import main
from sleep_jax.demo_dream import check_task_discipline
from sleep_jax.dream.tasks import world_task_records

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TINY = [f"--config.demo.{k}={v}" for k, v in dict(
    n_old=8, n_new=4, n_task=4, rc_items=40, general_items=10, dream_items=10, embed=32,
    mlp=64, expert_rank=4, base_steps=6, base_batch=8, base_warmup=2, sleep_steps=4,
    sleep_batch=8, eval_every=2, devices=1, dream_updates=2, dream_contexts=2, dreams=2,
    dream_keep_top=1, dream_keep_random=0, dream_inner_steps=1, dream_tokens=4,
    rehearse_steps=3, rehearse_rounds=1).items()]


def test_task_set_holds_no_evaluated_entity_or_question():
    world = worldlib.make_world(0, 12, 6, 5)
    records = world_task_records(world)
    check_task_discipline(world, records)  # the world's TASK split passes
    task = {e.id for e in world.entities("task")}
    assert {r["id"] for r in records} == task
    old = world.entities("old")[0]
    bad = [dict(records[0], context=worldlib.passage(old))]
    with pytest.raises(ValueError, match=f"names evaluated entity '{old.name}'"):
        check_task_discipline(world, bad)
    with pytest.raises(ValueError, match="'new-000' is not a TASK entity"):
        check_task_discipline(world, [dict(records[0], id="new-000")])
    q = world.qa("new", worldlib.VALIDATION[0])[0].question
    bad = [dict(records[0], questions=[{"question": q, "answers": ["x"]}])]
    with pytest.raises(ValueError, match="asks an evaluation question"):
        check_task_discipline(world, bad)


def test_dreaming_rows_train_a_generator_and_rehearse(tmp_path):
    out = tmp_path / "demo"
    methods = ("sleep_dream", "sleep_long", "dream_only")
    assert main(["--config", f"{CONFIGS}/demo.py:quick", "--workdir", str(out),
                 f"--config.demo.methods={methods!r}", *TINY]) == 0
    seed = out / "seed0"
    report = json.loads((seed / "report.json").read_text())
    d = report["dreaming"]
    assert d["updates"] == 2 and [s for s, _ in d["rewards"]] == [1, 2]
    assert d["contexts"] == 4 and report["timing"]["dream_generator"]["wall_s"] > 0
    tasks = [json.loads(x) for x in (seed / "dream" / "tasks.jsonl").read_text().splitlines()]
    assert all(t["id"].startswith("task-") for t in tasks)
    for m in methods:  # both get 4 + 3 steps; the dreaming row's last point is after rehearsal
        r = report["methods"][m]
        assert r["end"]["step"] == 7, m
        assert report["curves"][m][-1]["step"] == 7, m
    rh = report["methods"]["sleep_dream"]["rehearsal"]
    assert rh["steps"] == 3 and rh["dreams"]["kept"] == 4 and rh["dreams"]["dropped_probe"] == 0
    assert "rehearsal" not in report["methods"]["sleep_long"]
    assert report["method_configs"]["sleep_long"]["sleep"]["steps"] == 7
    alone = report["methods"]["dream_only"]  # no consolidation: steps 0, then 4 + 3 on dreams
    assert alone["rehearsal"]["steps"] == 7 and alone["rehearsal"]["replay_rows"] == 0
    assert [c["step"] for c in report["curves"]["dream_only"]] == [0, 7]
    assert report["method_configs"]["dream_only"]["sleep"]["steps"] == 0
    assert alone["end"]["kl_to_base"] > 0  # the dreams moved the new slot
    md = (seed / "report.md").read_text()
    assert "## Dreaming" in md and "**sleep_dream**: 4 dreams kept about 4 memories" in md
    # the untrained control's generator: the same slots, the adapter before any update
    import numpy as np

    from sleep_jax.dream.generator import GENERATOR_FILE
    a = np.load(seed / "dream" / "train" / "model" / GENERATOR_FILE)
    b = np.load(seed / "dream" / "generator_untrained" / GENERATOR_FILE)
    assert set(a.files) == set(b.files)
    assert any(not np.array_equal(a[k], b[k]) for k in a.files)  # the updates moved it
    assert np.all(b["blocks.expert_b"] == 0)  # the generator slot starts at B = 0
