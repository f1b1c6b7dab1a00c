"""The JSONL files users bring (memories, probes, texts): strict readers and atomic writers.

One JSON object per line, UTF-8; blank lines are skipped; keys other than those below are
ignored, so files may carry extra metadata.

memories (what the model is told while awake; each becomes knowledge to consolidate in sleep)::

    {"id": "m1", "text": "Ada Vell lives in Porto."}

  `id`: non-empty string, unique in the file. `text`: non-empty string.

probes (closed-book questions that test whether a memory was consolidated)::

    {"memory_id": "m1", "question": "Where does Ada Vell live?", "answers": ["Porto"]}

  `memory_id`: the `id` of a memory (checked when the memory ids are given). `question`: non-empty
  string. `answers`: non-empty list of non-empty strings; any one counts as correct. Optional
  `split`: a string naming the probe's set (e.g. "val" to choose settings on, "test" to
  report); a report then gives each split's scores.

questions (general knowledge for retention, no memory: ``read_questions``)::

    {"question": "What is the capital of France?", "answers": ["Paris"]}

texts (plain text for language-model training)::

    {"text": "Any text."}

A bad line stops reading with a `JsonlError` that names the file, the line number and what is
wrong (invalid JSON, not an object, missing key, wrong type, empty value, duplicate id, unknown
memory id). A file with no records (empty, or blank lines only) is a `JsonlError` too ("memories
file X has no records"), as are probes read against an empty set of memory ids. The files hold
text only; token ids are made (and checked against the model's vocabulary) by the tokenizer
layer. `write_jsonl` writes through `sleep_jax.atomic.atomic_open` (a temporary file and
`os.replace`), so a reader never sees a half-written file, even when writing fails part way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

from sleep_jax.atomic import atomic_open


class JsonlError(ValueError):
    """A line of a JSONL file that does not follow its format (line None: the whole file)."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line = path, line
        super().__init__(f"{path}: {message}" if line is None else f"{path}:{line}: {message}")


@dataclasses.dataclass(frozen=True)
class Memory:
    """One memory: a passage the model reads while awake."""

    id: str
    text: str


@dataclasses.dataclass(frozen=True)
class Probe:
    """One closed-book question about a memory, with its accepted answers."""

    memory_id: str
    question: str
    answers: tuple[str, ...]
    split: str = ""  # optional: e.g. "val" (choose settings on it) or "test" (report it)


@dataclasses.dataclass(frozen=True)
class Text:
    """One training text."""

    text: str


_R = TypeVar("_R")


@dataclasses.dataclass(frozen=True)
class _Line:
    """Where a record came from, to name it in errors."""

    path: str
    number: int

    def fail(self, message: str) -> NoReturn:
        raise JsonlError(self.path, self.number, message)


def _field(obj: Mapping[str, Any], key: str, kind: type, line: _Line) -> Any:
    if key not in obj:
        line.fail(f"missing key {key!r} (keys present: {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        line.fail(f"key {key!r} must be a {kind.__name__}, got {type(value).__name__}: {value!r}")
    if kind is str and not value.strip():
        line.fail(f"key {key!r} is empty")
    return value


def _read(path: str | os.PathLike, parse: Callable[[dict, _Line], _R], kind: str) -> list[_R]:
    """Reads `path` line by line, giving each JSON object and its `_Line` to `parse`.

    `kind` ("memories", "probes", "texts") names the file when it holds no records.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSONL file not found: {path!r}")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            line = _Line(path, number)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise JsonlError(path, number, f"invalid JSON ({e.msg} at column {e.colno})"
                                 ) from None
            if not isinstance(obj, dict):
                line.fail(f"expected a JSON object, got {type(obj).__name__}")
            records.append(parse(obj, line))
    if not records:
        raise JsonlError(path, None, f"{kind} file {path!r} has no records (it is empty or "
                                     "holds only blank lines; expected one JSON object per line)")
    return records


def read_memories(path: str | os.PathLike) -> list[Memory]:
    """Reads a memories file: lines `{"id": str, "text": str}` with unique ids."""
    seen: dict[str, int] = {}

    def parse(obj: dict, line: _Line) -> Memory:
        memory = Memory(_field(obj, "id", str, line), _field(obj, "text", str, line))
        if memory.id in seen:
            line.fail(f"duplicate id {memory.id!r} (first seen on line {seen[memory.id]})")
        seen[memory.id] = line.number
        return memory

    return _read(path, parse, "memories")


def read_probes(
    path: str | os.PathLike, memory_ids: Collection[str] | None = None
) -> list[Probe]:
    """Reads a probes file: lines `{"memory_id": str, "question": str, "answers": [str, ...]}`.

    Args:
      path: the file.
      memory_ids: when given, every probe's `memory_id` must be one of these (an empty
        collection is refused: there is nothing a probe could refer to).
    """
    known = None if memory_ids is None else set(memory_ids)
    if known is not None and not known:
        raise ValueError(f"read_probes({os.fspath(path)!r}): memory_ids is empty, so no probe "
                         "can name a memory; read a memories file with at least one record")

    def parse(obj: dict, line: _Line) -> Probe:
        memory_id = _field(obj, "memory_id", str, line)
        if known is not None and memory_id not in known:
            line.fail(f"unknown memory_id {memory_id!r} (not among the {len(known)} memory ids)")
        question = _field(obj, "question", str, line)
        answers = _answers(obj, line)
        split = obj.get("split", "")
        if not isinstance(split, str):
            line.fail(f"key 'split' must be a string, got {split!r}")
        return Probe(memory_id, question, answers, split)

    return _read(path, parse, "probes")


def _answers(obj: dict, line: _Line) -> tuple[str, ...]:
    answers = _field(obj, "answers", list, line)
    if not answers:
        line.fail("key 'answers' is an empty list; give at least one accepted answer")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            line.fail(f"answers[{i}] must be a non-empty string, got {answer!r}")
    return tuple(answers)


def read_questions(path: str | os.PathLike) -> list[Probe]:
    """Reads a questions file (no memory): lines `{"question": str, "answers": [str, ...]}`,
    as Probes with an empty `memory_id`."""
    return _read(path, lambda obj, line: Probe("", _field(obj, "question", str, line),
                                               _answers(obj, line)), "questions")


def read_prompts(path: str | os.PathLike,
                 memory_ids: Collection[str] | None = None) -> dict[str, list[str]]:
    """Reads a seeding-prompts file: lines `{"memory_id": str, "prompt": str}` -> {memory id:
    prompts in file order}; with ``memory_ids`` every one must be known."""
    known = None if memory_ids is None else set(memory_ids)

    def parse(obj: dict, line: _Line) -> tuple[str, str]:
        memory_id = _field(obj, "memory_id", str, line)
        if known is not None and memory_id not in known:
            line.fail(f"unknown memory_id {memory_id!r} (not among the {len(known)} memory ids)")
        return memory_id, _field(obj, "prompt", str, line)

    out: dict[str, list[str]] = {}
    for memory_id, prompt in _read(path, parse, "prompts"):
        out.setdefault(memory_id, []).append(prompt)
    return out


def read_texts(path: str | os.PathLike) -> list[Text]:
    """Reads a texts file: lines `{"text": str}`."""
    return _read(path, lambda obj, line: Text(_field(obj, "text", str, line)), "texts")


def _to_json(record: Any) -> Any:
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        record = dataclasses.asdict(record)
    if not isinstance(record, Mapping):
        raise TypeError(f"records must be dataclasses or mappings, got {type(record).__name__}")
    return record


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Writes records (dataclasses or dicts) one JSON object per line, atomically.

    The lines go to a temporary file in the same directory (`sleep_jax.atomic.atomic_open`),
    which replaces `path` only once all records are written and flushed; if anything fails
    (including the `records` iterator), the temporary file is removed and `path` is left as it
    was.

    Returns:
      The number of records written.
    """
    count = 0
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(_to_json(record), ensure_ascii=False) + "\n")
            count += 1
    return count
