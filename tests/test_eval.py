"""QA scores against hand-computed values (accuracy-matrix metrics: tests/test_matrix.py)."""

import pytest

from sleep_jax.eval import qa


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
    # contains: "lima" yes, "the rome" vs "oslo" no, "red blue" holds "blue"
    assert out["contains"] == pytest.approx(2 / 3)
    assert qa.contains_match("He lives in the town of Saltcombe.", ["saltcombe"]) == 1.0
    assert qa.contains_match("Saltcombes", ["Saltcombe"]) == 0.0  # whole words only
    assert qa.contains_match("new york city", ["York City"]) == 1.0
    assert qa.contains_match("anything", [""]) == 0.0  # an empty gold matches nothing
    assert qa.score([], []) == {"em": 0.0, "f1": 0.0, "contains": 0.0, "n": 0}
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        qa.score(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="wrap it"):
        qa.exact_match("lima", "lima")
    with pytest.raises(ValueError, match="golds is empty"):
        qa.f1_score("lima", [])



def test_answers_compile_once_for_a_model_and_its_one_device_mesh_copy(tiny_cfg):
    """probes.answer on a model and on a copy whose arrays carry a one-device mesh (as a model
    trained under a mesh does): the same answers from one compiled program (the mesh is not a
    reason to compile the evaluation again)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from sleep_jax.data.tokenizers import word_level_tokenizer
    from sleep_jax.eval import probes
    from sleep_jax.mesh import make_mesh
    from sleep_jax.models import create_model

    tok = word_level_tokenizer(["where does ann live ?", "bob lives in oslo ."])
    model = create_model(tiny_cfg, seed=3)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    graphdef, state = nnx.split(model)
    meshed = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
    leaf = jax.tree.leaves(nnx.state(meshed))[0]
    assert isinstance(leaf.sharding, NamedSharding)  # the case this test is about
    prompts = ["where does ann live ?", "bob lives in", "oslo"]
    kw = dict(bos_id=1, eos_id=2, pad_id=0, max_new_tokens=3)
    before = probes._greedy._cache_size()
    a = probes.answer(model, tok, prompts, **kw)
    b = probes.answer(meshed, tok, prompts, **kw)
    assert a == b and len(a) == 3
    assert probes._greedy._cache_size() == before + 1


def test_cut_answer_keeps_the_first_line_or_sentence():
    from sleep_jax.eval.qa import cut_answer, exact_match

    long = "Paris.\nQuestion: what is the capital of Peru? Answer: Lima"
    assert cut_answer(long, "none") == long
    assert cut_answer(long, "line") == "Paris."
    assert cut_answer(long, "sentence") == "Paris."
    assert cut_answer("\nParis is big. Rome too", "sentence") == "Paris is big."
    assert cut_answer("it costs 3.5 euros. then", "sentence") == "it costs 3.5 euros."
    assert cut_answer("who knows? maybe", "sentence") == "who knows?"
    assert cut_answer("oslo", "sentence") == "oslo"  # no end: all of it
    assert cut_answer("", "line") == ""
    # scored on the cut: a correct answer that goes on is no longer a miss
    assert exact_match(long, ["Paris"]) == 0.0
    assert exact_match(cut_answer(long), ["Paris"]) == 1.0
    with pytest.raises(ValueError, match="allowed"):
        cut_answer("x", "word")
