"""The demo world's text (world v2): attributes and their values, passage / question / seeding /
general / dreaming templates, the wordings and their roles, the prompt formats, the name
syllables, the length bounds of contexts and the vocabulary corpus. Seed-free: sleep_jax.data.world
draws the entities of a seed and renders them with these (its docstring explains the roles of the
wordings and splits); it re-exports every name here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

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

WORDINGS = ("train", "near", "far", "val_near", "val_far", "task")
EVALUATION = ("near", "far")  # held out: reported results only
VALIDATION = ("val_near", "val_far")  # held out: choosing settings, never the reported figures
TASK_WORDING = "task"
# near / val_near = one word of a TRAIN wording changed (the new word occurs elsewhere in training
# text), each a different change; far / val_far = another structure, the name first; task = the
# only wording of TASK entities, at least 2 words from every evaluation and validation wording.
QUESTION_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "city": {
        "train": ("where does {name} live?", "in which city does {name} live?",
                  "what city is {name} from?"),
        "near": ("in what city does {name} live?",),
        "far": ("{name} lives in which city?",),
        "val_near": ("which city is {name} from?",),
        "val_far": ("{name} is from which city?",),
        "task": ("where is {name} from?",),
    },
    "year": {
        "train": ("when was {name} born?", "in which year was {name} born?",
                  "what year was {name} born in?"),
        "near": ("in what year was {name} born?",),
        "far": ("{name} was born in which year?",),
        "val_near": ("which year was {name} born in?",),
        "val_far": ("{name} was born when?",),
        "task": ("what is the year {name} was born in?",),
    },
    "trade": {
        "train": ("what does {name} do for a living?", "what is the trade of {name}?",
                  "what job does {name} have?"),
        "near": ("what is the job of {name}?",),
        "far": ("{name} works as which trade?",),
        "val_near": ("what trade does {name} have?",),
        "val_far": ("{name} does what for a living?",),
        "task": ("what trade is {name} in?",),
    },
    "colour": {
        "train": ("what is the favourite colour of {name}?",
                  "which colour does {name} like best?", "what colour does {name} love?"),
        "near": ("what colour does {name} like best?",),
        "far": ("{name} likes which colour best?",),
        "val_near": ("which colour does {name} love?",),
        "val_far": ("{name} loves which colour?",),
        "task": ("which is the favourite colour of {name}?",),
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

# Dreaming: prompts around a memory (`context`) for the three kinds of dream, and the short fact
# sentences an "implications" dream should produce (`World.dream_examples` renders the targets).
DREAM_TEMPLATES: dict[str, str] = {
    "implications": "{context} implications:",
    "qa": "{context} questions and answers:",
    "rewrite": "{context} in other words:",
}
DREAM_KINDS = tuple(DREAM_TEMPLATES)
FACT_TEMPLATES: dict[str, str] = {
    "city": "{name} lives in {city}.",
    "year": "{name} was born in {year}.",
    "trade": "{name} works as a {trade}.",
    "colour": "{name} likes {colour} best.",
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_NAME_SYLLABLES = (3, 4)  # a name has 3 or 4 syllable words
SPLITS = ("old", "new", "task")
# The wordings `World.qa` asks each split in: TASK entities only in the task wording, and the
# task wording only for them (so it never reaches OLD/NEW training or evaluation).
SPLIT_WORDINGS: dict[str, tuple[str, ...]] = {
    "old": tuple(w for w in WORDINGS if w != TASK_WORDING),
    "new": tuple(w for w in WORDINGS if w != TASK_WORDING),
    "task": (TASK_WORDING,),
}


def _all_templates() -> list[str]:
    texts = list(PASSAGE_TEMPLATES) + list(SEEDING_TEMPLATES) + list(GENERAL_TEMPLATES)
    texts += [t for per in QUESTION_TEMPLATES.values() for ts in per.values() for t in ts]
    texts += list(DREAM_TEMPLATES.values()) + list(FACT_TEMPLATES.values())
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


def _wording_templates(wordings: Iterable[str]) -> frozenset[str]:
    return frozenset(t for per in QUESTION_TEMPLATES.values() for w in wordings for t in per[w])


def template_sets() -> tuple[frozenset[str], frozenset[str]]:
    """(seeding templates, evaluation templates): the held-out EVALUATION (near, far) wordings.

    Seeding must never see an evaluation wording; tests check the two sets are disjoint and that
    no rendered seeding prompt equals a rendered evaluation question. The validation wordings are
    not part of the evaluation set (see `validation_templates`).
    """
    return frozenset(SEEDING_TEMPLATES), _wording_templates(EVALUATION)


def validation_templates() -> frozenset[str]:
    """The VALIDATION (val_near, val_far) question templates of every attribute.

    Held out like the evaluation wordings (no training, seeding or dreaming text uses them) but
    distinct from them, so settings chosen on validation questions say nothing about evaluation
    wordings; tests check they are disjoint from train, evaluation, task and seeding templates.
    """
    return _wording_templates(VALIDATION)


def task_templates() -> frozenset[str]:
    """The "task" question templates: the only wording of TASK entities, never evaluated."""
    return _wording_templates((TASK_WORDING,))


def closed_book_prompt(q: str) -> str:
    """The demo's closed-book prompt around a question."""
    return CLOSED_BOOK_FORMAT.format(question=q)


def open_book_prompt(context: str, q: str) -> str:
    """The demo's open-book prompt: context (passages) then the question."""
    return OPEN_BOOK_FORMAT.format(context=context, question=q)


def dream_prompt(kind: str, context: str) -> str:
    """The dreaming prompt of `kind` (a DREAM_TEMPLATES key) around `context` (memory passages)."""
    if kind not in DREAM_TEMPLATES:
        raise ValueError(f"unknown dream kind {kind!r}; allowed: {DREAM_KINDS}")
    return DREAM_TEMPLATES[kind].format(context=context)


def _count_words(text: str) -> int:
    """Word-level tokens of `text`: each run of letters/digits and each other mark is one token,
    as the word-level tokenizer splits it."""
    return len(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text))


def _longest(templates: Iterable[str]) -> int:
    """Tokens of the longest rendering of `templates`: a name of the most syllables allowed and
    one token for every other placeholder (every attribute value is one token)."""
    name = " ".join(["x"] * max(_NAME_SYLLABLES))
    return max(_count_words(re.sub(r"\{name\}", name, re.sub(r"\{(?!name\})\w+\}", "x", t)))
               for t in templates)


def max_context_words(k: int) -> int:
    """Upper bound on the tokens (words + punctuation marks) of a context of `k` passages.

    Computed from the templates, not from a world: the longest PASSAGE_TEMPLATES entry rendered
    with a name of the most syllables (4; the name appears up to 3 times) and one token per
    attribute value, times k (passages are joined by a space, which adds no token). The bound is
    reached by k passages of that template about 4-syllable names. Add what goes around the
    context (`max_open_book_words`) and <bos>/<eos> to choose a sequence length.
    """
    if k < 0:
        raise ValueError(f"k (passages in the context) must be >= 0, got {k}")
    return k * _longest(PASSAGE_TEMPLATES)


def max_open_book_words(k: int, wordings: Iterable[str] = WORDINGS) -> int:
    """Upper bound on the tokens of an open-book example with `k` passages: OPEN_BOOK_FORMAT around
    the longest k-passage context (`max_context_words`) and the longest question of `wordings`,
    plus the one-token answer. <bos>/<eos> (added by the data pipeline) are not counted."""
    wordings = tuple(wordings)
    for w in wordings:
        if w not in WORDINGS:
            raise ValueError(f"unknown wording {w!r}; allowed: {WORDINGS}")
    frame = _count_words(OPEN_BOOK_FORMAT.format(context="", question=""))
    q = _longest(t for per in QUESTION_TEMPLATES.values() for w in wordings for t in per[w])
    return frame + max_context_words(k) + q + 1


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
