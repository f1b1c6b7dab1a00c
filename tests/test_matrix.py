"""Accuracy-matrix metrics ((T+1) x T layout) against SEAL's published figures and hand-computed
values, missing entries as missing, and the errors."""

import math

import numpy as np
import pytest

from sleep_jax.eval import matrix

nan = math.nan

# SEAL (Zweiger et al. 2025, arXiv 2506.10943), results/continual_self_edits/
# overall_results.json, model iter2: rows[k] = no-context QA accuracy on passages 1..8 after k
# edits (row 0: before any edit); None = passage not yet edited (not measured). Copied from
# ../shared/data/seal_continual_matrix.json (the tests must not read ../shared).
SEAL_ROWS = [
    [0.331, 0.321, 0.276, 0.326, 0.33, 0.337, 0.287, 0.253],
    [0.383, None, None, None, None, None, None, None],
    [0.364, 0.499, None, None, None, None, None, None],
    [0.288, 0.434, 0.446, None, None, None, None, None],
    [0.272, 0.365, 0.366, 0.44, None, None, None, None],
    [0.235, 0.295, 0.281, 0.354, 0.376, None, None, None],
    [0.233, 0.287, 0.222, 0.278, 0.359, 0.449, None, None],
    [0.186, 0.229, 0.218, 0.246, 0.281, 0.356, 0.385, None],
    [0.189, 0.219, 0.164, 0.237, 0.221, 0.275, 0.335, 0.34],
]


def test_seal_published_figures():
    m = matrix.continual_metrics(SEAL_ROWS)
    # SEAL's expected figures, tolerance 1e-4 as published
    assert m["acc"] == pytest.approx(0.2475, abs=1e-4)
    assert m["bwt"] == pytest.approx(-0.1911, abs=1e-4)
    assert m["forgetting"] == pytest.approx(0.1911, abs=1e-4)
    # SEAL's own definitions, recomputed here: forgetting's max runs over k = p..7 only
    acc = sum(SEAL_ROWS[8]) / 8
    bwt = sum(SEAL_ROWS[8][p - 1] - SEAL_ROWS[p][p - 1] for p in range(1, 8)) / 7
    fgt = sum(max(SEAL_ROWS[k][p - 1] for k in range(p, 8)) - SEAL_ROWS[8][p - 1]
              for p in range(1, 8)) / 7
    assert (m["acc"], m["bwt"], m["forgetting"]) == pytest.approx((acc, bwt, fgt), abs=1e-12)
    # R[p-1, p] is never measured for p >= 2: no FWT term; LA over the diagonal
    assert math.isnan(m["fwt"])
    diag = [SEAL_ROWS[p][p - 1] for p in range(1, 9)]
    assert m["learning_acc"] == pytest.approx(sum(diag) / 8)


# set 1 rises after its own cycle (0.60 -> 0.80), so forgetting (0.30) differs from -BWT (0.20)
RISE = [
    [0.10, 0.20, 0.00],
    [0.60, 0.30, 0.10],
    [0.80, 0.70, 0.20],
    [0.50, 0.40, 0.90],
]


def test_rise_above_diagonal_hand_computed():
    m = matrix.continual_metrics(RISE)
    assert m["acc"] == pytest.approx((0.50 + 0.40 + 0.90) / 3)
    assert m["bwt"] == pytest.approx(((0.50 - 0.60) + (0.40 - 0.70)) / 2)          # -0.20
    assert m["forgetting"] == pytest.approx(((0.80 - 0.50) + (0.70 - 0.40)) / 2)   # 0.30
    assert m["forgetting"] != pytest.approx(-m["bwt"])
    assert m["fwt"] == pytest.approx(((0.30 - 0.20) + (0.20 - 0.00)) / 2)          # 0.15
    assert m["learning_acc"] == pytest.approx((0.60 + 0.70 + 0.90) / 3)
    assert matrix.average_accuracy(np.asarray(RISE)) == m["acc"]


# every set measured after every cycle: FWT = R[1, 2] - R[0, 2] = 0.10 - 0.40 (learning set 1
# hurt set 2 before it was learned). Row 0's 0.95 on set 1 is not an after-learning stage, so
# forgetting is 0.90 - 0.70, not 0.95 - 0.70.
FWT = [
    [0.95, 0.40],
    [0.90, 0.10],
    [0.70, 0.80],
]


def test_forward_transfer_hand_computed():
    assert matrix.forward_transfer(FWT) == pytest.approx(-0.30)
    assert matrix.backward_transfer(FWT) == pytest.approx(-0.20)
    assert matrix.forgetting(FWT) == pytest.approx(0.20)
    assert matrix.average_accuracy(FWT) == pytest.approx(0.75)
    assert matrix.learning_accuracy(FWT) == pytest.approx(0.85)


def test_missing_entries_are_missing_not_zero():
    r = [
        [0.10, 0.20, nan],
        [0.60, None, 0.10],
        [nan, 0.70, nan],
        [0.50, nan, 0.90],
    ]
    m = matrix.continual_metrics(r)
    assert m["acc"] == pytest.approx((0.50 + 0.90) / 2)          # not (0.5 + 0 + 0.9) / 3
    assert m["bwt"] == pytest.approx(0.50 - 0.60)                 # set 2's pair is incomplete
    assert m["forgetting"] == pytest.approx(0.60 - 0.50)          # max over the present 0.60
    assert math.isnan(m["fwt"])                                    # R[1,2], R[2,3] missing
    assert m["learning_acc"] == pytest.approx((0.60 + 0.70 + 0.90) / 3)
    with pytest.raises(ValueError, match="define fwt"):
        matrix.require(m)
    assert matrix.require(m, "acc", "bwt") is m

    # a set never measured after an earlier cycle has no forgetting term
    r = [
        [nan, nan, nan],
        [0.60, nan, nan],
        [0.40, nan, nan],
        [0.30, 0.50, 0.80],
    ]
    m = matrix.continual_metrics(r)
    assert m["acc"] == pytest.approx((0.30 + 0.50 + 0.80) / 3)
    assert m["bwt"] == pytest.approx(0.30 - 0.60)
    assert m["forgetting"] == pytest.approx(0.60 - 0.30)
    assert m["learning_acc"] == pytest.approx((0.60 + 0.80) / 2)
    assert math.isnan(m["fwt"])

    # nothing measured after the last cycle: ACC, BWT, forgetting undefined
    m = matrix.continual_metrics([[0.1, 0.1], [0.5, 0.2], [nan, nan]])
    assert [math.isnan(m[k]) for k in matrix.METRICS] == [True, True, False, True, False]
    with pytest.raises(ValueError, match="acc, bwt, forgetting"):
        matrix.require(m, "acc", "bwt", "forgetting")


def test_single_cycle_and_curve_hand_computed():
    m = matrix.continual_metrics([[0.2], [0.7]])
    assert m["acc"] == 0.7 and m["learning_acc"] == 0.7
    assert all(math.isnan(m[k]) for k in ("bwt", "fwt", "forgetting"))
    r = [[0.1, 0.2], [0.6, 0.3], [0.5, 0.9]]
    assert matrix.prefix(r, 1).tolist() == [[0.1], [0.6]]
    assert matrix.curve(r, matrix.average_accuracy) == pytest.approx([0.6, 0.7])
    bwt = matrix.curve(r, matrix.backward_transfer)
    assert math.isnan(bwt[0]) and bwt[1] == pytest.approx(-0.1)


def test_errors_name_the_entry():
    with pytest.raises(ValueError, match=r"\(T\+1\) x T.*\(3, 3\)"):
        matrix.average_accuracy(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\(T\+1\) x T.*\(1, 0\)"):
        matrix.average_accuracy(np.zeros((1, 0)))
    bad = np.array(RISE)
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"row k=2, column j=2 .*inf"):
        matrix.backward_transfer(bad)
    bad[2, 1] = 1.5
    with pytest.raises(ValueError, match=r"row k=2, column j=2 .*1\.5"):
        matrix.forgetting(bad)
    bad[2, 1], bad[0, 2] = 0.5, -0.1
    with pytest.raises(ValueError, match=r"row k=0, column j=3 .*-0\.1"):
        matrix.continual_metrics(bad)
    with pytest.raises(ValueError, match="prefix k=4"):
        matrix.prefix(RISE, 4)
