"""Checkpoint selection on validation (sleep_jax/eval/select.py), against hand-worked curves."""

import numpy as np
import pytest

from sleep_jax.eval.select import BestCheckpoint, select


def curve(*points):
    return [{"step": s, "val_new": n, "val_old": o} for s, n, o in points]


BASE_OLD = 0.90


def test_best_new_among_points_within_five_points_of_old():
    c = curve((0, 0.05, 0.90), (50, 0.40, 0.88), (100, 0.60, 0.84), (150, 0.70, 0.80))
    # step 150 has the best NEW but drops 10 points; step 100 drops 6; step 50 drops 2
    assert select(c, BASE_OLD)["step"] == 50
    assert select(c, BASE_OLD, max_old_drop=0.06)["step"] == 100
    assert select(c, BASE_OLD, max_old_drop=0.5)["step"] == 150


def test_exactly_five_points_qualifies_despite_float_rounding():
    c = curve((0, 0.0, 0.90), (10, 0.3, 0.90 - 0.05))  # 0.85 is not exact in binary
    assert select(c, BASE_OLD)["step"] == 10


def test_a_method_over_the_drop_at_every_step_does_not_qualify():
    c = curve((10, 0.5, 0.80), (20, 0.7, 0.70))
    assert select(c, BASE_OLD) is None


def test_ties_go_to_the_earliest_step_and_step_zero_can_win():
    c = curve((0, 0.10, 0.90), (50, 0.30, 0.89), (100, 0.30, 0.90))
    assert select(c, BASE_OLD)["step"] == 50
    c = curve((0, 0.10, 0.90), (50, 0.05, 0.90))
    assert select(c, BASE_OLD)["step"] == 0  # never better than its start


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="empty curve"):
        select([], BASE_OLD)
    with pytest.raises(ValueError, match="lacks"):
        select([{"step": 0, "val_new": 0.1}], BASE_OLD)
    with pytest.raises(ValueError, match="max_old_drop"):
        select(curve((0, 0.1, 0.9)), BASE_OLD, max_old_drop=-0.1)


def test_online_selection_keeps_the_selected_points_parameters():
    c = curve((0, 0.05, 0.90), (50, 0.40, 0.88), (100, 0.60, 0.80), (150, 0.45, 0.86))
    best = BestCheckpoint(BASE_OLD)
    became = []
    for r in c:
        params = {"w": np.full((2,), float(r["step"]))}
        became.append(best.update(r["step"], {k: r[k] for k in ("val_new", "val_old")},
                                  params))
    assert became == [True, True, False, True]
    assert best.record == select(c, BASE_OLD) and best.record["step"] == 150
    np.testing.assert_array_equal(best.params["w"], [150.0, 150.0])
    none = BestCheckpoint(BASE_OLD)
    assert not none.update(10, {"val_new": 0.9, "val_old": 0.1}, {"w": np.zeros(1)})
    assert not none.qualifies and none.params is None


def test_the_kept_parameters_are_a_host_copy():
    """The kept arrays own their memory: a view of the device buffer (what device_get gives
    on CPU) would pin the train state's buffer, so the next donating step could not reuse it,
    and would read whatever that buffer later holds if it were reused."""
    import jax.numpy as jnp

    best = BestCheckpoint(BASE_OLD)
    x = jnp.arange(4.0)
    assert best.update(0, {"val_new": 0.1, "val_old": 0.9}, {"w": x})
    assert best.params["w"].flags.owndata and best.params["w"].flags.writeable
    np.testing.assert_array_equal(best.params["w"], [0.0, 1.0, 2.0, 3.0])
