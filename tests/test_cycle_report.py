"""Cycle report on synthetic matrices: json round trip, md numbers (hand-computed), PNGs valid,
curves equal to the metrics of the matrix prefixes (by hand on a 3 x 2 matrix)."""

import json
import math
import os
import struct

import pytest

from sleep_jax.eval import cycle_report as cr
from sleep_jax.eval import matrix as mx

nan = math.nan

SLEEP = {  # set 1 rises after its cycle; set 3 not measured before cycle 3 (missing, not 0)
    "matrix": [[0.10, 0.20, nan],
               [0.60, 0.30, nan],
               [0.80, 0.70, None],
               [0.50, 0.40, 0.90]],
    "kl_to_base": [0.01, 0.02, 0.04],
    "time_s": [10.0, 12.0, None],
    "old": [0.9, 0.85, None, 0.75],
    "open_book": [0.6, None, 0.9],
}
TINY = {"matrix": [[0.1, 0.2], [0.6, 0.3], [0.5, 0.9]], "kl_to_base": [0.5, None],
        "time_s": [3.0, 5.0]}


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def test_write_report_round_trip_md_and_pngs(tmp_path):
    report = cr.build({"sleep + dream": SLEEP, "sft replay": TINY})
    paths = cr.write_report(report, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        ["report.json", "report.md", "matrix_sleep_dream.png", "matrix_sft_replay.png",
         "cycle_curves.png"])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    # json round trip carries every figure; missing ones are null
    back = json.load(open(tmp_path / "report.json"))
    assert back == report
    s = back["methods"]["sleep + dream"]
    assert s["matrix"][2] == [0.8, 0.7, None] and s["time_s"] == [10.0, 12.0, None]
    # hand-computed: ACC (.5+.4+.9)/3; BWT ((.5-.6)+(.4-.7))/2; FWT only set 2: .3-.2 (set 3's
    # pair is missing); forgetting ((.8-.5)+(.7-.4))/2; LA (.6+.7+.9)/3; time mean(10, 12)
    want = {"acc": 0.6, "bwt": -0.2, "fwt": 0.1, "forgetting": 0.3,
            "learning_acc": 2.2 / 3, "final_kl": 0.04, "time_per_cycle_s": 11.0,
            "old_before": 0.9, "old_after": 0.75, "open_book": 0.75}
    assert s["summary"] == pytest.approx(want)
    assert s["curves"]["old"] == [0.85, None, 0.75]
    t = back["methods"]["sft replay"]["summary"]
    assert t["final_kl"] is None and t["time_per_cycle_s"] == 4.0
    assert t["old_before"] is None and t["old_after"] is None  # not given: not measured
    assert t["open_book"] is None

    md = open(tmp_path / "report.md").read()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| s")}
    assert rows["sleep + dream"] == ["3", "0.6000", "-0.2000", "+0.1000", "0.3000", "0.7333",
                                     "0.7500", "0.900", "0.750", "0.04", "11.0"]
    # tiny: ACC (.5+.9)/2, BWT .5-.6, FWT R[1,2]-R[0,2] = .3-.2, forgetting .6-.5, LA (.6+.9)/2
    assert rows["sft replay"] == ["2", "0.7000", "-0.1000", "+0.1000", "0.1000", "0.7500",
                                  "-", "-", "-", "-", "4.0"]
    assert "| after cycle 2 | 0.800 | 0.700 | - |" in md
    assert "| before any sleep | 0.100 | 0.200 | - |" in md
    assert "![sleep + dream accuracy matrix](matrix_sleep_dream.png)" in md

    import matplotlib.image

    for f in ("matrix_sleep_dream.png", "matrix_sft_replay.png", "cycle_curves.png"):
        w, h = _png_size(tmp_path / f)
        assert 300 <= w <= 2000 and 250 <= h <= 1500, (f, w, h)
        img = matplotlib.image.imread(tmp_path / f)
        assert img.shape[:2] == (h, w) and img.std() > 0.05   # decodes, not a blank canvas


def test_curves_are_the_metrics_of_the_prefixes():
    e = cr.method_entry("tiny", TINY)
    # by hand: after cycle 1 ACC = R[1,1] = .6, BWT undefined; after cycle 2 ACC (.5+.9)/2,
    # BWT .5-.6
    assert e["curves"]["acc"] == pytest.approx([0.6, 0.7])
    assert e["curves"]["bwt"][0] is None and e["curves"]["bwt"][1] == pytest.approx(-0.1)
    assert e["curves"]["kl_to_base"] == [0.5, None]
    s = cr.method_entry("sleep", SLEEP)
    for k in (1, 2, 3):
        p = mx.prefix(SLEEP["matrix"], k)
        assert s["curves"]["acc"][k - 1] == pytest.approx(mx.average_accuracy(p))
        b = mx.backward_transfer(p)
        assert (s["curves"]["bwt"][k - 1] is None) if math.isnan(b) else (
            s["curves"]["bwt"][k - 1] == pytest.approx(b))


def test_bad_input_and_file_names():
    with pytest.raises(ValueError, match="'m': kl_to_base has 2 entries.*T = 3"):
        cr.build({"m": {**SLEEP, "kl_to_base": [0.1, 0.2]}})
    with pytest.raises(ValueError, match="'m': time_s after cycle 2 is -1.0"):
        cr.build({"m": {**SLEEP, "time_s": [1.0, -1.0, 1.0]}})
    with pytest.raises(ValueError, match="'m' has no 'time_s'"):
        cr.build({"m": {"matrix": SLEEP["matrix"], "kl_to_base": [0, 0, 0]}})
    with pytest.raises(ValueError, match="row k=1, column j=1"):
        cr.build({"m": {**SLEEP, "matrix": [[0.1, 0.2, 0.3], [2.0, 0, 0], [0] * 3, [0] * 3]}})
    with pytest.raises(ValueError, match="no methods"):
        cr.build({})
    assert cr.png_names(["a b", "a_b", "///"]) == {
        "a b": "matrix_a_b.png", "a_b": "matrix_a_b_2.png", "///": "matrix_method.png"}
