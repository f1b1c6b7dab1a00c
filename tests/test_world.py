"""The synthetic knowledge world: determinism, unique names, held-out and seeding wordings."""

import json

import pytest

from sleep_jax.data import world
from sleep_jax.data.tokenizers import special_ids, word_level_tokenizer


@pytest.fixture(scope="module")
def w():
    return world.make_world(seed=0)


def _records(wd):
    return (wd.memory_records("old"), wd.memory_records("new"),
            [q.question + q.answer for q in wd.qa("new", "far")], wd.rc_items(5, 1),
            wd.general_text(5, 1))


def test_deterministic_by_seed_and_sizes(w):
    assert _records(world.make_world(seed=0)) == _records(w)
    assert _records(world.make_world(seed=1)) != _records(w)
    assert len(w.old) == 200 and len(w.new) == 40  # the demo's defaults
    small = world.make_world(seed=0, n_old=7, n_new=3)
    assert [e.id for e in small.old] == [f"old-{i:03d}" for i in range(7)]
    assert [e.id for e in small.new] == ["new-000", "new-001", "new-002"]
    with pytest.raises(ValueError, match="n_old and n_new must be >= 0"):
        world.make_world(0, n_old=-1)
    with pytest.raises(ValueError, match="unknown split 'mid'"):
        w.entities("mid")


def test_names_unique_and_made_of_syllables(w):
    names = [e.syllables for e in w.old + w.new]
    assert len(set(names)) == len(names) == 240
    template_words = world._template_words()
    for syl in names:
        assert 3 <= len(syl) <= 4
        assert all(s in world.SYLLABLES and s not in template_words for s in syl)
    fresh = w.fresh_entities(300, seed=5)
    assert not {e.syllables for e in fresh} & set(names)
    assert len({e.syllables for e in fresh}) == 300


def test_attributes_passages_and_questions(w):
    e = w.new[0]
    assert set(e.attributes) == set(world.ATTRIBUTES)
    for a in world.ATTRIBUTES:
        assert e.attributes[a] in world.VALUES[a]
    for t in range(3):
        p = world.passage(e, t)
        assert e.name in p and all(v in p.split() or v + "." in p.split() or v + "," in p.split()
                                   for v in e.attributes.values())
    assert w.passages("new") == [world.passage(x) for x in w.new]
    assert len(w.passages("old", all_templates=True)) == 600
    assert len(w.qa("new", "train")) == 40 * 4 * 3
    assert len(w.qa("new", "near")) == len(w.qa("new", "far")) == 40 * 4
    for q in w.qa("new", "far"):
        ent = w.entity(q.memory_id)
        assert q.question.startswith(ent.name + " ")  # far: the name first
        assert q.answer == ent.attributes[q.attribute] and q.passage == world.passage(ent)


def _words(t):
    return t.split()


def test_held_out_wordings_never_equal_train_and_near_is_one_word_away():
    for a, per in world.QUESTION_TEMPLATES.items():
        train = set(per["train"])
        for w_ in ("near", "far"):
            assert not set(per[w_]) & train, (a, w_)
        for near in per["near"]:
            one_word = [t for t in train if len(_words(t)) == len(_words(near))
                        and sum(x != y for x, y in zip(_words(t), _words(near))) == 1]
            assert one_word, f"{a}: near wording {near!r} is not one word from a train wording"
        for far in per["far"]:
            assert far.startswith("{name} ") and not any(t.startswith("{name}") for t in train)
    # and rendered: no evaluation question of any entity is a training question
    wd = world.make_world(seed=3, n_old=20, n_new=10)
    train_q = {q.question for s in ("old", "new") for q in wd.qa(s, "train")}
    eval_q = {q.question for s in ("old", "new") for w_ in ("near", "far") for q in wd.qa(s, w_)}
    assert train_q and eval_q and not train_q & eval_q
    # reading comprehension (base training) uses TRAIN wordings only
    rc_templates = {it.question.replace(_name_in(it.question), "{name}")
                    for it in wd.rc_items(200, 0)}
    all_train = {t for per in world.QUESTION_TEMPLATES.values() for t in per["train"]}
    assert len(rc_templates) > 6 and rc_templates <= all_train


def _name_in(q):
    syl = [x for x in q.rstrip("?").split() if x in world.SYLLABLES]
    return " ".join(syl)


def test_seeding_templates_disjoint_from_evaluation():
    seeding, evaluation = world.template_sets()
    assert len(seeding) == len(world.SEEDING_TEMPLATES) and len(evaluation) == 8
    assert not seeding & evaluation
    wd = world.make_world(seed=0, n_old=30, n_new=10)
    eval_q = {q.question for s in ("old", "new") for w_ in ("near", "far") for q in wd.qa(s, w_)}
    prompts = {p for s in ("old", "new") for _, p in wd.seeding_prompts(s)}
    assert len(prompts) == 40 * len(world.SEEDING_TEMPLATES)
    assert not prompts & eval_q


def test_rc_items_answer_from_context_with_distractors(w):
    items = w.rc_items(50, seed=2, n_passages=3)
    assert len(items) == 50
    assert items == w.rc_items(50, seed=2, n_passages=3)
    assert items != w.rc_items(50, seed=3, n_passages=3)
    names = {e.name for e in w.old + w.new}
    for it in items:
        name = _name_in(it.question)
        assert name not in names and it.context.count(".") >= 3
        assert name in it.context and it.answer in it.context
        assert it.answer in world.VALUES[it.attribute]
    with pytest.raises(ValueError, match="n_passages must be >= 1"):
        w.rc_items(1, 0, n_passages=0)


def test_tokenizer_covers_every_text(w):
    tok = word_level_tokenizer(world.vocabulary_corpus())
    unk = special_ids(tok)["unk"]
    assert tok.get_vocab_size() < 260
    texts = (w.passages("old", all_templates=True)[:30] + w.passages("new")
             + [world.closed_book_prompt(q.question) + " " + q.answer
                for wd in world.WORDINGS for q in w.qa("new", wd)]
             + [world.open_book_prompt(it.context, it.question)
                for it in w.rc_items(20, 0, n_passages=2)]
             + w.general_text(50, 0) + [p for _, p in w.seeding_prompts("new")])
    for t in texts:
        enc = tok.encode(t)
        assert unk not in enc.ids, t
        assert tok.decode(enc.ids) == t
    # every attribute value is a single token
    for vals in world.VALUES.values():
        for v in vals:
            assert len(tok.encode(v).ids) == 1, v


def test_jsonl_records_and_export(w, tmp_path):
    mems = w.memory_records("new")
    assert mems[0] == {"id": "new-000", "text": world.passage(w.new[0])}
    probes = w.probe_records("new", "near")
    ids = {m["id"] for m in mems}
    assert all(set(p) == {"memory_id", "question", "answers"} and p["memory_id"] in ids
               for p in probes)
    paths = w.export_jsonl(tmp_path, "new")
    lines = open(paths["memories"]).read().splitlines()
    assert [json.loads(x) for x in lines] == mems
    assert [json.loads(x) for x in open(paths["far"]).read().splitlines()] == \
        w.probe_records("new", "far")
