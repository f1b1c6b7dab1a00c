"""The wake/sleep cycle over a stream of memories (``sleep-jax cycle``).

Memories arrive in order. WAKE: each memory enters a bounded short-term store (the most recent
``store_size`` memories) and questions about it are answered with the store in context. SLEEP
fires every ``sleep_every`` memories, or when the store is full, whichever comes first (so the
period is min(sleep_every, store_size)); the memories left at the end of the stream make a last,
shorter cycle. A sleep is ``sleep.sleep_checkpoint`` on the previous cycle's checkpoint: the
next free expert slot is seeded with this cycle's memories, with replay of every earlier
sleep's prompts (read from the checkpoint), then the store is emptied. When the slots run out,
``SleepConfig.when_full`` decides ("grow": E -> E + slots more, function preserving; "error":
refuse), never an overwrite.

After every cycle k (and once before any sleep, k = 0) every memory set j is measured
closed-book on its probes, learned or not: row k of the (T+1) x T accuracy matrix
(``eval.matrix``: ACC, BWT, FWT, forgetting, learning accuracy), plus KL to the base model on
general text when texts are given.

Files in the workdir: ``cycle_KKK/`` (the sleep's run folder; ``cycle_KKK/model`` is checkpoint
version K), ``events.jsonl`` (one record per finished cycle: memories, slot, steps, the matrix
row, wake accuracy, time; written atomically), ``report.json``/``report.md``/PNGs
(``eval.cycle_report``). Killed at any point and re-run with the same arguments, the cycle
resumes: finished cycles are read from the event log, a cycle in progress resumes inside its
sleep (the run loop's checkpoints), and the figures are those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sleep_jax.distill import seeding
from sleep_jax.sleep import ReplayConfig, SleepConfig, sleep_checkpoint

EVENTS = "events.jsonl"


@dataclasses.dataclass(frozen=True)
class CycleConfig:
    """When sleep fires: every ``sleep_every`` memories or when the store of ``store_size``
    memories is full. ``kl_texts``: how many general texts KL to the base uses (0: none)."""

    sleep_every: int = 4
    store_size: int = 4
    kl_texts: int = 64

    def __post_init__(self):
        for name in ("sleep_every", "store_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CycleConfig.{name}={v!r} must be an integer >= 1")
        if self.kl_texts < 0:
            raise ValueError(f"CycleConfig.kl_texts={self.kl_texts} must be >= 0")

    @property
    def period(self) -> int:
        return min(self.sleep_every, self.store_size)


def schedule(memories: Sequence, cfg: CycleConfig) -> list[list]:
    """The memory sets of the cycles, in arrival order: consecutive chunks of ``cfg.period``
    memories (the last one shorter when the stream does not divide)."""
    if not memories:
        raise ValueError("the memory stream is empty")
    p = cfg.period
    return [list(memories[i:i + p]) for i in range(0, len(memories), p)]


def _kw(tokens: Mapping, cfg: SleepConfig) -> dict:
    return dict(bos_id=tokens.get("bos_id") if tokens.get("add_bos", True) else None,
                eos_id=tokens.get("eos_id"), pad_id=tokens.get("pad_id") or 0,
                max_new_tokens=cfg.eval_tokens)


def closed_book_row(model, tokenizer, probe_sets: Sequence[Sequence], *, tokens: Mapping,
                    cfg: SleepConfig) -> list[float]:
    """Closed-book exact match of ``model`` on each set's probes: one matrix row [T]."""
    from sleep_jax.eval import probes as probe_eval
    from sleep_jax.eval import qa

    fmt = lambda q: cfg.prompt_format.format(question=q)
    flat = [pr for ps in probe_sets for pr in ps]
    preds = probe_eval.answer(model, tokenizer, [fmt(pr.question) for pr in flat],
                              **_kw(tokens, cfg))
    row, i = [], 0
    for ps in probe_sets:
        hits = [qa.exact_match(preds[i + n], list(pr.answers)) for n, pr in enumerate(ps)]
        row.append(float(np.mean(hits)) if hits else float("nan"))
        i += len(ps)
    return row


def wake_accuracy(model, tokenizer, store: Sequence, probes: Sequence, *, tokens: Mapping,
                  cfg: SleepConfig) -> float:
    """WAKE: exact match on ``probes`` with the store's memories (oldest first) in context."""
    from sleep_jax.eval import probes as probe_eval

    context = " ".join(m.text for m in store)
    prompts = [context + cfg.memory_separator + cfg.prompt_format.format(question=pr.question)
               for pr in probes]
    return float(probe_eval.qa_scores(model, tokenizer, prompts,
                                      [list(pr.answers) for pr in probes],
                                      **_kw(tokens, cfg))["em"])


def read_events(workdir: str) -> list[dict]:
    path = os.path.join(workdir, EVENTS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_events(workdir: str, events: list[dict]) -> None:
    from sleep_jax.atomic import write_text

    write_text(os.path.join(workdir, EVENTS), "".join(json.dumps(e) + "\n" for e in events))


def run_cycle(base_dir: str, memories: Sequence, probes: Sequence, *, workdir: str,
              cfg: CycleConfig, sleep_cfg: SleepConfig, seeding_cfg: seeding.SeedingConfig,
              replay: ReplayConfig, texts: Sequence[str] = (), mesh=None,
              log_fn: Callable | None = None) -> dict:
    """Wake/sleep cycles over ``memories`` (arrival order) from the checkpoint ``base_dir``.

    ``probes`` (``memory_id``/``question``/``answers``) are the held-out questions each set is
    measured on; ``texts`` general text for KL to the base. Returns
    {"matrix": [T+1][T], "events": [...], "report": cycle_report dict}; resumable (module
    docstring).
    """
    from sleep_jax.eval import cycle_report
    from sleep_jax.eval.probes import kl_to_base
    from sleep_jax.models.checkpoint_dir import load_checkpoint

    os.makedirs(workdir, exist_ok=True)
    sets = schedule(memories, cfg)
    by_memory: dict[str, list] = {}
    for pr in probes:
        by_memory.setdefault(pr.memory_id, []).append(pr)
    probe_sets = [[pr for m in s for pr in by_memory.get(m.id, [])] for s in sets]
    base, tok, meta = load_checkpoint(base_dir)
    tokens = dict(meta["tokens"])
    general = list(texts)[:cfg.kl_texts] if cfg.kl_texts else []

    def kl(model):
        if not general:
            return None  # not measured
        return kl_to_base(model, base, tok, general, bos_id=_kw(tokens, sleep_cfg)["bos_id"],
                          pad_id=tokens.get("pad_id") or 0)

    events = read_events(workdir)
    if events and events[0].get("memory_sets") != [[m.id for m in s] for s in sets]:
        raise ValueError(f"{workdir}/{EVENTS} was written for another memory stream or "
                         "schedule; use a new workdir")
    if not events:  # row 0: before any sleep
        events.append({"cycle": 0, "checkpoint": os.path.abspath(base_dir),
                       "memory_sets": [[m.id for m in s] for s in sets],
                       "row": closed_book_row(base, tok, probe_sets, tokens=tokens,
                                              cfg=sleep_cfg)})
        _write_events(workdir, events)
    for k in range(len(events), len(sets) + 1):
        t0 = time.time()
        prev = events[-1]["checkpoint"]
        model_prev, tok_prev, meta_prev = load_checkpoint(prev)
        store = sets[k - 1][-cfg.store_size:]
        wake = wake_accuracy(model_prev, tok_prev, store, probe_sets[k - 1], tokens=tokens,
                             cfg=sleep_cfg)
        run_dir = os.path.join(workdir, f"cycle_{k:03d}")
        rep = sleep_checkpoint(prev, model_prev, tok_prev, meta_prev, sets[k - 1],
                               probe_sets[k - 1], workdir=run_dir, cfg=sleep_cfg,
                               seeding_cfg=seeding_cfg, replay=replay, log_fn=log_fn,
                               mesh=mesh)
        model_dir = os.path.join(run_dir, "model")
        model, _, _ = load_checkpoint(model_dir)
        events.append({"cycle": k, "version": k, "checkpoint": os.path.abspath(model_dir),
                       "memories": [m.id for m in sets[k - 1]], "slot": rep["slot"],
                       "slots": model.config.expert_slots, "steps": rep["steps"],
                       "status": rep["status"], "wake_in_context": wake,
                       "row": closed_book_row(model, tok, probe_sets, tokens=tokens,
                                              cfg=sleep_cfg),
                       "kl_to_base": kl(model), "time_s": time.time() - t0})
        _write_events(workdir, events)
    matrix = [e["row"] for e in events]
    method = {"matrix": matrix, "kl_to_base": [e["kl_to_base"] for e in events[1:]],
              "time_s": [e["time_s"] for e in events[1:]]}
    report = cycle_report.build({"sleep": method})
    cycle_report.write_report(report, workdir)
    return {"matrix": matrix, "events": events, "report": report}
