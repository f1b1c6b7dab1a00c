"""The task set a dream generator trains on: (context, questions) records in JSONL, and the
padded device arrays (``DreamBatch`` rows) built from them.

One JSON object per line, UTF-8, blank lines skipped, other keys ignored::

    {"id": "task-000", "context": "ka lo mi lives in oslo. ...",
     "questions": [{"question": "where does ka lo mi live?", "answers": ["oslo"],
                    "candidates": ["oslo", "rome", "lima"]}, ...]}

  id: non-empty string, unique in the file. context: non-empty string (the passage C the
  generator dreams about; no question in it is needed). questions: a non-empty list; each has
  question (non-empty string), answers (non-empty list of non-empty strings; the first is the
  one tau scores) and optionally candidates (a list of distinct non-empty strings holding
  answers[0]; the other entries are the wrong answers tau contrasts it with). Without
  candidates a question's candidates are answers[0] plus the first answers of the questions at
  the same position in the other records (distinct values, the file's order), which for a set
  of entities asked the same attributes in the same order is "the other entities' answers for
  the same attribute" (``tau.world_tau``). A question needs at least 2 candidates.

A bad line stops reading with a ``data.jsonl.JsonlError`` naming the file, the line and the
offending value. ``world_task_records`` exports the demo world's TASK split in this format (the
"task" wording only: no evaluation or validation wording, no OLD/NEW entity).

Shapes: N records, P dream-prompt width, Tc context width, Q questions, K candidates, Pq
question-prompt width, A answer width.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from sleep_jax.data.jsonl import JsonlError, write_jsonl


@dataclasses.dataclass(frozen=True)
class TaskQuestion:
    question: str
    answers: tuple[str, ...]
    candidates: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Task:
    """One context with its questions."""

    id: str
    context: str
    questions: tuple[TaskQuestion, ...]


def _text(obj, key: str, fail, where: str) -> str:
    if key not in obj:
        fail(f"{where}missing key {key!r} (keys present: {sorted(obj)})")
    v = obj[key]
    if not isinstance(v, str) or not v.strip():
        fail(f"{where}key {key!r} must be a non-empty string, got {v!r}")
    return v


def _texts(obj, key: str, fail, where: str) -> tuple[str, ...]:
    v = obj[key]
    if not isinstance(v, list) or not v:
        fail(f"{where}key {key!r} must be a non-empty list of strings, got {v!r}")
    for i, x in enumerate(v):
        if not isinstance(x, str) or not x.strip():
            fail(f"{where}{key}[{i}] must be a non-empty string, got {x!r}")
    return tuple(v)


def read_tasks(path: str | os.PathLike) -> list[Task]:
    """Reads a task-set file (module docstring); at least 2 candidates per question."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task-set JSONL file not found: {path!r}")
    tasks, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue

            def fail(msg, number=number):
                raise JsonlError(path, number, msg)

            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"invalid JSON ({e.msg} at column {e.colno})")
            if not isinstance(obj, dict):
                fail(f"expected a JSON object, got {type(obj).__name__}")
            tid = _text(obj, "id", fail, "")
            if tid in seen:
                fail(f"duplicate id {tid!r} (first seen on line {seen[tid]})")
            seen[tid] = number
            context = _text(obj, "context", fail, "")
            qs = obj.get("questions")
            if not isinstance(qs, list) or not qs:
                fail(f"key 'questions' must be a non-empty list of objects, got {qs!r:.80}")
            out = []
            for i, q in enumerate(qs):
                where = f"questions[{i}]: "
                if not isinstance(q, dict):
                    fail(f"{where}expected an object, got {q!r:.80}")
                question = _text(q, "question", fail, where)
                if "answers" not in q:
                    fail(f"{where}missing key 'answers' (keys present: {sorted(q)})")
                answers = _texts(q, "answers", fail, where)
                cands = None
                if q.get("candidates") is not None:
                    cands = _texts(q, "candidates", fail, where)
                    if len(set(cands)) != len(cands):
                        fail(f"{where}candidates {list(cands)} repeat a value")
                    if answers[0] not in cands:
                        fail(f"{where}candidates {list(cands)} do not hold the answer "
                             f"{answers[0]!r}")
                    if len(cands) < 2:
                        fail(f"{where}candidates {list(cands)}: at least 2 needed (the answer "
                             f"and a wrong one)")
                out.append(TaskQuestion(question, answers, cands))
            tasks.append(Task(tid, context, tuple(out)))
    if not tasks:
        raise JsonlError(path, None, f"task-set file {path!r} has no records (expected one "
                                     "JSON object per line)")
    return tasks


def candidates(tasks: Sequence[Task]) -> list[list[tuple[str, ...]]]:
    """Every question's candidates, answers[0] first (module docstring for the default);
    raises ValueError naming the task and question left with fewer than 2."""
    out = []
    for t in tasks:
        row = []
        for i, q in enumerate(t.questions):
            if q.candidates is not None:
                c = [q.answers[0]] + [x for x in q.candidates if x != q.answers[0]]
            else:
                c = [q.answers[0]]
                for o in tasks:
                    if o is not t and i < len(o.questions) and o.questions[i].answers[0] not in c:
                        c.append(o.questions[i].answers[0])
            if len(c) < 2:
                raise ValueError(f"task {t.id!r} questions[{i}] ({q.question!r}) has only the "
                                 f"candidate {c}: give 'candidates' or more records asking a "
                                 f"question at position {i}")
            row.append(tuple(c))
        out.append(row)
    return out


def world_task_records(world) -> list[dict]:
    """The TASK split of a ``data.world.World`` as task-set records: each TASK entity's passage
    (template 0) and its attributes asked in the "task" wording, candidates the distinct values
    the TASK entities hold for the attribute (as ``tau.world_tau``)."""
    from sleep_jax.data import world as W

    task = world.entities("task")
    if not task:
        raise ValueError("this world has no TASK entities (make_world(..., n_task=0))")
    recs = []
    for e in task:
        qs = []
        for a in W.ATTRIBUTES:
            right = e.attributes[a]
            others = sorted({x.attributes[a] for x in task} - {right})
            qs.append({"question": W.question(e, a, W.TASK_WORDING), "answers": [right],
                       "candidates": [right] + others})
        recs.append({"id": e.id, "context": W.passage(e, 0), "questions": qs})
    return recs


def export_world_tasks(world, path: str | os.PathLike) -> str:
    """Writes ``world_task_records(world)`` to ``path`` (atomically); returns the path."""
    write_jsonl(path, world_task_records(world))
    return os.fspath(path)


@dataclasses.dataclass
class TaskArrays:
    """The task set as padded host arrays, one row per record (index them, then
    ``as_batch``): prompt [N,P] int32 right-padded, prompt_len [N]; ctx [N,Tc] int32 and
    ctx_mask [N,Tc] ([BOS] + C, left-aligned); tau fields [N,Q,...] (questions and candidates
    padded: a padded question repeats the record's first one, so the mean over questions
    weighs a record's real questions as given only when all have Q; see ``q_mask``)."""

    prompt: np.ndarray
    prompt_len: np.ndarray
    ctx: np.ndarray
    ctx_mask: np.ndarray
    tau_prompt: np.ndarray
    tau_prompt_len: np.ndarray
    answers: np.ndarray
    answer_mask: np.ndarray
    correct: np.ndarray
    q_mask: np.ndarray

    def as_batch(self, idx):
        """A ``iteration.DreamBatch`` of the records ``idx`` (jnp arrays)."""
        import jax.numpy as jnp

        from sleep_jax.dream.iteration import DreamBatch
        from sleep_jax.dream.tau import Tau

        j = lambda x: jnp.asarray(x[idx])
        return DreamBatch(prompt=j(self.prompt), prompt_len=j(self.prompt_len), ctx=j(self.ctx),
                          ctx_mask=j(self.ctx_mask),
                          tau=Tau(j(self.tau_prompt), j(self.tau_prompt_len), j(self.answers),
                                  j(self.answer_mask), j(self.correct)))


def task_arrays(tasks: Sequence[Task], encode: Callable[[str], Sequence[int]], *,
                dream_template: str, prompt_format: str, bos_id: int, pad_id: int = 0
                ) -> TaskArrays:
    """Tokenise the task set (host side).

    dream_template: the dream prompt around C, a format string with the one field {context}
      (e.g. ``world.DREAM_TEMPLATES["implications"]``); prompt_format: a question's closed-book
      prompt with the one field {question}. Candidates are encoded with a leading space
      (" oslo"), as answers follow "answer:" in training. Every prompt starts with BOS.
    """
    cands = candidates(tasks)
    N = len(tasks)
    Q = max(len(t.questions) for t in tasks)
    enc = lambda s: list(encode(s))
    prompts = [[bos_id] + enc(dream_template.format(context=t.context)) for t in tasks]
    ctxs = [[bos_id] + enc(t.context) for t in tasks]
    qp = [[[bos_id] + enc(prompt_format.format(question=q.question)) for q in t.questions]
          for t in tasks]
    qa = [[[enc(" " + c) for c in cs] for cs in row] for row in cands]
    for t, row in zip(tasks, qa):
        for i, cs in enumerate(row):
            if any(not a for a in cs):
                raise ValueError(f"task {t.id!r} questions[{i}]: a candidate encodes to no "
                                 f"tokens")
    P = max(map(len, prompts))
    Tc = max(map(len, ctxs))
    Pq = max(len(p) for r in qp for p in r)
    K = max(len(cs) for r in qa for cs in r)
    A = max(len(a) for r in qa for cs in r for a in cs)
    out = TaskArrays(
        prompt=np.full((N, P), pad_id, np.int32), prompt_len=np.zeros(N, np.int32),
        ctx=np.full((N, Tc), pad_id, np.int32), ctx_mask=np.zeros((N, Tc), bool),
        tau_prompt=np.full((N, Q, Pq), pad_id, np.int32),
        tau_prompt_len=np.zeros((N, Q), np.int32),
        answers=np.full((N, Q, K, A), pad_id, np.int32),
        answer_mask=np.zeros((N, Q, K, A), bool), correct=np.zeros((N, Q), np.int32),
        q_mask=np.zeros((N, Q), bool))
    for n in range(N):
        out.prompt[n, :len(prompts[n])] = prompts[n]
        out.prompt_len[n] = len(prompts[n])
        out.ctx[n, :len(ctxs[n])] = ctxs[n]
        out.ctx_mask[n, :len(ctxs[n])] = True
        for q in range(Q):
            src = q if q < len(qp[n]) else 0  # padding: the first question again
            out.q_mask[n, q] = q < len(qp[n])
            p = qp[n][src]
            out.tau_prompt[n, q, :len(p)] = p
            out.tau_prompt_len[n, q] = len(p)
            for k, a in enumerate(qa[n][src]):
                out.answers[n, q, k, :len(a)] = a
                out.answer_mask[n, q, k, :len(a)] = True
    return out
