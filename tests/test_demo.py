"""The demo end to end at smoke size (`sleep-jax demo --config configs/demo.py:quick`): every
stage runs and the report holds every figure; learning itself is tested in
test_seeding_learning.py."""

import json
import os

from sleep_jax.demo import main

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# The quick preset shrunk further: nothing asserted here depends on the sizes or on learning
# (the quick preset alone took about a tenth of the suite's time on 2 cores).
SMALLER = [f"--config.demo.{k}={v}" for k, v in dict(
    n_old=8, n_new=4, rc_items=40, general_items=10, embed=32, mlp=64, expert_rank=4,
    base_steps=6, base_batch=8, base_warmup=2, sleep_steps=4, sleep_batch=8,
    eval_every=2).items()]


def test_demo_quick_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["--config", f"{CONFIGS}/demo.py:quick", "--workdir", str(out),
                 "--config.demo.methods=('sft','sleep_gated')", *SMALLER]) == 0
    seed = out / "seed0"
    report = json.loads((seed / "report.json").read_text())
    assert set(report["methods"]) == {"sft", "sleep_gated"}
    for name in ("closed_new_near", "closed_new_far", "closed_old_near", "closed_old_far"):
        for r in (report["base"], *report["methods"].values()):
            assert 0.0 <= r[name] <= 1.0
    assert 0.0 <= report["base"]["open_new_far"] <= 1.0
    gated = report["methods"]["sleep_gated"]
    assert 0.0 < gated["expert_gate_memory_rows"] < 1.0  # the router's gate, measured
    assert gated["expert_rms_memory_rows"] > 0.0
    assert report["methods"]["sft"]["kl_to_base"] > 0.0
    assert len(report["curves"]["sleep_gated"]) >= 2
    assert "seeding_step_cost_x_sft" in report
    pngs = [f for f in os.listdir(seed) if f.endswith(".png")]
    assert pngs, os.listdir(seed)
    assert "| sleep_gated |" in (out / "summary.md").read_text()
    assert (seed / "base" / "config.json").exists()


def test_demo_refuses_bad_settings_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--workdir", str(out), "--config.demo.methods=('sleep','slepe')"]) == 2
    assert "unknown method(s) ['slepe']" in capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.demo.sleep_stpes=5"]) == 2
    assert "unknown config key in --config.demo.sleep_stpes" in capsys.readouterr().err
    assert main(["--workdir", str(out), "--config.seeds=0"]) == 2
    assert "seeds=0 must be >= 1" in capsys.readouterr().err
    assert not out.exists()
