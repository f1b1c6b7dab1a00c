"""The demo end to end at smoke size (`sleep-jax demo --config configs/demo.py:quick`): every
stage runs and the report holds every figure; learning itself is tested in
test_seeding_learning.py."""

import json
import os

import pytest

from sleep_jax.demo import DemoConfig, main
from sleep_jax.demo_run import METHOD_PARTS, method_plan

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# The quick preset shrunk further: nothing asserted here depends on the sizes or on learning
# (the quick preset alone took about a tenth of the suite's time on 2 cores).
SMALLER = [f"--config.demo.{k}={v}" for k, v in dict(
    n_old=8, n_new=4, n_task=4, rc_items=40, general_items=10, dream_items=10, embed=32,
    mlp=64, expert_rank=4,
    base_steps=6, base_batch=8, base_warmup=2, sleep_steps=4, sleep_batch=8,
    eval_every=2, devices=1).items()]


def test_demo_quick_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    methods = ("opsd", "sleep_gated")  # OPSD, the router (SFT in a slot: test_sleep.py)
    assert main(["--config", f"{CONFIGS}/demo.py:quick", "--workdir", str(out),
                 f"--config.demo.methods={methods!r}", *SMALLER]) == 0
    seed = out / "seed0"
    report = json.loads((seed / "report.json").read_text())
    assert tuple(report["methods"]) == methods
    names = ("closed_new_near", "closed_new_far", "closed_old_near", "closed_old_far")
    for r in report["methods"].values():
        assert r["qualifies"] == (r["selected"] is not None)
        assert r["end"]["step"] == 4
        for point in (r["end"], r["selected"] or r["end"]):
            assert all(0.0 <= point[k] <= 1.0 for k in (*names, "val_new", "val_old"))
    assert all(0.0 <= report["base"][k] <= 1.0 for k in (*names, "open_new_far", "val_old"))
    assert set(report["in_context"]) == {"closed_new_near", "closed_new_far"}
    gated = report["methods"]["sleep_gated"]["extra"]
    assert 0.0 < gated["expert_gate_memory_rows"] < 1.0  # the router's gate, measured
    assert gated["expert_rms_memory_rows"] > 0.0
    assert report["methods"]["opsd"]["end"]["kl_to_base"] > 0.0
    assert report["method_configs"]["opsd"]["seeding"]["teacher"] == "self"
    curve = report["curves"]["sleep_gated"]
    assert [c["step"] for c in curve] == [0, 2, 4] and curve[0]["train_s"] == 0.0
    assert report["sft_step_s"] > 0
    for png in ("tradeoff.png", "curves.png", "walltime.png", "bars.png"):
        assert (seed / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "| sleep_gated |" in (out / "summary.md").read_text()
    assert (seed / "base" / "config.json").exists()


def test_every_method_plans_a_valid_sleep():
    """Each demo method's options (METHOD_PARTS) become valid SleepConfig/SeedingConfig/
    ReplayConfig (their checks run in __post_init__), without training."""
    cfg = DemoConfig()
    gens = {"trained": "/g/trained", "untrained": "/g/untrained"}
    for method in METHOD_PARTS:
        plan = method_plan(cfg, method, gens)
        extra = cfg.rehearse_steps if method == "sleep_long" else 0
        steps = 0 if method == "dream_only" else cfg.sleep_steps + extra
        assert plan.sleep.steps == steps and plan.sleep.slots == 1, method
        assert plan.sleep.rehearse.generator == gens.get(METHOD_PARTS[method].get("rehearse"),
                                                         ""), method
        sft = bool(METHOD_PARTS[method].get("sft"))
        assert (plan.seeding is None) == sft and (plan.sleep.objective == "sft") == sft, method
        assert plan.replay.source == ("texts" if sft else "prompts"), method
    assert method_plan(cfg, "seed_noreplay").replay.fraction == 0.0
    from sleep_jax.demo_run import row_config

    assert method_plan(cfg, "sleep").replay.fraction == row_config(cfg, "sleep").replay_fraction
    assert method_plan(cfg, "sleep").replay.fraction > 0
    assert method_plan(cfg, "opsd").seeding.teacher == "self"
    assert method_plan(cfg, "sleep_gated").sleep.router
    assert not method_plan(cfg, "seed_full").sleep.expert
    assert method_plan(cfg, "sft_l2_replay").sleep.full_optim.pull_to_init == cfg.l2_pull > 0
    assert method_plan(cfg, "sft_replay").sleep.full_optim.pull_to_init == 0
    alone = method_plan(cfg, "dream_only", gens)  # SEAL-like: dreams only, as many steps
    assert alone.replay.fraction == 0.0 and alone.sleep.rehearse.replay_fraction == 0.0
    assert alone.sleep.rehearse.steps == cfg.sleep_steps + cfg.rehearse_steps
    assert alone.sleep.rehearse.optim.lr == cfg.expert_lr
    from sleep_jax.sleep import SleepConfig

    with pytest.raises(ValueError, match=r"steps=0 must be >= 1 \(0 only with rehearsal"):
        SleepConfig(steps=0)  # without a generator a sleep of no steps does nothing


def test_demo_refuses_bad_settings_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--workdir", str(out), "--config.demo.methods=('sleep','slepe')"]) == 2
    assert "unknown method(s) ['slepe']" in capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.demo.sleep_stpes=5"]) == 2
    assert "unknown config key in --config.demo.sleep_stpes" in capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.rows=full",
                 "--config.demo.methods=('sleep',)"]) == 2
    assert "would ignore demo.methods=('sleep',)" in capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.rows=dream",
                 "--config.demo.methods=('sleep',)"]) == 2
    assert "rows='dream' runs sleep, sleep_dream" in capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.seeds=0"]) == 2
    assert "seeds=0 must be >= 1" in capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.demo.store_size=0"]) == 2
    assert "demo.store_size=0 must be in [1, n_new=40]" in capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.demo.sft_seq_len=20"]) == 2
    assert "demo.sft_seq_len=20 must be >= 35" in capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.demo.val_old_entities=201"]) == 2
    assert "demo.val_old_entities=201 must be in [0, n_old=200] (0 = all)" in \
        capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.rows=al"]) == 2
    assert "rows='al'; allowed: default, full, dream" in capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.demo.methods=('sleep_dream',)",
                 "--config.demo.dream_keep_top=8"]) == 2
    assert "keep_top + keep_random = 9 of dreams=8" in capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.demo.methods=('sleep_dream',)",
                 "--config.demo.dream_updates=0"]) == 2
    assert "DreamRunConfig.steps=0 must be >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_row_settings_give_a_row_and_its_family_their_own_settings():
    from sleep_jax.demo_run import parse_row_settings

    cfg = DemoConfig(expert_lr=2e-2, full_lr=1e-3, replay_fraction=0.5, row_settings=(
        "sleep:expert_lr=1e-2,replay_fraction=0.625; seed_full:replay_fraction=0.75;"
        "sleep_long:expert_lr=3e-3,expert_rank=64,sleep_warmup=100;sft:eval_every=20"))
    assert method_plan(cfg, "sft").sleep.eval_every == 20
    long = method_plan(cfg, "sleep_long").sleep  # a row's own warmup, in both optimizers
    assert long.optim.warmup_steps == long.full_optim.warmup_steps == 100
    assert method_plan(cfg, "sleep").sleep.optim.warmup_steps == cfg.sleep_warmup
    assert method_plan(cfg, "sleep_long").sleep.rank == 64  # a row's own slot rank
    assert method_plan(cfg, "sleep").sleep.rank == cfg.expert_rank
    assert method_plan(cfg, "sleep").sleep.eval_every == cfg.eval_every
    sleep, dream = method_plan(cfg, "sleep"), method_plan(cfg, "sleep_dream", {"trained": "g"})
    for plan in (sleep, dream):  # sleep_dream takes sleep's settings
        assert plan.sleep.optim.lr == 1e-2 and plan.replay.fraction == 0.625
    assert method_plan(cfg, "sleep_long").sleep.optim.lr == 3e-3  # its own entry wins
    assert method_plan(cfg, "sleep_long").replay.fraction == 0.5
    full = method_plan(cfg, "seed_full")
    assert full.replay.fraction == 0.75 and full.sleep.full_optim.lr == 1e-3
    other = method_plan(cfg, "sft_slot_replay")  # no entry: the shared defaults
    assert other.sleep.optim.lr == 2e-2 and other.replay.fraction == 0.5
    for bad, msg in (("slep:expert_lr=1", "a method of sft, "),
                     ("sleep:lr=1", "keys allowed: expert_lr, full_lr"),
                     ("sleep:expert_lr=fast", "expert_lr='fast' is not a number"),
                     ("sleep", "expected METHOD:KEY=VALUE"),
                     ("sft:eval_every=2.5", "must be an integer >= 1"),
                     ("sleep:expert_rank=0", "must be an integer >= 1")):
        with pytest.raises(ValueError, match=msg):
            parse_row_settings(bad)
