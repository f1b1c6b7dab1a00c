"""The synthetic knowledge world: determinism, unique names, held-out and seeding wordings, and
world v2 (validation and task wordings, the TASK split, multi-passage reading comprehension,
dreaming prompts and examples, the NEW memory stream)."""

import hashlib
import json
import re

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
             + w.passages("task", all_templates=True)
             + [world.closed_book_prompt(q.question) + " " + q.answer
                for split, wds in world.SPLIT_WORDINGS.items() for wd in wds
                for q in w.qa(split, wd)]
             + [world.open_book_prompt(it.context, it.question)
                for it in w.rc_items(20, 0, n_passages=2)]
             + [world.open_book_prompt(it.context, it.question) + " " + it.answer
                for it in w.rc_items(20, 0, n_passages=1, max_passages=5)]
             + [p + t for p, t in w.dream_examples(60, 0)]
             + [r["text"] for r in w.stream_records(10)]
             + w.general_text(50, 0) + [p for _, p in w.seeding_prompts("new")])
    assert {q.wording for split in world.SPLITS for wd in world.SPLIT_WORDINGS[split]
            for q in w.qa(split, wd)} == set(world.WORDINGS)  # every wording was encoded
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


# ------------------------------------------------------------------------------ world v2
def _edit_distance(a, b):
    """Word-level Levenshtein distance between two templates (whitespace-separated words)."""
    a, b = a.split(), b.split()
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def _template_word_set(templates):
    return {x for t in templates for x in re.findall(r"[a-z0-9]+", re.sub(r"\{\w+\}", " ", t))}


def _text_words(texts):
    return {x for t in texts for x in re.findall(r"[a-z0-9]+", t)}


def _entity_rows(entities):
    return [[e.id, e.name, e.attributes, e.template] for e in entities]


def _sha(obj):
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def test_v2_keeps_every_v1_figure_and_adds_task_entities(w):
    # world v1 (before TASK entities and the new templates), seed 0 defaults: OLD/NEW entities,
    # the demo's reading comprehension call, 3-passage items and general text are unchanged
    assert world.SYLLABLES[:3] == ("ba", "be", "bi") and len(world.SYLLABLES) == 67
    assert _sha(_entity_rows(w.old + w.new)) == \
        "d6b33c1bb5f0bd957625f0c9d1ccfa7128416f93ad11115b4c0d4b3763e00fa2"
    assert _sha([[r.context, r.question, r.answer, r.attribute] for r in w.rc_items(3000, 1)]) \
        == "7f64971a5741955a72910b9307a382120f5d2bec395c80c0159e7322a7f8cc0e"
    assert _sha([[r.context, r.question, r.answer, r.attribute]
                 for r in w.rc_items(50, 2, n_passages=3)]) == \
        "1223fbc8971196c2c3d783ae6ddd33a00ee746c2838686d028aa133488d78d34"
    assert _sha(w.general_text(200, 1)) == \
        "b3b293d5e02986beb4c32e3756bf5608934a1b2bbf768095f03f32a1fa6086e0"
    assert (w.old[0].name, w.new[0].name) == ("pu ne gu ke", "vo ri fu")
    # OLD and NEW do not depend on n_task (TASK is drawn after NEW)
    for seed in (0, 5):
        base = world.make_world(seed, n_old=30, n_new=12, n_task=0)
        for n_task in (1, 40):
            wd = world.make_world(seed, n_old=30, n_new=12, n_task=n_task)
            assert wd.old == base.old and wd.new == base.new and len(wd.task) == n_task
    assert base.task == () and base.entities("task") == ()
    # TASK entities: ids, 40 by default, names unique across the three splits
    assert len(w.task) == 40 and "task" in world.SPLITS
    assert [e.id for e in w.task] == [f"task-{i:03d}" for i in range(40)]
    names = [e.syllables for e in w.old + w.new + w.task]
    assert len(set(names)) == len(names) == 280 and w.names == set(names)
    assert w.entity("task-007") is w.task[7]
    assert w.passages("task") == [world.passage(e) for e in w.task]
    assert not {e.syllables for e in w.fresh_entities(300, seed=5)} & set(names)
    with pytest.raises(ValueError, match="n_task must be >= 0, got -1"):
        world.make_world(0, n_task=-1)


def test_names_unique_across_splits_when_names_are_scarce(monkeypatch):
    # with 2 syllables there are only 2**3 + 2**4 = 24 names: collisions are certain unless every
    # split (and fresh entities) avoid the names already taken
    monkeypatch.setattr(world, "SYLLABLES", ("ba", "be"))
    wd = world.make_world(0, n_old=6, n_new=6, n_task=8)
    names = [e.syllables for e in wd.old + wd.new + wd.task]
    assert len(set(names)) == len(names) == 20
    fresh = wd.fresh_entities(4, seed=0)
    assert len({e.syllables for e in fresh} | set(names)) == 24


def test_task_split_is_asked_only_in_the_task_wording(w):
    items = w.qa("task", "task")
    assert len(items) == 40 * 4 and {q.wording for q in items} == {"task"}
    for q in items:
        ent = w.entity(q.memory_id)
        assert q.memory_id.startswith("task-") and q.answer == ent.attributes[q.attribute]
        assert q.question == world.QUESTION_TEMPLATES[q.attribute]["task"][0].format(
            name=ent.name)
    assert w.probe_records("task", "task")[0]["memory_id"] == "task-000"
    for wd in ("train", "near", "far", "val_near", "val_far"):
        with pytest.raises(ValueError, match=f"wording '{wd}' is not used for split 'task'"):
            w.qa("task", wd)
    for split in ("old", "new"):
        with pytest.raises(ValueError, match=f"wording 'task' is not used for split '{split}'"):
            w.qa(split, "task")
        with pytest.raises(ValueError, match="wording 'task' is not used"):
            w.probe_records(split, "task")
    with pytest.raises(ValueError, match="unknown wording 'val'"):
        w.qa("task", "val")


def test_validation_and_task_wordings_are_held_out_and_typed():
    assert world.VALIDATION == ("val_near", "val_far") and world.EVALUATION == ("near", "far")
    seeding, evaluation = world.template_sets()
    validation, task = world.validation_templates(), world.task_templates()
    train = {t for per in world.QUESTION_TEMPLATES.values() for t in per["train"]}
    assert len(validation) == 8 and len(task) == 4 and len(evaluation) == 8
    for a, b in ((seeding, validation), (validation, train | evaluation), (task, seeding),
                 (task, train | evaluation | validation)):
        assert not a & b
    for a, per in world.QUESTION_TEMPLATES.items():
        assert set(per) == set(world.WORDINGS), a
        for vn in per["val_near"]:  # near-type: one word of a TRAIN wording changed ...
            assert any(len(t.split()) == len(vn.split()) and _edit_distance(t, vn) == 1
                       for t in per["train"]), (a, vn)
            # ... and not the near change: at least 2 words from every near wording
            assert all(_edit_distance(vn, nr) >= 2 for nr in per["near"]), (a, vn)
        for vf in per["val_far"]:  # far-type: the name first, not the far sentence
            assert vf.startswith("{name} ") and vf not in per["far"]
        # neither validation nor task is a one-word edit of an evaluation wording (choosing
        # settings on validation, or training on task, must not be training on evaluation)
        for t in per["val_near"] + per["val_far"] + per["task"]:
            for e in evaluation | (validation if t in per["task"] else set()):
                assert _edit_distance(t, e) >= 2, (t, e)
    # rendered: no question of one wording group is a question of another, and no validation
    # question is (in) a seeding prompt
    wd = world.make_world(seed=3, n_old=20, n_new=10, n_task=10)
    groups = {
        "train": {q.question for s in ("old", "new") for q in wd.qa(s, "train")},
        "evaluation": {q.question for s in ("old", "new") for w_ in world.EVALUATION
                       for q in wd.qa(s, w_)},
        "validation": {q.question for s in ("old", "new") for w_ in world.VALIDATION
                       for q in wd.qa(s, w_)},
        "task": {q.question for q in wd.qa("task", "task")},
    }
    assert len(groups["validation"]) == 30 * 8 and len(groups["task"]) == 10 * 4
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not groups[a] & groups[b], (a, b)
    prompts = {p for s in world.SPLITS for _, p in wd.seeding_prompts(s)}
    assert not any(q in p for q in groups["validation"] | groups["task"] for p in prompts)
    assert not prompts & groups["validation"]


def test_validation_and_task_words_all_occur_in_training_text(w):
    # base-training text, rendered independently of the module's word lists: passages in every
    # template, TRAIN questions, general text; names are not words of any template
    training = _text_words(w.passages("old", all_templates=True)
                           + [q.question for q in w.qa("old", "train")]
                           + w.general_text(3000, 0))
    for wd in world.VALIDATION + ("task",):
        words = _template_word_set(t for per in world.QUESTION_TEMPLATES.values()
                                   for t in per[wd])
        assert words and words <= training, (wd, words - training)
    # the check can fail: words of the vocabulary corpus only (seeding, dreaming) are not there
    assert {"describe", "tell", "implications"}.isdisjoint(training)
    # the dreaming prompts' words occur in their training pairs (and in the vocabulary)
    dream_words = _template_word_set(world.DREAM_TEMPLATES.values())
    dream_text = _text_words(p + t for p, t in w.dream_examples(100, 0))
    assert dream_words and dream_words <= dream_text
    vocab_words = {t.lstrip("\u2581") for t in word_level_tokenizer(
        world.vocabulary_corpus()).get_vocab()}
    assert dream_words <= vocab_words


def _passage_owner(entities):
    return {world.passage(e, t): e for e in entities for t in range(len(world.PASSAGE_TEMPLATES))}


def test_multi_passage_rc_counts_positions_answers_and_length_bound(w):
    tok = word_level_tokenizer(world.vocabulary_corpus())
    items = w.rc_items(400, seed=4, n_passages=1, max_passages=4)
    assert items == w.rc_items(400, seed=4, n_passages=1, max_passages=4)
    # fresh entities are drawn in sequence, so a long draw names every entity the items use
    owner = _passage_owner(w.fresh_entities(400 * 4, seed=4))
    by_name = {e.name: e for e in owner.values()}
    counts, positions = set(), set()
    for it in items:
        parts = [p for p in owner if p in it.context]
        ents = {owner[p].id: owner[p] for p in parts}
        assert " ".join(sorted(parts, key=it.context.index)) == it.context  # only passages
        target = by_name[_name_in(it.question)]
        assert target.id in ents and it.answer == target.attributes[it.attribute]
        assert it.answer in it.context.replace(".", " ").replace(",", " ").split()
        order = sorted(ents.values(), key=lambda e: it.context.index(e.name))
        counts.add(len(ents))
        positions.add((len(ents), order.index(target)))
        n_tok = len(tok.encode(it.context).ids)
        assert n_tok <= world.max_context_words(len(ents)), it.context
        prompt = world.open_book_prompt(it.context, it.question) + " " + it.answer
        assert len(tok.encode(prompt).ids) <= world.max_open_book_words(len(ents))
    assert counts == {1, 2, 3, 4}
    assert {(4, k) for k in range(4)} <= positions  # the target is at every position
    # max_passages == n_passages reproduces the fixed-count items; the old call is unchanged
    assert w.rc_items(30, 6, n_passages=2, max_passages=2) == w.rc_items(30, 6, n_passages=2)
    three = w.rc_items(200, seed=7, n_passages=2, max_passages=3)
    owner7 = _passage_owner(w.fresh_entities(600, seed=7))
    assert {sum(p in it.context for p in owner7) for it in three} == {2, 3}
    with pytest.raises(ValueError, match="max_passages must be None or >= n_passages"):
        w.rc_items(5, 0, n_passages=3, max_passages=2)
    # the bound is exact: the longest template about a 4-syllable name reaches it
    e4 = world.Entity("x", ("ka", "lo", "mi", "nu"), {a: world.VALUES[a][0]
                                                     for a in world.ATTRIBUTES}, 0)
    longest = max(len(tok.encode(world.passage(e4, t)).ids)
                  for t in range(len(world.PASSAGE_TEMPLATES)))
    assert world.max_context_words(1) == longest and world.max_context_words(5) == 5 * longest
    assert world.max_context_words(0) == 0
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        world.max_context_words(-1)
    with pytest.raises(ValueError, match="unknown wording 'nope'"):
        world.max_open_book_words(1, ["nope"])


def test_memory_stream_chunks_new_in_order(w, tmp_path):
    sets = w.memory_stream(10)
    assert len(sets) == 10 and [len(x) for x in sets] == [4] * 10
    assert [e for x in sets for e in x] == list(w.new)
    three = w.memory_stream(3)  # 40 // 3 = 13 each; the 40th NEW entity is in no set
    assert [len(x) for x in three] == [13] * 3 and three[1][0] is w.new[13]
    assert [e for x in three for e in x] == list(w.new[:39])
    assert [len(x) for x in w.memory_stream(40)] == [1] * 40
    for bad in (0, -1, 41, True, 2.0):
        with pytest.raises(ValueError, match=r"n_sets must be an integer in \[1, 40\]"):
            w.memory_stream(bad)
    recs = w.stream_records(10)
    assert recs[0] == {"id": "new-000", "text": world.passage(w.new[0]), "set": 0}
    assert [r["set"] for r in recs] == [i // 4 for i in range(40)]
    path = w.export_stream_jsonl(tmp_path / "stream", 10)
    assert [json.loads(x) for x in open(path).read().splitlines()] == recs
    with pytest.raises(ValueError, match="n_sets must be"):
        w.export_stream_jsonl(tmp_path / "bad", 0)
    assert not (tmp_path / "bad").exists()  # nothing written for a bad n_sets


def test_dream_prompts_and_examples(w):
    assert set(world.DREAM_TEMPLATES) == {"implications", "qa", "rewrite"}
    assert all(t.startswith("{context} ") for t in world.DREAM_TEMPLATES.values())
    ex = w.dream_examples(300, seed=1)
    assert len(ex) == 300 and ex == w.dream_examples(300, seed=1)
    assert ex != w.dream_examples(300, seed=2)
    owner = _passage_owner(w.task)
    suffix = {t.replace("{context}", ""): k for k, t in world.DREAM_TEMPLATES.items()}
    kinds = set()
    for prompt, target in ex:
        assert target.startswith(" ")
        (sfx, kind), = [(s_, k) for s_, k in suffix.items() if prompt.endswith(s_)]
        context = prompt[:-len(sfx)]
        e = owner[context]  # the context is a TASK entity's passage, in some template
        assert prompt == world.dream_prompt(kind, context)
        kinds.add(kind)
        if kind == "qa":
            pairs = re.findall(r"question: (.+?) answer: (\S+)", target)
            assert pairs == [(world.question(e, a, "task"), e.attributes[a])
                             for a in world.ATTRIBUTES]
            assert target == " " + " ".join(world.closed_book_prompt(q) + " " + v
                                            for q, v in pairs)
        elif kind == "rewrite":
            assert owner.get(target[1:]) is e and target[1:] != context
        else:
            assert target == " " + world.fact_sentences(e)
            assert all(f"{e.name} " in target and e.attributes[a] in target
                       for a in world.ATTRIBUTES)
    assert kinds == set(world.DREAM_KINDS)
    # no held-out question (evaluation or validation wording) of a TASK entity is in them
    held_out = {world.question(e, a, wd) for e in w.task for a in world.ATTRIBUTES
                for wd in world.EVALUATION + world.VALIDATION}
    assert not any(q in p + t for q in held_out for p, t in ex)
    only_qa = w.dream_examples(20, seed=1, kinds=["qa"])
    assert all(p.endswith(" questions and answers:") for p, _ in only_qa)
    with pytest.raises(ValueError, match="dream examples use split 'task' only"):
        w.dream_examples(5, 0, split="new")
    with pytest.raises(ValueError, match="unknown dream kind 'poem'"):
        w.dream_examples(5, 0, kinds=["poem"])
    with pytest.raises(ValueError, match="unknown dream kind 'poem'"):
        world.dream_prompt("poem", "x")
    with pytest.raises(ValueError, match="no TASK entities"):
        world.make_world(0, n_old=2, n_new=2, n_task=0).dream_examples(1, 0)
