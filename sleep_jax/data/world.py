"""A synthetic knowledge world for the sleep demo and tests, deterministic by seed (world v2).

Fictional people with four one-token attributes (city, year, trade, colour). What the world offers:
- passages (memories): each entity described by one of 3 templates;
- questions per attribute in several wordings (`QUESTION_TEMPLATES`, `WORDINGS`):
  - "train": 3 wordings the base model is trained on;
  - EVALUATION ("near", "far"): held out, used only to report results: "near" = one word of a
    train wording changed, "far" = another structure (the name first);
  - VALIDATION ("val_near", "val_far"): held out too, of the same two types but other wordings,
    for choosing settings without looking at the evaluation wordings. Every word of them occurs in
    base training text (passages, train questions, general text), so a validation question is
    new only in its wording, never in its words;
  - "task": one more wording, only for TASK entities (below), never evaluated;
- three entity splits (`SPLITS`): OLD (the base model learns them closed-book), NEW (memories the
  model consolidates during sleep; `memory_stream` cuts them into an ordered stream of memory sets
  for wake/sleep cycles) and TASK (fresh entities with passages and the "task" wording, used only
  to train generators / RL for dreaming). Adding TASK entities leaves OLD and NEW of a seed as
  they were (they are drawn after NEW);
- reading-comprehension items (passages + question -> answer) on fresh random entities, so the base
  model learns to answer from context (TRAIN wordings only); 1 or more passages per context, a
  fixed count or a count drawn per item (`rc_items(..., max_passages=)`); `max_context_words(k)`
  bounds the length of a k-passage context;
- dreaming prompts (`DREAM_TEMPLATES`: "implications", "qa", "rewrite" around a {context}) and
  `World.dream_examples`, (prompt, target) training pairs for them on TASK entities;
- general text for KL-to-base;
- seeding prompt templates, disjoint from every evaluation and validation wording
  (`template_sets` and `validation_templates` return the sets so a test can check it).

Text is word-level and lowercase: one space between words, punctuation attached as in ordinary
text ("where does ka lo mi live?"). The word-level tokenizer (`sleep_jax.data.tokenizers`) isolates
punctuation, so every word and every mark is one token; built from `vocabulary_corpus()` it covers
every text the world produces. A name is 3 or 4 syllable words ("ka lo mi"). The vocabulary does
not depend on the seed. No template may use a consonant-vowel word ("no", "be"): it would leave
`SYLLABLES` and so change every name of every seed.

Exports: `memory_records(split)` -> [{"id", "text"}], `probe_records(split, wording)` ->
[{"memory_id", "question", "answers"}] (the JSONL memories / probes formats), `stream_records`
-> [{"id", "text", "set"}] (the memory stream in arrival order).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from sleep_jax.data.templates import (  # noqa: F401 (re-exported: the world's text)
    _NAME_SYLLABLES,
    ATTRIBUTES,
    CLOSED_BOOK_FORMAT,
    DREAM_KINDS,
    DREAM_TEMPLATES,
    EVALUATION,
    FACT_TEMPLATES,
    GENERAL_TEMPLATES,
    OPEN_BOOK_FORMAT,
    PASSAGE_TEMPLATES,
    QUESTION_TEMPLATES,
    SEEDING_TEMPLATES,
    SPLIT_WORDINGS,
    SPLITS,
    SYLLABLES,
    TASK_WORDING,
    VALIDATION,
    VALUES,
    WORDINGS,
    _template_words,
    closed_book_prompt,
    dream_prompt,
    max_context_words,
    max_open_book_words,
    open_book_prompt,
    task_templates,
    template_sets,
    validation_templates,
    vocabulary_corpus,
)


@dataclasses.dataclass(frozen=True)
class Entity:
    """One fictional person.

    id: memory id, "old-007" / "new-012" / "task-003" / "rc-...".
    syllables: the name as 3-4 syllable words; name = " ".join(syllables).
    attributes: attribute -> one-token value, for every name in ATTRIBUTES.
    template: index of the PASSAGE_TEMPLATES entry used for its memory.
    """

    id: str
    syllables: tuple[str, ...]
    attributes: dict[str, str]
    template: int

    @property
    def name(self) -> str:
        return " ".join(self.syllables)


@dataclasses.dataclass(frozen=True)
class QAItem:
    """A closed-book question about an entity (open-book: put `passage` in the context)."""

    memory_id: str
    attribute: str
    wording: str
    template: int
    question: str
    answer: str
    passage: str


@dataclasses.dataclass(frozen=True)
class RCItem:
    """Reading comprehension: `context` (1+ passages) + `question` -> `answer`."""

    context: str
    question: str
    answer: str
    attribute: str


def passage(entity: Entity, template: int | None = None) -> str:
    """The entity's description from PASSAGE_TEMPLATES[template] (default: its own template)."""
    t = entity.template if template is None else template
    if not 0 <= t < len(PASSAGE_TEMPLATES):
        raise ValueError(f"template must be in [0, {len(PASSAGE_TEMPLATES)}), got {t}")
    return PASSAGE_TEMPLATES[t].format(name=entity.name, **entity.attributes)


def question(entity: Entity, attribute: str, wording: str, template: int = 0) -> str:
    """The question asking `attribute` of `entity` in the given wording and template index."""
    if attribute not in QUESTION_TEMPLATES:
        raise ValueError(f"unknown attribute {attribute!r}; allowed: {ATTRIBUTES}")
    if wording not in WORDINGS:
        raise ValueError(f"unknown wording {wording!r}; allowed: {WORDINGS}")
    return QUESTION_TEMPLATES[attribute][wording][template].format(name=entity.name)


def fact_sentences(entity: Entity) -> str:
    """The entity's facts as short sentences, one per attribute in ATTRIBUTES order (the target of
    an "implications" dream): "ka lo mi lives in oslo. ka lo mi was born in 1852. ..."."""
    return " ".join(FACT_TEMPLATES[a].format(name=entity.name, **entity.attributes)
                    for a in ATTRIBUTES)


def qa_pairs(entity: Entity, wording: str = TASK_WORDING) -> str:
    """Every attribute of the entity as closed-book question-answer pairs in one wording (the
    target of a "qa" dream): "question: where is ka lo mi from? answer: oslo question: ...".

    Each pair is exactly a closed-book training example (`closed_book_prompt(q) + " " + answer`),
    so pairs a generator dreams can be cut out and trained on as they are.
    """
    return " ".join(closed_book_prompt(question(entity, a, wording)) + " " + entity.attributes[a]
                    for a in ATTRIBUTES)


def _random_name(rng: np.random.Generator) -> tuple[str, ...]:
    n = int(rng.integers(min(_NAME_SYLLABLES), max(_NAME_SYLLABLES) + 1))
    return tuple(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), size=n))


def _random_entity(rng: np.random.Generator, eid: str, taken: set[tuple[str, ...]]) -> Entity:
    while True:
        syl = _random_name(rng)
        if syl not in taken:
            break
    taken.add(syl)
    attrs = {a: VALUES[a][int(rng.integers(len(VALUES[a])))] for a in ATTRIBUTES}
    return Entity(eid, syl, attrs, int(rng.integers(len(PASSAGE_TEMPLATES))))


@dataclasses.dataclass(frozen=True)
class World:
    """The OLD, NEW and TASK entities of one seed and the accessors that turn them into text."""

    seed: int
    old: tuple[Entity, ...]
    new: tuple[Entity, ...]
    task: tuple[Entity, ...] = ()

    # ---------------------------------------------------------------- entities
    def entities(self, split: str) -> tuple[Entity, ...]:
        """The entities of `split` ("old", "new" or "task")."""
        if split == "old":
            return self.old
        if split == "new":
            return self.new
        if split == "task":
            return self.task
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")

    def entity(self, memory_id: str) -> Entity:
        """The entity with this memory id."""
        for e in self.old + self.new + self.task:
            if e.id == memory_id:
                return e
        raise KeyError(f"no entity with memory id {memory_id!r}")

    @property
    def names(self) -> frozenset[tuple[str, ...]]:
        """The names (syllable tuples) of every OLD, NEW and TASK entity."""
        return frozenset(e.syllables for e in self.old + self.new + self.task)

    # ---------------------------------------------------------------- passages
    def passages(self, split: str, all_templates: bool = False) -> list[str]:
        """Passage texts of `split`: each entity's own template, or all 3 templates each."""
        ts = range(len(PASSAGE_TEMPLATES))
        return [passage(e, t) for e in self.entities(split)
                for t in (ts if all_templates else (e.template,))]

    def memory_records(self, split: str) -> list[dict]:
        """JSONL memories: [{"id": memory id, "text": passage}] in entity order."""
        return [{"id": e.id, "text": passage(e)} for e in self.entities(split)]

    def memory_stream(self, n_sets: int) -> list[list[Entity]]:
        """NEW entities as an ordered stream of `n_sets` memory sets for wake/sleep cycles.

        Set i is the i-th consecutive chunk of NEW in entity order, all sets of the same size
        len(new) // n_sets; the last len(new) % n_sets NEW entities are in no set. The sets are
        disjoint, so each cycle consolidates memories no earlier cycle saw.
        """
        if isinstance(n_sets, bool) or not isinstance(n_sets, (int, np.integer)) or \
                not 1 <= n_sets <= len(self.new):
            raise ValueError(f"n_sets must be an integer in [1, {len(self.new)}] (at most one set "
                             f"per NEW entity), got {n_sets!r}")
        size = len(self.new) // int(n_sets)
        return [list(self.new[i * size:(i + 1) * size]) for i in range(int(n_sets))]

    def stream_records(self, n_sets: int) -> list[dict]:
        """JSONL memory stream, in arrival order: [{"id", "text", "set": index of its set}]."""
        return [{"id": e.id, "text": passage(e), "set": i}
                for i, group in enumerate(self.memory_stream(n_sets)) for e in group]

    # ---------------------------------------------------------------- questions
    def qa(self, split: str, wording: str, attributes: Sequence[str] = ATTRIBUTES) -> list[QAItem]:
        """Questions about `split` in one wording: every entity x attribute x template.

        TASK entities are asked only in the "task" wording and the "task" wording only about TASK
        entities (`SPLIT_WORDINGS`), so it never enters OLD/NEW training or evaluation.
        """
        if wording not in WORDINGS:
            raise ValueError(f"unknown wording {wording!r}; allowed: {WORDINGS}")
        entities = self.entities(split)
        if wording not in SPLIT_WORDINGS[split]:
            raise ValueError(f"wording {wording!r} is not used for split {split!r}; allowed for "
                             f"{split!r}: {SPLIT_WORDINGS[split]} (the {TASK_WORDING!r} wording is "
                             "the only one of TASK entities and is used for no other split)")
        out = []
        for e in entities:
            p = passage(e)
            for a in attributes:
                for k in range(len(QUESTION_TEMPLATES[a][wording])):
                    out.append(QAItem(e.id, a, wording, k, question(e, a, wording, k),
                                      e.attributes[a], p))
        return out

    def probe_records(self, split: str, wording: str) -> list[dict]:
        """JSONL probes: [{"memory_id", "question", "answers": [answer]}]."""
        return [{"memory_id": q.memory_id, "question": q.question, "answers": [q.answer]}
                for q in self.qa(split, wording)]

    def seeding_prompts(self, split: str) -> list[tuple[str, str]]:
        """(memory id, prompt) for every entity of `split` x SEEDING_TEMPLATES (no labels)."""
        return [(e.id, t.format(name=e.name)) for e in self.entities(split)
                for t in SEEDING_TEMPLATES]

    # ---------------------------------------------------------------- base-training extras
    def fresh_entities(self, n: int, seed: int) -> list[Entity]:
        """n random entities whose names differ from every OLD/NEW/TASK name (ids "rc-<seed>-<i>").

        Names are drawn until unused; a world without TASK entities gives the same entities
        unless one of them would have taken a TASK name (then it is drawn again).
        """
        rng = np.random.default_rng([self.seed, seed, 1])
        taken = set(self.names)
        return [_random_entity(rng, f"rc-{seed}-{i}", taken) for i in range(n)]

    def rc_items(self, n: int, seed: int, *, n_passages: int = 1,
                 max_passages: int | None = None) -> list[RCItem]:
        """Reading-comprehension items on fresh entities, TRAIN wordings only.

        Args:
          n: number of items.
          seed: their seed (different seeds give different entities).
          n_passages: passages in each context (the fewest, with `max_passages`); the question
            asks about one of them at a random position, the others are distractors.
          max_passages: None: every context has n_passages passages. Otherwise each item draws
            its count uniformly from n_passages..max_passages (inclusive), from a generator of
            its own, so max_passages == n_passages gives the same items as None.
            `max_context_words(max_passages)` bounds the context length.
        """
        if n_passages < 1:
            raise ValueError(f"n_passages must be >= 1, got {n_passages}")
        if max_passages is not None and max_passages < n_passages:
            raise ValueError(f"max_passages must be None or >= n_passages ({n_passages}), got "
                             f"{max_passages}")
        rng = np.random.default_rng([self.seed, seed, 2])
        if max_passages is None:
            counts = [n_passages] * n
        else:
            count_rng = np.random.default_rng([self.seed, seed, 4])
            counts = [int(c) for c in count_rng.integers(n_passages, max_passages + 1, size=n)]
        ents = self.fresh_entities(sum(counts), seed)
        starts = np.cumsum([0] + counts)
        out = []
        for i in range(n):
            group = ents[starts[i]:starts[i + 1]]
            target = group[int(rng.integers(len(group)))]
            a = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
            k = int(rng.integers(len(QUESTION_TEMPLATES[a]["train"])))
            ctx = " ".join(passage(e, int(rng.integers(len(PASSAGE_TEMPLATES)))) for e in group)
            out.append(RCItem(ctx, question(target, a, "train", k), target.attributes[a], a))
        return out

    def general_text(self, n: int, seed: int) -> list[str]:
        """n sentences about no entity, from GENERAL_TEMPLATES and the attribute vocabularies."""
        rng = np.random.default_rng([self.seed, seed, 3])

        def pick(a: str) -> str:
            return VALUES[a][int(rng.integers(len(VALUES[a])))]

        out = []
        for _ in range(n):
            t = GENERAL_TEMPLATES[int(rng.integers(len(GENERAL_TEMPLATES)))]
            out.append(t.format(city=pick("city"), year=pick("year"), trade=pick("trade"),
                                trade2=pick("trade"), colour=pick("colour")))
        return out

    def dream_examples(self, n: int, seed: int, *, split: str = "task",
                       kinds: Sequence[str] = DREAM_KINDS) -> list[tuple[str, str]]:
        """n (prompt, target) pairs that teach the dreaming prompts, on TASK entities.

        Each pair: a random TASK entity and kind; prompt = `dream_prompt(kind, passage)` with the
        entity's passage in a random template; target (with a leading space, as the demo's
        (prompt, " " + answer) examples) by kind:
          "implications": `fact_sentences(entity)`;
          "qa": `qa_pairs(entity)`, its attributes as question-answer pairs in the task wording;
          "rewrite": the entity's passage in another template.
        Only TASK entities are allowed: these pairs go into base training, and TASK entities are
        the ones no evaluation asks about (OLD/NEW facts would leak, and the task wording is
        theirs alone).
        """
        if split != "task":
            raise ValueError(f"dream examples use split 'task' only (never-evaluated entities, the "
                             f"only ones asked in the task wording), got split {split!r}")
        kinds = tuple(kinds)
        for k in kinds:
            if k not in DREAM_TEMPLATES:
                raise ValueError(f"unknown dream kind {k!r}; allowed: {DREAM_KINDS}")
        if not kinds:
            raise ValueError(f"kinds must name at least one of {DREAM_KINDS}")
        ents = self.entities(split)
        if n > 0 and not ents:
            raise ValueError("this world has no TASK entities (make_world(..., n_task=0)); "
                             "dream examples need n_task >= 1")
        rng = np.random.default_rng([self.seed, seed, 5])
        n_t = len(PASSAGE_TEMPLATES)
        out = []
        for _ in range(n):
            e = ents[int(rng.integers(len(ents)))]
            kind = kinds[int(rng.integers(len(kinds)))]
            t = int(rng.integers(n_t))
            if kind == "implications":
                target = fact_sentences(e)
            elif kind == "qa":
                target = qa_pairs(e, TASK_WORDING)
            else:  # rewrite: any other template
                target = passage(e, (t + 1 + int(rng.integers(n_t - 1))) % n_t)
            out.append((dream_prompt(kind, passage(e, t)), " " + target))
        return out

    def vocabulary_corpus(self) -> list[str]:
        """Same as the module's `vocabulary_corpus()`."""
        return vocabulary_corpus()

    def export_jsonl(self, directory: str | os.PathLike, split: str = "new",
                     wordings: Iterable[str] = ("near", "far")) -> dict[str, str]:
        """Writes memories.jsonl and probes_<wording>.jsonl for `split`; returns their paths."""
        os.makedirs(directory, exist_ok=True)
        paths = {"memories": os.path.join(directory, "memories.jsonl")}
        _write_jsonl(paths["memories"], self.memory_records(split))
        for w in wordings:
            paths[w] = os.path.join(directory, f"probes_{w}.jsonl")
            _write_jsonl(paths[w], self.probe_records(split, w))
        return paths

    def export_stream_jsonl(self, directory: str | os.PathLike, n_sets: int) -> str:
        """Writes memory_stream.jsonl (`stream_records(n_sets)`); returns its path."""
        records = self.stream_records(n_sets)  # checks n_sets before anything is written
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "memory_stream.jsonl")
        _write_jsonl(path, records)
        return path


def _write_jsonl(path: str, records: Iterable[dict]) -> None:
    from sleep_jax.atomic import atomic_open

    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def make_world(seed: int = 0, n_old: int = 200, n_new: int = 40, n_task: int = 40) -> World:
    """A world of n_old OLD, n_new NEW and n_task TASK entities with unique names, by seed.

    Args:
      seed: numpy Generator seed; the same seed always gives the same world.
      n_old: entities the base model learns closed-book (the demo's default 200).
      n_new: entities whose memories are consolidated during sleep (default 40).
      n_task: entities for training dream generators / RL (default 40), never evaluated. Drawn
        after NEW from the same generator, so OLD and NEW do not depend on n_task.
    """
    if n_old < 0 or n_new < 0:
        raise ValueError(f"n_old and n_new must be >= 0, got {n_old}, {n_new}")
    if n_task < 0:
        raise ValueError(f"n_task must be >= 0, got {n_task}")
    rng = np.random.default_rng(seed)
    taken: set[tuple[str, ...]] = set()
    old = tuple(_random_entity(rng, f"old-{i:03d}", taken) for i in range(n_old))
    new = tuple(_random_entity(rng, f"new-{i:03d}", taken) for i in range(n_new))
    task = tuple(_random_entity(rng, f"task-{i:03d}", taken) for i in range(n_task))
    return World(seed, old, new, task)
