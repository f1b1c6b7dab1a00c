"""QA scores and accuracy-matrix metrics against hand-computed values."""

import numpy as np
import pytest

from sleep_jax.eval import matrix, qa


def test_normalize_answer():
    assert qa.normalize_answer("  The Quito!  ") == "quito"
    assert qa.normalize_answer("an Apple, a pear") == "apple pear"
    assert qa.normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert qa.normalize_answer("1,918.") == "1918"


def test_exact_match_max_over_golds():
    assert qa.exact_match("the Baker.", ["baker"]) == 1.0
    assert qa.exact_match("baker", ["potter", "a baker"]) == 1.0
    assert qa.exact_match("baker potter", ["baker"]) == 0.0
    assert qa.exact_match("", [""]) == 1.0


def test_f1_hand_computed():
    # pred {cat, sat}, gold {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3
    assert qa.f1_score("The cat sat", ["a cat sat on the mat"]) == pytest.approx(2 / 3)
    # pred {red, red, blue}, gold {red, blue, blue, green}: common = red 1 + blue 1 = 2,
    # P = 2/3, R = 2/4, F1 = 2 * (2/3)(1/2) / (2/3 + 1/2) = 4/7
    assert qa.f1_score("red red blue", ["red blue blue green"]) == pytest.approx(4 / 7)
    # max over golds: 0 against "rome"; against "lima" P = 1/2, R = 1, F1 = 2/3
    assert qa.f1_score("oslo lima", ["rome", "lima"]) == pytest.approx(2 / 3)
    assert qa.f1_score("", ["lima"]) == 0.0
    assert qa.f1_score("the", [""]) == 1.0  # both normalise to empty


def test_score_means_and_errors():
    out = qa.score(["lima", "the rome", "red blue"], [["lima"], ["oslo"], ["blue"]])
    assert out["n"] == 3
    assert out["em"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert qa.score([], []) == {"em": 0.0, "f1": 0.0, "n": 0}
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        qa.score(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="wrap it"):
        qa.exact_match("lima", "lima")
    with pytest.raises(ValueError, match="golds is empty"):
        qa.f1_score("lima", [])


R = np.array([
    [0.90, 0.10, 0.00],
    [0.95, 0.80, 0.20],
    [0.50, 0.70, 0.95],
])


def test_matrix_metrics_hand_computed():
    assert matrix.average_accuracy(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    # BWT: ((0.50 - 0.90) + (0.70 - 0.80)) / 2
    assert matrix.backward_transfer(R) == pytest.approx(-0.25)
    # forgetting: task 0 best earlier 0.95 -> 0.50 (0.45); task 1 best 0.80 -> 0.70 (0.10)
    assert matrix.forgetting(R) == pytest.approx(0.275)
    # FWT: ((R[0,1] - 0.1) + (R[1,2] - 0.1)) / 2
    assert matrix.forward_transfer(R, [0.1, 0.1, 0.1]) == pytest.approx(0.05)
    assert matrix.learning_accuracy(R) == pytest.approx((0.90 + 0.80 + 0.95) / 3)
    m = matrix.continual_metrics(R.tolist(), baseline=[0.1, 0.1, 0.1])
    assert set(m) == {"acc", "bwt", "forgetting", "learning_acc", "fwt"}
    assert m["forgetting"] == pytest.approx(0.275)


def test_matrix_single_task_and_errors():
    assert matrix.continual_metrics([[0.7]]) == {
        "acc": 0.7, "bwt": 0.0, "forgetting": 0.0, "learning_acc": 0.7}
    with pytest.raises(ValueError, match="square"):
        matrix.average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        matrix.backward_transfer([[1.0, np.nan], [0.0, 1.0]])
    with pytest.raises(ValueError, match="one accuracy per task"):
        matrix.forward_transfer(R, [0.1, 0.1])
