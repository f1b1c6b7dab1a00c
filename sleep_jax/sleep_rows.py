"""A sleep's rows and batches (``sleep_jax.sleep``, step 2): seeding prompts given or cut from
the memories (prompts holding a probe question dropped), every sleep's prompts stored beside
the model (``PROMPTS_FILE``), the replay rows, the seeding batches (``batch_fn``) and the SFT
objective's batches (``sft_batches``, replaying wake texts). Host-side code: token ids and
numpy; the configs are ``sleep.SleepConfig`` / ``sleep.ReplayConfig`` (read, not imported).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from sleep_jax.distill import seeding

if TYPE_CHECKING:
    from sleep_jax.sleep import ReplayConfig, SleepConfig

log = logging.getLogger("sleep_jax.sleep")

PROMPTS_FILE = "sleep_prompts.jsonl"  # beside the model: every sleep's seeding prompts


def memory_prompts(text: str, max_per_memory: int = 24) -> list[str]:
    """Continuation prompts cut from each sentence of a memory (after word 2..n-1)."""
    out = []
    for sent in re.split(r"(?<=[.!?])\s+", text.strip()):
        words = sent.split()
        out += [" ".join(words[:k]) for k in range(2, len(words))]
    return out[:max_per_memory]


def drop_probe_overlap(prompts: list[str], questions: list[str]) -> tuple[list[str], int]:
    """Remove prompts that contain (or equal) a probe question, case-insensitively."""
    qs = [q.strip().lower() for q in questions]
    keep = [p for p in prompts if not any(q and q in p.lower() for q in qs)]
    return keep, len(prompts) - len(keep)


def read_sleep_prompts(checkpoint_dir: str | os.PathLike) -> list[dict]:
    """Earlier sleeps' seeding prompts stored beside a model ([] when there are none)."""
    path = os.path.join(os.fspath(checkpoint_dir), PROMPTS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_sleep_prompts(checkpoint_dir: str | os.PathLike, records: Sequence[dict]) -> str:
    """Write the seeding-prompt records beside a model (atomically)."""
    from sleep_jax.atomic import write_text

    return write_text(os.path.join(os.fspath(checkpoint_dir), PROMPTS_FILE),
                      "".join(json.dumps(r) + "\n" for r in records))


@dataclasses.dataclass
class Rows:
    """Token rows of one sleep: seeding (memory ids, prompt ids) and replay ([], prompt ids)."""

    seeding: list[tuple[list[int], list[int]]]
    replay: list[tuple[list[int], list[int]]]
    records: list[dict]  # this sleep's seeding prompts, for PROMPTS_FILE
    dropped: int  # prompts dropped for overlapping a probe
    earlier: int  # replay rows from earlier sleeps
    head: list[int] = dataclasses.field(default_factory=list)  # student's chat head (chat_parts)


_SENTINEL = "\x00SLEEP_JAX_USER_TEXT\x00"


def chat_parts(tokens: Mapping, tokenizer) -> tuple[str, str]:
    """(head, tail): a chat template's text before and after one user turn's content, ending
    with the assistant's header (``models.cli.render_chat``), so that ``head + text + tail``
    is ``text`` asked as a user. A template that does not keep the text verbatim is refused."""
    from sleep_jax.models.chat import render_chat

    template = tokens.get("chat_template")
    if not template:
        raise ValueError("SleepConfig.chat=True but the checkpoint has no chat template "
                         "(tokens.chat_template is empty); set sleep.chat=False")
    text = render_chat(template, _SENTINEL, tokens, tokenizer)
    if text.count(_SENTINEL) != 1:
        raise ValueError("SleepConfig.chat=True: the chat template does not place the user's "
                         "text verbatim once; set sleep.chat=False")
    head, tail = text.split(_SENTINEL)
    return head, tail


def seeding_rows(tokenizer, memories, *, cfg: SleepConfig, replay: ReplayConfig,
                 prompts: Mapping[str, Sequence[str]] | None = None,
                 replay_prompts: Sequence[str] | None = None,
                 replay_ids: Sequence[Sequence[int]] | None = None,
                 earlier: Sequence[dict] = (), probe_questions: Sequence[str] = (),
                 sleep_index: int = 0, slot: int | None = None,
                 tokens: Mapping | None = None) -> Rows:
    """The seeding and replay rows of a sleep (see the module docstring, step 2).

    Args:
      tokenizer: has ``encode(text).ids``.
      memories: objects with ``id`` and ``text`` (``data.jsonl.Memory``), in order.
      prompts: {memory id: prompts} for ``cfg.prompts == "given"``.
      replay_prompts: the wake-knowledge replay prompts (``replay.source == "prompts"``).
      replay_ids: replay prompts already as ids (``replay.source == "samples"``).
      earlier: earlier sleeps' prompt records (``read_sleep_prompts``).
      probe_questions: evaluation questions; prompts containing one are dropped.
      tokens: the checkpoint's special tokens and chat template (``cfg.chat``).
    """
    enc = lambda s: tokenizer.encode(s).ids
    # with a chat template: the teacher reads head + memory + prompt + tail (the memory opens
    # the user's turn), the student head + prompt + tail; a replay row is head + prompt + tail
    head, tail = chat_parts(tokens or {}, tokenizer) if cfg.chat else ("", "")
    h = enc(head) if head else []
    ask = (lambda ids: ids + enc(tail)) if tail else (lambda ids: ids)
    rows, records, dropped = [], [], 0
    for m in memories:
        if cfg.prompts == "given":
            if prompts is None or m.id not in prompts:
                raise ValueError(f"SleepConfig.prompts='given' but no prompts for memory "
                                 f"{m.id!r}")
            ps = list(prompts[m.id])
        else:
            ps = memory_prompts(m.text, cfg.max_prompts_per_memory)
        if probe_questions:
            ps, d = drop_probe_overlap(ps, list(probe_questions))
            dropped += d
        mem = h + enc(m.text + cfg.memory_separator)
        rows += [(mem, ask(enc(p))) for p in ps]
        records += [{"sleep": sleep_index, "slot": slot, "memory_id": m.id, "prompt": p}
                    for p in ps]
    if not rows:
        raise ValueError("no seeding prompts: none given or cut from the memories (or all "
                         "overlapped a probe question)")
    rep: list = []
    if replay.fraction > 0:
        if replay.source == "prompts":
            if not replay_prompts:
                raise ValueError("ReplayConfig.source='prompts' needs replay prompts")
            rep += [(h, ask(enc(p))) for p in replay_prompts]
        elif replay.source == "samples":
            rep += [(h, ask(list(p))) for p in (replay_ids or [])]
        elif replay.source == "texts":
            raise ValueError("ReplayConfig.source='texts' is the SFT objective's replay; "
                             "seeding replays 'prompts' or 'samples'")
    n_earlier = 0
    if replay.fraction > 0 and replay.earlier_sleeps:
        ps = [r["prompt"] for r in earlier]
        if probe_questions:  # an earlier sleep saw other probes: check against these too
            ps, d = drop_probe_overlap(ps, list(probe_questions))
            dropped += d
        rep += [(h, ask(enc(p))) for p in ps]
        n_earlier = len(ps)
    return Rows(rows, rep, records, dropped, n_earlier, h)


def sample_replay_prompts(model, *, replay: ReplayConfig, bos_id: int | None,
                          eos_id: int | None, pad_id: int, rng,
                          start: Sequence[int] = ()) -> list[list[int]]:
    """Prefixes of the model's own unconditional samples (replay prompts without labels);
    ``start``: ids after the BOS that every sample continues (a chat head: the model writes a
    user's message)."""
    from sleep_jax.sampling import generate

    n = replay.samples
    first = ([] if bos_id is None else [bos_id]) + list(start)
    if not first:
        raise ValueError("replay samples need a first token: a BOS id or a chat head")
    out = generate(model, np.tile(np.asarray(first, np.int32), (n, 1)),
                   np.full(n, len(first), np.int32), rng,
                   max_new_tokens=replay.sample_tokens, temperature=1.0, eos_id=eos_id,
                   pad_id=pad_id)
    from sleep_jax.runtime import host_read

    toks, lens = host_read((out.tokens, out.lengths))  # also when they span processes
    return [[int(t) for t in toks[i, :max(1, min(int(lens[i]) - 1, replay.prefix_tokens))]]
            for i in range(n) if lens[i] > 1]


def row_widths(rows: Rows, lengths: tuple[int, int] | None = None) -> tuple[int, int]:
    """(teacher P, student Q) row lengths: the longest rows' (+ 1 for a BOS), or ``lengths``
    when given (at least those; fixed lengths keep a step's shapes across sleeps)."""
    both = rows.seeding + rows.replay
    P = max(len(m) + len(p) for m, p in both) + 1
    Q = max(len(p) for _, p in both) + len(rows.head) + 1
    if lengths is not None:
        if lengths[0] < P or lengths[1] < Q:
            raise ValueError(f"row lengths {tuple(lengths)} are shorter than this sleep's "
                             f"longest rows (teacher {P}, student {Q})")
        P, Q = int(lengths[0]), int(lengths[1])
    return P, Q


def batch_fn(rows: Rows, *, batch_size: int, fraction: float, bos_id: int | None, pad_id: int,
             lengths: tuple[int, int] | None = None):
    """``fn(np_rng) -> SeedingBatch``: B - round(fraction * B) seeding rows and the rest replay
    rows, drawn with replacement and shuffled (the lambda split then hits both kinds).

    ``lengths``: (teacher P, student Q) row lengths (``row_widths``); fixed lengths keep the
    step's shapes, so a later sleep reuses its compiled program (the cycle passes the stream's
    longest rows)."""
    new, old = rows.seeding, rows.replay
    B = batch_size
    n_old = int(round(fraction * B)) if old else 0
    P, Q = row_widths(rows, lengths)

    def fn(rng: np.random.Generator):
        pick = [new[i] for i in rng.integers(0, len(new), B - n_old)]
        pick += [old[i] for i in rng.integers(0, len(old), n_old)] if n_old else []
        order = rng.permutation(B)
        pick = [pick[i] for i in order]
        return seeding.make_batch([m for m, _ in pick], [p for _, p in pick], bos_id=bos_id,
                                  teacher_len=P, student_len=Q, pad_id=pad_id,
                                  student_head=rows.head)

    return fn


def all_rows(rows: Rows, *, bos_id: int | None, pad_id: int,
             lengths: tuple[int, int] | None = None) -> tuple[seeding.SeedingBatch, np.ndarray]:
    """Every distinct seeding row, then every replay row, as one SeedingBatch (the widths of
    ``batch_fn``), and [N] bool marking the replay rows: what ``distill.cache`` caches."""
    both = rows.seeding + rows.replay
    P, Q = row_widths(rows, lengths)
    batch = seeding.make_batch([m for m, _ in both], [p for _, p in both], bos_id=bos_id,
                               teacher_len=P, student_len=Q, pad_id=pad_id,
                               student_head=rows.head)
    return batch, np.arange(len(both)) >= len(rows.seeding)


class ConcatBatches:
    """Batches whose rows are one batch of each iterator, concatenated (a fixed row ratio);
    resumable like its grain iterators (``get_state`` holds each one's state)."""

    def __init__(self, *iterators):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return [it.get_state() for it in self.iterators]

    def set_state(self, state) -> None:
        for it, s in zip(self.iterators, state):
            it.set_state(s)


def sft_batches(memories, tokenizer, *, cfg: SleepConfig, replay: ReplayConfig,
                replay_texts: Sequence | None, seed: int):
    """The SFT objective's batches: memory texts one per padded row (``cfg.sft_seq_len``)
    and, with ``replay.fraction`` > 0, ``round(fraction * batch_size)`` rows of the wake
    training examples ``replay_texts`` packed at the same length (``source="texts"``)."""
    from sleep_jax.data.pipeline import make_dataset

    n_replay = round(replay.fraction * cfg.batch_size) if replay.fraction > 0 else 0
    if replay.fraction > 0 and not n_replay:
        raise ValueError(f"ReplayConfig.fraction={replay.fraction} gives no replay row in a "
                         f"batch of {cfg.batch_size}: raise it to >= "
                         f"{0.5 / cfg.batch_size:.3g} or set 0")
    if n_replay and replay.source != "texts":
        raise ValueError(f"the SFT objective replays wake training texts: "
                         f"ReplayConfig.source={replay.source!r} must be 'texts' (or "
                         f"fraction 0)")
    if n_replay and not replay_texts:
        raise ValueError("ReplayConfig.source='texts' needs replay_texts (the wake examples)")
    if n_replay >= cfg.batch_size:
        raise ValueError(f"ReplayConfig.fraction={replay.fraction} leaves no memory row in a "
                         f"batch of {cfg.batch_size}")
    mem = iter(make_dataset([m.text for m in memories], tokenizer, seq_len=cfg.sft_seq_len,
                            batch_size=cfg.batch_size - n_replay, seed=seed, pack=False,
                            shard=(0, 1)))  # global batches: each process feeds its rows
    if not n_replay:
        return mem
    fits = fitting_examples(replay_texts, tokenizer, cfg.sft_seq_len)
    log.info("SFT replay: %d of %d wake examples fit sft_seq_len=%d (longer ones are left "
             "out: cut, a question would lose its answer)", len(fits), len(replay_texts),
             cfg.sft_seq_len)
    if not fits:
        raise ValueError(f"no replay text fits SleepConfig.sft_seq_len={cfg.sft_seq_len}")
    wake = iter(make_dataset(fits, tokenizer, seq_len=cfg.sft_seq_len, batch_size=n_replay,
                             seed=seed + 1, pack=True, shard=(0, 1)))
    return ConcatBatches(mem, wake)


def fitting_examples(examples: Sequence, tokenizer, seq_len: int) -> list:
    """The examples the data pipeline does not cut at ``seq_len``: bos + text [+ completion]
    + eos is at most seq_len + 1 tokens (a row holds inputs = all but the last)."""
    from sleep_jax.data.pipeline import split_example

    def n_tokens(ex) -> int:
        text, completion = split_example(ex)
        n = len(tokenizer.encode(text, add_special_tokens=False).ids) + 2
        if completion is not None:
            n += len(tokenizer.encode(completion, add_special_tokens=False).ids)
        return n

    return [ex for ex in examples if n_tokens(ex) - 1 <= seq_len]
