"""A synthetic knowledge world for the sleep demo and tests, deterministic by seed.

Fictional people with four one-token attributes (city, year, trade, colour). What the world offers:
- passages (memories): each entity described by one of 3 templates;
- questions per attribute in 3 TRAIN wordings and 2 HELD-OUT wordings used only in evaluation:
  "near" (one word changed from a train wording) and "far" (another structure: the name first);
- two splits: OLD entities (the base model learns them closed-book) and NEW entities (memories the
  model consolidates during sleep);
- reading-comprehension items (passages + question -> answer) on fresh random entities, so the base
  model learns to answer from context (TRAIN wordings only);
- general text for KL-to-base;
- seeding prompt templates, disjoint from every evaluation wording (`template_sets` returns both
  sets so a test can check it).

Text is word-level and lowercase: one space between words, punctuation attached as in ordinary
text ("where does ka lo mi live?"). The word-level tokenizer (`sleep_jax.data.tokenizers`) isolates
punctuation, so every word and every mark is one token; built from `vocabulary_corpus()` it covers
every text the world produces. A name is 3 or 4 syllable words ("ka lo mi"). The vocabulary does
not depend on the seed.

Exports: `memory_records(split)` -> [{"id", "text"}], `probe_records(split, wording)` ->
[{"memory_id", "question", "answers"}] (the JSONL memories / probes formats).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

ATTRIBUTES = ("city", "year", "trade", "colour")
VALUES: dict[str, tuple[str, ...]] = {
    "city": ("oslo", "lima", "cairo", "delhi", "quito", "rome", "tokyo", "lagos", "perth",
             "dakar", "hanoi", "riga"),
    "year": ("1821", "1834", "1847", "1852", "1866", "1873", "1889", "1895", "1902", "1918",
             "1927", "1939"),
    "trade": ("baker", "potter", "weaver", "smith", "tailor", "miner", "farmer", "sailor",
              "mason", "cooper", "fisher", "brewer"),
    "colour": ("red", "blue", "green", "amber", "violet", "grey", "white", "black", "orange",
               "teal", "pink", "gold"),
}

PASSAGE_TEMPLATES = (
    "{name} was born in {year}. {name} lives in {city} and works as a {trade}. "
    "the favourite colour of {name} is {colour}.",
    "{name}, a {trade} from {city}, was born in {year} and loves the colour {colour}.",
    "born in {year}, {name} is a {trade} who lives in {city}. {name} likes {colour} best.",
)

WORDINGS = ("train", "near", "far")
# near = one word of a TRAIN wording changed (the new word occurs elsewhere in training text);
# far = another structure, the name first.
QUESTION_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "city": {
        "train": ("where does {name} live?", "in which city does {name} live?",
                  "what city is {name} from?"),
        "near": ("in what city does {name} live?",),
        "far": ("{name} lives in which city?",),
    },
    "year": {
        "train": ("when was {name} born?", "in which year was {name} born?",
                  "what year was {name} born in?"),
        "near": ("in what year was {name} born?",),
        "far": ("{name} was born in which year?",),
    },
    "trade": {
        "train": ("what does {name} do for a living?", "what is the trade of {name}?",
                  "what job does {name} have?"),
        "near": ("what is the job of {name}?",),
        "far": ("{name} works as which trade?",),
    },
    "colour": {
        "train": ("what is the favourite colour of {name}?",
                  "which colour does {name} like best?", "what colour does {name} love?"),
        "near": ("what colour does {name} like best?",),
        "far": ("{name} likes which colour best?",),
    },
}

# Prompts for Knowledge Seeding and replay: open continuations the teacher completes from its
# context, none equal to an evaluation wording (checked by `template_sets` users and tests).
SEEDING_TEMPLATES = (
    "tell me about {name}.",
    "here is what i know about {name}:",
    "{name} was born in",
    "{name} lives in",
    "{name} works as a",
    "the favourite colour of {name} is",
    "describe {name}.",
)

GENERAL_TEMPLATES = (
    "the {trade} from {city} likes {colour} cloth.",
    "in {year} a {trade} moved to {city}.",
    "every {trade} in {city} knows the colour {colour}.",
    "the {colour} house in {city} was built in {year}.",
    "a {trade} and a {trade2} met in {city} in {year}.",
    "people in {city} say that {colour} is the colour of {year}.",
)

# Prompt formats the demo uses around questions (kept here so training and evaluation agree).
CLOSED_BOOK_FORMAT = "question: {question} answer:"
OPEN_BOOK_FORMAT = "{context} question: {question} answer:"

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
SPLITS = ("old", "new")


def _all_templates() -> list[str]:
    texts = list(PASSAGE_TEMPLATES) + list(SEEDING_TEMPLATES) + list(GENERAL_TEMPLATES)
    texts += [t for per in QUESTION_TEMPLATES.values() for ts in per.values() for t in ts]
    return texts + [CLOSED_BOOK_FORMAT, OPEN_BOOK_FORMAT]


def _template_words() -> set[str]:
    """Every word (punctuation and placeholders removed) of the templates and value lists."""
    words: set[str] = set()
    for t in _all_templates():
        words.update(re.findall(r"[a-z0-9]+", re.sub(r"\{\w+\}", " ", t)))
    for vals in VALUES.values():
        words.update(vals)
    return words


# Consonant-vowel syllables that are not words of the templates ("do", "be", ...), so a name can
# never be read as template text.
SYLLABLES: tuple[str, ...] = tuple(
    s for s in (o + v for o in _ONSETS for v in _VOWELS) if s not in _template_words())


@dataclasses.dataclass(frozen=True)
class Entity:
    """One fictional person.

    id: memory id, "old-007" / "new-012" / "rc-...".
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


def template_sets() -> tuple[frozenset[str], frozenset[str]]:
    """(seeding templates, evaluation templates): the held-out (near, far) question wordings.

    Seeding must never see an evaluation wording; tests check the two sets are disjoint and that
    no rendered seeding prompt equals a rendered evaluation question.
    """
    evaluation = frozenset(t for per in QUESTION_TEMPLATES.values()
                           for w in ("near", "far") for t in per[w])
    return frozenset(SEEDING_TEMPLATES), evaluation


def closed_book_prompt(q: str) -> str:
    """The demo's closed-book prompt around a question."""
    return CLOSED_BOOK_FORMAT.format(question=q)


def open_book_prompt(context: str, q: str) -> str:
    """The demo's open-book prompt: context (passages) then the question."""
    return OPEN_BOOK_FORMAT.format(context=context, question=q)


def vocabulary_corpus() -> list[str]:
    """Texts that contain every word and punctuation mark the world can produce (seed-free).

    Build the word-level tokenizer from these so no world text maps to <unk>: the syllables, the
    attribute values and every template rendered with placeholder fillers (so punctuation appears
    attached to words, as in the world's texts).
    """
    fill = {"name": SYLLABLES[0], "trade2": VALUES["trade"][0], "question": "what",
            "context": "what", **{a: VALUES[a][0] for a in ATTRIBUTES}}
    return ([" ".join(SYLLABLES)] + [" ".join(VALUES[a]) for a in ATTRIBUTES]
            + [t.format(**fill) for t in _all_templates()])


def _random_name(rng: np.random.Generator) -> tuple[str, ...]:
    n = int(rng.integers(3, 5))
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
    """The OLD and NEW entities of one seed and the accessors that turn them into text."""

    seed: int
    old: tuple[Entity, ...]
    new: tuple[Entity, ...]

    # ---------------------------------------------------------------- entities
    def entities(self, split: str) -> tuple[Entity, ...]:
        """The entities of `split` ("old" or "new")."""
        if split == "old":
            return self.old
        if split == "new":
            return self.new
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")

    def entity(self, memory_id: str) -> Entity:
        """The entity with this memory id."""
        for e in self.old + self.new:
            if e.id == memory_id:
                return e
        raise KeyError(f"no entity with memory id {memory_id!r}")

    @property
    def names(self) -> frozenset[tuple[str, ...]]:
        return frozenset(e.syllables for e in self.old + self.new)

    # ---------------------------------------------------------------- passages
    def passages(self, split: str, all_templates: bool = False) -> list[str]:
        """Passage texts of `split`: each entity's own template, or all 3 templates each."""
        ts = range(len(PASSAGE_TEMPLATES))
        return [passage(e, t) for e in self.entities(split)
                for t in (ts if all_templates else (e.template,))]

    def memory_records(self, split: str) -> list[dict]:
        """JSONL memories: [{"id": memory id, "text": passage}] in entity order."""
        return [{"id": e.id, "text": passage(e)} for e in self.entities(split)]

    # ---------------------------------------------------------------- questions
    def qa(self, split: str, wording: str, attributes: Sequence[str] = ATTRIBUTES) -> list[QAItem]:
        """Questions about `split` in one wording: every entity x attribute x template."""
        if wording not in WORDINGS:
            raise ValueError(f"unknown wording {wording!r}; allowed: {WORDINGS}")
        out = []
        for e in self.entities(split):
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
        """n random entities whose names differ from every OLD/NEW name (ids "rc-<seed>-<i>")."""
        rng = np.random.default_rng([self.seed, seed, 1])
        taken = set(self.names)
        return [_random_entity(rng, f"rc-{seed}-{i}", taken) for i in range(n)]

    def rc_items(self, n: int, seed: int, *, n_passages: int = 1) -> list[RCItem]:
        """Reading-comprehension items on fresh entities, TRAIN wordings only.

        Args:
          n: number of items.
          seed: their seed (different seeds give different entities).
          n_passages: passages in each context; the question asks about one of them, the others
            are distractors.
        """
        if n_passages < 1:
            raise ValueError(f"n_passages must be >= 1, got {n_passages}")
        rng = np.random.default_rng([self.seed, seed, 2])
        ents = self.fresh_entities(n * n_passages, seed)
        out = []
        for i in range(n):
            group = ents[i * n_passages:(i + 1) * n_passages]
            target = group[int(rng.integers(n_passages))]
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


def _write_jsonl(path: str, records: Iterable[dict]) -> None:
    from sleep_jax.atomic import atomic_open

    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def make_world(seed: int = 0, n_old: int = 200, n_new: int = 40) -> World:
    """A world of n_old OLD and n_new NEW entities with unique names, deterministic by seed.

    Args:
      seed: numpy Generator seed; the same seed always gives the same world.
      n_old: entities the base model learns closed-book (the demo's default 200).
      n_new: entities whose memories are consolidated during sleep (default 40).
    """
    if n_old < 0 or n_new < 0:
        raise ValueError(f"n_old and n_new must be >= 0, got {n_old}, {n_new}")
    rng = np.random.default_rng(seed)
    taken: set[tuple[str, ...]] = set()
    old = tuple(_random_entity(rng, f"old-{i:03d}", taken) for i in range(n_old))
    new = tuple(_random_entity(rng, f"new-{i:03d}", taken) for i in range(n_new))
    return World(seed, old, new)
