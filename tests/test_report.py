"""The demo report (sleep_jax.eval.report) on synthetic report dicts: no training."""

from __future__ import annotations

import copy
import json

import pytest

from sleep_jax.eval import report as rep
from sleep_jax.eval.select import select

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE = {"closed_new_near": 0.10, "closed_new_far": 0.05, "closed_old_near": 0.90,
        "closed_old_far": 0.80, "open_new_near": 0.95, "open_new_far": 0.85,
        "val_new": 0.20, "val_old": 0.90, "kl_to_base": 0.0}


def _point(step, val_new, val_old, near, far=None, kl=0.1):
    return {"step": step, "closed_new_near": near, "closed_new_far": near / 2 if far is None
            else far, "closed_old_near": 0.85, "closed_old_far": 0.75, "kl_to_base": kl,
            "val_new": val_new, "val_old": val_old}


def _method(description, curve, tests):
    """A method entry whose selected point is the select rule applied to ``curve``;
    ``tests`` maps step -> (near, far) test figures of that point."""
    sel = select(curve, BASE["val_old"], 0.05)
    pt = lambda p: _point(p["step"], p["val_new"], p["val_old"], *tests[p["step"]])
    return {"description": description, "qualifies": sel is not None,
            "selected": None if sel is None else pt(sel), "end": pt(curve[-1]), "extra": {}}


def _curve(*pts):
    return [{"step": s, "val_new": n, "val_old": o, "train_s": 0.5 * s} for s, n, o in pts]


def make_report(seed=0):
    curves = {
        # sleep: selected step 20 (gain 0.50, drop 0.03): dominates replay (gain 0.20, drop 0.04)
        "sleep": _curve((0, 0.20, 0.90), (10, 0.60, 0.88), (20, 0.70, 0.87), (30, 0.75, 0.80)),
        "replay": _curve((0, 0.20, 0.90), (10, 0.40, 0.86), (20, 0.45, 0.82)),
        # sft: OLD drop > 5 points at every step (the grown student starts below the base)
        "sft": _curve((0, 0.20, 0.80), (10, 0.80, 0.70), (20, 0.85, 0.60)),
    }
    tests = {"sleep": {0: (0.1, 0.05), 10: (0.5, 0.3), 20: (0.6, 0.4), 30: (0.65, 0.45)},
             "replay": {0: (0.1, 0.05), 10: (0.3, 0.2), 20: (0.35, 0.25)},
             "sft": {0: (0.1, 0.05), 10: (0.7, 0.5), 20: (0.8, 0.6)}}
    methods = {
        "sleep": _method("self-distillation into an expert slot", curves["sleep"],
                         tests["sleep"]),
        "replay": _method("SFT on memories with OLD replay", curves["replay"], tests["replay"]),
        "sft": _method("plain SFT of the full model on the memories", curves["sft"],
                       tests["sft"]),
    }
    methods["sleep"]["extra"] = {"gate_mean": 0.25}
    return {
        "seed": seed, "config": {"seed": seed, "steps": 30}, "model_config": {"embed": 32},
        "platform": "cpu", "max_old_drop": 0.05, "store_size": 4, "base": dict(BASE),
        "in_context": {"closed_new_near": 0.40, "closed_new_far": 0.30},
        "methods": methods, "curves": curves,
        "timing": {"sleep": {"step_s": 0.02, "compile_s": 3.0, "wall_s": 40.0},
                   "replay": {"step_s": 0.012, "compile_s": 2.0, "wall_s": 20.0},
                   "sft": {"step_s": 0.01, "compile_s": 1.5, "wall_s": 15.0}},
        "sft_step_s": 0.01,
        "method_configs": {"sleep": {"sleep": {"lr": 1e-3, "steps": 30}, "seeding": None}},
        "base_train_s": 12.0, "wall_s": 100.0,
    }


def _section(md: str, title: str) -> str:
    start = md.index(title)
    end = md.find("\n## ", start + 1)
    return md[start:end if end >= 0 else None]


def _table_row(section: str, method: str) -> str:
    rows = [ln for ln in section.splitlines() if ln.startswith(f"| {method} |")]
    assert len(rows) == 1, rows
    return rows[0]


def test_synthetic_report_is_built_as_intended():
    r = make_report()
    assert r["methods"]["sft"]["selected"] is None
    assert r["methods"]["sleep"]["selected"]["step"] == 20
    assert r["methods"]["replay"]["selected"]["step"] == 10


def test_write_report_files(tmp_path):
    r = make_report()
    rep.write_report(r, str(tmp_path))
    assert json.loads((tmp_path / "report.json").read_text()) == r
    for name in ("tradeoff.png", "curves.png", "walltime.png", "bars.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 1000, name
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_markdown_content(tmp_path):
    rep.write_report(make_report(), str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    for words in ("OLD", "NEW", "closed-book", "held-out TEST wordings", "validation",
                  "OLD drop** = base OLD minus OLD", "KL to base", "in-context",
                  "last 4 memories", "open book", "teacher's level"):
        assert words in md, words
    t1 = _section(md, "## 1. Selected checkpoint")
    nq = "does not qualify (OLD drop > 5 points at every step)"
    assert nq in _table_row(t1, "sft")
    assert nq not in _table_row(t1, "sleep") and nq not in _table_row(t1, "replay")
    # sleep selected at step 20: NEW near 60.0, val NEW 70.0, val OLD drop 3.0
    assert _table_row(t1, "sleep").startswith("| sleep | 20 | 60.0 | 40.0 | 85.0 | 75.0 |")
    assert _table_row(t1, "sleep").endswith("| 70.0 | 3.0 |")
    assert "in-context (last 4 memories) | — | 40.0 | 30.0 |" in t1
    assert "open book (teacher's level) | — | 95.0 | 85.0 |" in t1
    assert "**sleep dominates** on validation" in t1
    # end of budget: sft at step 20, drop 30 points, shown even though it does not qualify
    t2 = _section(md, "## 2. End of budget")
    assert _table_row(t2, "sft").startswith("| sft | 20 | 80.0 |")
    assert _table_row(t2, "sft").endswith("| 85.0 | 30.0 |")
    assert _table_row(t2, "sleep").startswith("| sleep | 30 |")
    t3 = _section(md, "## 3. Cost")
    assert "SFT step (LM loss) of the grown model" in t3 and "10.0 ms" in t3
    assert _table_row(t3, "sleep") == "| sleep | 20.0 | 2.00x | 3.0 | 15.0 | 40 |"
    assert "| replay | 12.0 | 1.20x |" in _table_row(t3, "replay")
    assert "| sft | 10.0 | 1.00x |" in _table_row(t3, "sft")
    methods = _section(md, "## Methods")
    assert "- **sleep**: self-distillation into an expert slot" in methods
    assert "gate_mean 0.25" in methods
    pts = _section(md, "## Validation trade-off points")
    assert "20*: +50.0 / 3.0" in _table_row(pts, "sleep")
    for png in ("tradeoff.png", "curves.png", "walltime.png", "bars.png"):
        assert f"({png})" in md


def test_no_sft_step_time():
    r = make_report()
    r["sft_step_s"] = None
    t3 = _section(rep.markdown(r), "## 3. Cost")
    assert "no SFT step time" in t3
    assert _table_row(t3, "sleep") == "| sleep | 20.0 | — | 3.0 | 15.0 | 40 |"


def test_domination_rule():
    r = make_report()
    assert rep.dominating(r) == "sleep"
    # replay loses less OLD than sleep (1 point < 3) with a smaller gain: nobody dominates
    r2 = copy.deepcopy(r)
    r2["methods"]["replay"]["selected"]["val_old"] = 0.89
    assert rep.dominating(r2) is None
    md = rep.markdown(r2)
    assert "**No method dominates** on validation" in md
    assert "dominates** on validation" not in md.replace("**No method dominates**", "")
    # equal gain, lower drop: dominates (strictly better in one)
    r3 = copy.deepcopy(r)
    r3["methods"]["replay"]["selected"].update(val_new=0.70, val_old=0.86)
    assert rep.dominating(r3) == "sleep"
    # identical points: a tie, nobody dominates
    r3["methods"]["replay"]["selected"]["val_old"] = 0.87
    assert rep.dominating(r3) is None
    # a method that does not qualify is dominated by one that does
    r4 = copy.deepcopy(r)
    del r4["methods"]["replay"]
    assert rep.dominating(r4) == "sleep"
    assert "only method that qualifies" in rep.markdown(r4)
    # one method alone: nothing to dominate
    r5 = copy.deepcopy(r4)
    del r5["methods"]["sft"]
    assert rep.dominating(r5) is None


def test_inconsistent_qualifies_is_rejected():
    r = make_report()
    r["methods"]["sft"]["qualifies"] = True
    with pytest.raises(ValueError, match="sft"):
        rep.markdown(r)


def test_method_colours():
    c = rep.method_colours(["a", "b", "c"])
    assert list(c) == ["a", "b", "c"]
    assert len(set(c.values())) == 3
    assert rep.method_colours(["a", "b", "c"]) == c  # deterministic
    assert rep.method_colours(["a"])["a"] == c["a"]  # by position in the order
    assert not set(c.values()) & set(rep.REFERENCE_COLOURS.values())
    assert len(set(rep.method_colours([str(i) for i in range(18)]).values())) == 18


def test_one_colour_per_method_in_every_plot():
    from matplotlib.colors import to_hex

    r = make_report()
    colours = rep.method_colours(list(r["methods"]))
    figs = rep.figures(r)
    assert set(figs) == set(rep.PLOT_FILES)
    seen = {m: set() for m in colours}
    for name, fig in figs.items():
        for ax in fig.axes:
            for line in ax.get_lines():
                if line.get_label() in colours:
                    seen[line.get_label()].add(to_hex(line.get_color()))
                    assert to_hex(line.get_color()) == colours[line.get_label()], name
            for cont in ax.containers:
                if cont.get_label() in colours:
                    for patch in cont.patches:
                        seen[cont.get_label()].add(to_hex(patch.get_facecolor()))
                        assert to_hex(patch.get_facecolor()) == colours[cont.get_label()]
    assert all(seen[m] == {colours[m]} for m in colours)
    bars = figs["bars.png"].axes[0]
    labels = [c.get_label() for c in bars.containers]
    assert "sft" not in labels and "sleep" in labels and "in-context" in labels
    assert "not qualifying, left out: sft" in bars.get_title()
    import matplotlib.pyplot as plt

    for fig in figs.values():
        plt.close(fig)


def test_summary_table_over_two_seeds():
    r0, r1 = make_report(0), make_report(1)
    # seed 1: sleep's selected NEW near 0.8 (seed 0: 0.6) -> mean 0.7, spread 0.1
    r1["methods"]["sleep"]["selected"]["closed_new_near"] = 0.8
    r1["base"]["closed_old_near"] = 0.70  # base mean 0.8, spread 0.1
    r1["in_context"]["closed_new_near"] = 0.2  # mean 0.3, spread 0.1
    # sft qualifies on seed 1 only, at step 10 with NEW near 0.5
    r1["methods"]["sft"]["selected"] = _point(10, 0.6, 0.87, 0.5)
    r1["methods"]["sft"]["qualifies"] = True
    r1["timing"]["sleep"]["step_s"] = 0.04  # cost 2x and 4x -> mean 3, spread 1
    text, data = rep.summary_table([r0, r1])
    json.dumps(data)  # JSON-able
    assert data["seeds"] == [0, 1]
    s = data["selected"]["sleep"]
    assert (s["n_seeds"], s["n_qualifying"]) == (2, 2)
    assert s["figures"]["closed_new_near"]["mean"] == pytest.approx(0.7)
    assert s["figures"]["closed_new_near"]["spread"] == pytest.approx(0.1)
    assert s["figures"]["val_old_drop"]["mean"] == pytest.approx(0.03)
    sft = data["selected"]["sft"]
    assert (sft["n_seeds"], sft["n_qualifying"]) == (2, 1)
    assert sft["figures"]["closed_new_near"] == pytest.approx({"mean": 0.5, "spread": 0.0})
    assert sft["figures"]["step"]["mean"] == pytest.approx(10)
    assert data["end"]["sft"]["figures"]["closed_new_near"]["mean"] == pytest.approx(0.8)
    assert data["base"]["closed_old_near"] == pytest.approx({"mean": 0.8, "spread": 0.1})
    assert data["in_context"]["closed_new_near"] == pytest.approx({"mean": 0.3, "spread": 0.1})
    assert data["open_book"]["open_new_near"] == pytest.approx({"mean": 0.95, "spread": 0.0})
    assert data["step_cost_x_sft"]["sleep"] == pytest.approx({"mean": 3.0, "spread": 1.0})
    sel = text[text.index("## Selected checkpoint"):text.index("## End of budget")]
    assert _table_row(sel, "sleep").startswith("| sleep | 2/2 | 20 ± 0 | 70.0 ± 10.0 |")
    assert _table_row(sel, "sft").startswith("| sft | 1/2 | 10 ± 0 | 50.0 ± 0.0 |")
    assert "qualifying seeds only" in sel
    assert "| base (before sleep) | 2/2 |" in sel and "| in-context | 2/2 | — | 30.0 ± 10.0 |" \
        in sel and "| open book (teacher's level) | 2/2 | — | 95.0 ± 0.0 |" in sel
    end = text[text.index("## End of budget"):text.index("## Step cost")]
    assert _table_row(end, "sft").startswith("| sft | 2/2 | 20 ± 0 | 80.0 ± 0.0 |")
    assert "| sleep | 3.00x ± 1.00 |" in text
    # seed 1: sft (gain 40, drop 3 points) is dominated by sleep (gain 50, drop 3)
    assert data["dominating"] == {"0": "sleep", "1": "sleep"}


def test_summary_table_never_qualifying_and_one_seed():
    text, data = rep.summary_table([make_report(0)])
    assert data["selected"]["sft"] == {"n_seeds": 1, "n_qualifying": 0, "figures": None}
    assert _table_row(text[:text.index("## End of budget")], "sft").startswith(
        "| sft | 0/1 | — | — |")
    assert "±" not in text
    r1 = make_report(1)
    r1["max_old_drop"] = 0.1
    with pytest.raises(ValueError, match="max_old_drop"):
        rep.summary_table([make_report(0), r1])
