"""The wake/sleep cycle over a stream of memories (``sleep-jax cycle``).

Memories arrive in order. WAKE: each memory enters a bounded short-term store (the most recent
``store_size`` memories) and questions about it are answered with the store in context. SLEEP
fires every ``sleep_every`` memories, or when the store is full, whichever comes first (so the
period is min(sleep_every, store_size)); the memories left at the end of the stream make a last,
shorter cycle. A sleep (``sleep_cycle``) runs the sleep pipeline (``sleep.sleep``) on the
previous cycle's checkpoint with the method's configs (``CycleMethod``): by default the next
free expert slot is seeded with this cycle's memories, with replay of the wake knowledge and of
every earlier sleep's prompts (read from the checkpoint); baselines train the full model
(seeding without growth, SFT with replay of every earlier cycle's memories) or nothing
(in-context only). Then the store is emptied. When the slots run out,
``SleepConfig.when_full`` decides ("grow": E -> E + slots more, function preserving; "error":
refuse), never an overwrite. Every sleep of a stream uses the same seeding row lengths
(``row_lengths``), so the cycles after the first reuse its compiled step (with the persistent
compilation cache; new shapes only when the slots grow).

After every cycle k (and once before any sleep, k = 0) every memory set j is measured
closed-book on its probes, learned or not: row k of the (T+1) x T accuracy matrix
(``eval.matrix``: ACC, BWT, FWT, forgetting, learning accuracy), plus KL to the base model on
general text when texts are given and closed-book accuracy on the wake knowledge when OLD
probes are given (``CycleInputs``). ``run_methods`` runs several methods over one stream and
reports them side by side.

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
from sleep_jax.sleep import ReplayConfig, SleepConfig

EVENTS = "events.jsonl"


@dataclasses.dataclass(frozen=True)
class CycleConfig:
    """When sleep fires: every ``sleep_every`` memories or when the store of ``store_size``
    memories is full. ``kl_texts``: how many general texts KL to the base uses (0: none).
    ``compilation_cache``: keep compiled programs in ``<workdir>/jax_cache`` (unless
    JAX_COMPILATION_CACHE_DIR names another place), so every cycle after the first, and a
    resumed run, reuses the sleep's compiled step instead of compiling it again."""

    sleep_every: int = 4
    store_size: int = 4
    kl_texts: int = 64
    compilation_cache: bool = True  # jax's persistent cache in <workdir>/jax_cache

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


def use_compilation_cache(workdir: str) -> str:
    """Turn on jax's persistent compilation cache (``<workdir>/jax_cache``, or the directory
    JAX_COMPILATION_CACHE_DIR names; one already configured is kept); returns the directory."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(workdir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


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


def _set_row(model, tokenizer, prompts: Sequence[str], probe_sets: Sequence[Sequence], *,
             tokens: Mapping, cfg: SleepConfig) -> list[float]:
    """Exact match per set of greedy answers to ``prompts`` (one per probe, sets in order)."""
    from sleep_jax.eval import probes as probe_eval
    from sleep_jax.eval import qa

    preds = probe_eval.answer(model, tokenizer, list(prompts), **_kw(tokens, cfg))
    row, i = [], 0
    for ps in probe_sets:
        hits = [qa.exact_match(preds[i + n], list(pr.answers)) for n, pr in enumerate(ps)]
        row.append(float(np.mean(hits)) if hits else float("nan"))
        i += len(ps)
    return row


def closed_book_row(model, tokenizer, probe_sets: Sequence[Sequence], *, tokens: Mapping,
                    cfg: SleepConfig) -> list[float]:
    """Closed-book exact match of ``model`` on each set's probes: one matrix row [T]."""
    prompts = [cfg.prompt_format.format(question=pr.question) for ps in probe_sets for pr in ps]
    return _set_row(model, tokenizer, prompts, probe_sets, tokens=tokens, cfg=cfg)


def open_book_row(model, tokenizer, memories: Sequence, probe_sets: Sequence[Sequence], *,
                  tokens: Mapping, cfg: SleepConfig) -> list[float]:
    """Exact match on each set's probes with the probe's own memory alone in context (the
    teacher's level, the reference for "learning accuracy >= x open book")."""
    text = {m.id: m.text for m in memories}
    prompts = [text[pr.memory_id] + cfg.memory_separator
               + cfg.prompt_format.format(question=pr.question)
               for ps in probe_sets for pr in ps]
    return _set_row(model, tokenizer, prompts, probe_sets, tokens=tokens, cfg=cfg)


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
    from sleep_jax.runtime import is_writer

    if is_writer():  # many processes: process 0 writes, every process keeps the list
        write_text(os.path.join(workdir, EVENTS),
                   "".join(json.dumps(e) + "\n" for e in events))


@dataclasses.dataclass(frozen=True)
class CycleMethod:
    """One way of turning each cycle's memories into weights.

    sleep: the sleep of every cycle (``SleepConfig``: an expert slot or the full model,
      Knowledge Seeding or SFT); None: in-context only (nothing is trained; row k of the
      matrix is the unchanged model answering every set with cycle k's store in context).
    seeding: the seeding objective's config (None with ``sleep.objective == "sft"``).
    replay: the replay of every sleep. Seeding replays the wake-knowledge prompts and, with
      ``earlier_sleeps``, every earlier sleep's prompts (read from the checkpoint); SFT
      replays the wake examples and the texts of every earlier cycle's memories.
    """

    name: str
    sleep: SleepConfig | None
    seeding: seeding.SeedingConfig | None = None
    replay: ReplayConfig = ReplayConfig()

    def __post_init__(self):
        if self.sleep is not None and self.sleep.objective == "seeding" and self.seeding is None:
            raise ValueError(f"cycle method {self.name!r}: the seeding objective needs a "
                             "SeedingConfig")


@dataclasses.dataclass(frozen=True)
class CycleInputs:
    """What a stream may bring beside its memories and probes (all optional).

    prompts: {memory id: seeding prompts} (``SleepConfig.prompts == "given"``).
    replay_prompts: prompts that stand for the wake knowledge (seeding replay, source
      "prompts").
    replay_texts: wake training examples (SFT replay, source "texts").
    old_probes: closed-book probes on the wake knowledge, measured after every cycle (what
      is kept of what the model knew before any sleep).
    texts: general text for KL to the base (the first ``CycleConfig.kl_texts``).
    """

    prompts: Mapping[str, Sequence[str]] | None = None
    replay_prompts: Sequence[str] = ()
    replay_texts: Sequence = ()
    old_probes: Sequence = ()
    texts: Sequence[str] = ()


def check_inputs(method: CycleMethod, inputs: CycleInputs) -> None:
    """Refuse a method whose replay or prompts need inputs the stream does not bring."""
    cfg, rep = method.sleep, method.replay
    if cfg is None:
        return
    if cfg.chat:
        raise ValueError(f"cycle method {method.name!r}: SleepConfig.chat=True is not "
                         "supported by the cycle yet (its probe rows are raw prompts); use "
                         "`sleep-jax sleep` for a chat model")
    need = []
    if rep.fraction > 0 and rep.source == "texts" and not inputs.replay_texts:
        need.append("replay_texts (ReplayConfig.source='texts')")
    if rep.fraction > 0 and rep.source == "prompts" and not inputs.replay_prompts:
        need.append("replay_prompts (ReplayConfig.source='prompts')")
    if cfg.prompts == "given" and not inputs.prompts:
        need.append("prompts (SleepConfig.prompts='given')")
    if need:
        raise ValueError(f"cycle method {method.name!r} needs {', '.join(need)} in its "
                         "CycleInputs")


def row_lengths(tokenizer, memories: Sequence, inputs: CycleInputs, cfg: SleepConfig
                ) -> tuple[int, int]:
    """(teacher, student) seeding row lengths that fit every sleep of the stream: the longest
    memory + prompt and the longest prompt (given, cut from the memory, or replayed), + 1 for
    bos. Every sleep then runs one compiled step shape."""
    from sleep_jax.sleep import memory_prompts

    n = lambda s: len(tokenizer.encode(s).ids)
    P = Q = 1
    for m in memories:
        ps = (inputs.prompts or {}).get(m.id) if cfg.prompts == "given" else \
            memory_prompts(m.text, cfg.max_prompts_per_memory)
        mem = n(m.text + cfg.memory_separator)
        for p in ps or ():
            P, Q = max(P, mem + n(p)), max(Q, n(p))
    for p in inputs.replay_prompts:
        P, Q = max(P, n(p)), max(Q, n(p))
    return P + 1, Q + 1


def in_context_row(model, tokenizer, store: Sequence, probe_sets: Sequence[Sequence], *,
                   tokens: Mapping, cfg: SleepConfig) -> list[float]:
    """Exact match on each set's probes with ``store`` (oldest first) in context: the
    in-context-only method's matrix row."""
    context = " ".join(m.text for m in store)
    prompts = [context + cfg.memory_separator + cfg.prompt_format.format(question=pr.question)
               for ps in probe_sets for pr in ps]
    return _set_row(model, tokenizer, prompts, probe_sets, tokens=tokens, cfg=cfg)


def sleep_cycle(prev: str, model, tokenizer, meta: Mapping, memories: Sequence, probes,
                *, method: CycleMethod, inputs: CycleInputs, earlier_memories: Sequence,
                workdir: str, lengths, mesh=None, log_fn: Callable | None = None) -> dict:
    """One cycle's sleep of the checkpoint ``prev`` (``model`` loaded from it): the sleep
    pipeline (``sleep.sleep``) with the method's configs, then ``workdir/model`` (the next
    checkpoint version, with every sleep's seeding prompts beside it). Re-running resumes
    inside the sleep (its run loop's checkpoints in ``workdir/train``)."""
    from sleep_jax.models.checkpoint_dir import save_checkpoint
    from sleep_jax.runtime import barrier, is_writer
    from sleep_jax.sleep import read_sleep_prompts, sleep, write_sleep_prompts

    cfg = method.sleep
    tokens = dict(meta["tokens"])
    earlier = read_sleep_prompts(prev)
    replay_texts = None
    if cfg.objective == "sft" and method.replay.fraction > 0:
        replay_texts = list(inputs.replay_texts) + [m.text for m in earlier_memories]
    res = sleep(model, tokenizer, memories, tokens=tokens, cfg=cfg, seeding_cfg=method.seeding,
                replay=method.replay, prompts=inputs.prompts,
                replay_prompts=list(inputs.replay_prompts) or None, replay_texts=replay_texts,
                earlier=earlier, probe_questions=[pr.question for pr in probes], mesh=mesh,
                workdir=workdir, log_fn=log_fn, desc=f"sleep: {method.name}",
                row_lengths=lengths if cfg.objective == "seeding" else None)
    model_dir = os.path.join(workdir, "model")
    save_checkpoint(model_dir, res.model, tokenizer, tokens=tokens,
                    extra={"grown_from": os.path.abspath(prev), "method": method.name})
    if is_writer():
        write_sleep_prompts(model_dir, list(earlier) + (res.rows.records if res.rows else []))
    barrier("sleep_jax_cycle_prompts")  # the next cycle reads them on every process
    rehearsal = None
    if res.rehearsal is not None:  # dreaming after consolidation (SleepConfig.rehearse)
        rh, d = res.rehearsal, res.rehearsal.get("dreams", {})
        rehearsal = {"steps": rh["steps"], "status": rh["status"], "seconds": rh["seconds"],
                     "kept": d.get("kept"), "rows": d.get("rows"),
                     "copy_share": d.get("copy_share")}
    return {"slot": res.slot, "steps": cfg.steps, "status": res.status,
            "step_s": res.step_s if len(res.times) > 3 else None,
            "compile_s": res.compile_s, "rehearsal": rehearsal}


def run_cycle(base_dir: str, memories: Sequence, probes: Sequence, *, workdir: str,
              cfg: CycleConfig, method: CycleMethod, inputs: CycleInputs = CycleInputs(),
              mesh=None, log_fn: Callable | None = None, write_report: bool = True) -> dict:
    """Wake/sleep cycles of one method over ``memories`` (arrival order) from the checkpoint
    ``base_dir``.

    ``probes`` (``memory_id``/``question``/``answers``) are the held-out questions each set is
    measured on. Returns {"matrix": [T+1][T], "events": [...], "method": the cycle report's
    input for this method, "report": the report (with ``write_report``)}; resumable (module
    docstring).
    """
    import jax

    from sleep_jax.eval import cycle_report
    from sleep_jax.eval.probes import kl_to_base
    from sleep_jax.models.checkpoint_dir import load_checkpoint
    from sleep_jax.runtime import barrier, is_writer

    check_inputs(method, inputs)
    os.makedirs(workdir, exist_ok=True)
    if cfg.compilation_cache:
        use_compilation_cache(workdir)
    sets = schedule(memories, cfg)
    by_memory: dict[str, list] = {}
    for pr in probes:
        by_memory.setdefault(pr.memory_id, []).append(pr)
    probe_sets = [[pr for m in s for pr in by_memory.get(m.id, [])] for s in sets]
    # many processes: every model straight onto the mesh's shards (no process holds it all);
    # one process keeps the default single-device placement
    place = mesh if jax.process_count() > 1 else None
    base, tok, meta = load_checkpoint(base_dir, mesh=place)
    tokens = dict(meta["tokens"])
    scfg = method.sleep or SleepConfig()  # in-context only: the default evaluation settings
    general = list(inputs.texts)[:cfg.kl_texts] if cfg.kl_texts else []
    lengths = (row_lengths(tok, memories, inputs, method.sleep)
               if method.sleep is not None and method.sleep.objective == "seeding" else None)

    def kl(model):
        if not general:
            return None  # not measured
        return kl_to_base(model, base, tok, general, bos_id=_kw(tokens, scfg)["bos_id"],
                          pad_id=tokens.get("pad_id") or 0)

    def old(model):
        if not inputs.old_probes:
            return None
        return closed_book_row(model, tok, [inputs.old_probes], tokens=tokens, cfg=scfg)[0]

    events = read_events(workdir)
    barrier("sleep_jax_cycle_events_read")  # every process read them before any rewrite
    ids = [[m.id for m in s] for s in sets]
    if events and (events[0].get("memory_sets") != ids
                   or events[0].get("method", method.name) != method.name):
        raise ValueError(f"{workdir}/{EVENTS} was written for another memory stream, schedule "
                         "or method; use a new workdir")
    if not events:  # row 0: before any sleep
        row0 = (closed_book_row(base, tok, probe_sets, tokens=tokens, cfg=scfg)
                if method.sleep is not None else [float("nan")] * len(sets))
        events.append({"cycle": 0, "method": method.name,
                       "checkpoint": os.path.abspath(base_dir), "memory_sets": ids,
                       "row": row0, "old": old(base),
                       "open_book": open_book_row(base, tok, memories, probe_sets,
                                                  tokens=tokens, cfg=scfg)})
        _write_events(workdir, events)
    for k in range(len(events), len(sets) + 1):
        t0 = time.time()
        prev = events[-1]["checkpoint"]
        model_prev, tok_prev, meta_prev = load_checkpoint(prev, mesh=place)
        store = sets[k - 1][-cfg.store_size:]
        wake = wake_accuracy(model_prev, tok_prev, store, probe_sets[k - 1], tokens=tokens,
                             cfg=scfg)
        if method.sleep is None:  # in-context only: the store is all there is
            events.append({"cycle": k, "version": k, "checkpoint": prev,
                           "memories": ids[k - 1], "slot": None, "slots": None, "steps": 0,
                           "status": "done", "wake_in_context": wake,
                           "row": in_context_row(base, tok, store, probe_sets, tokens=tokens,
                                                 cfg=scfg),
                           "old": events[0]["old"], "kl_to_base": 0.0 if general else None,
                           "time_s": time.time() - t0})
            _write_events(workdir, events)
            continue
        run_dir = os.path.join(workdir, f"cycle_{k:03d}")
        rep = sleep_cycle(prev, model_prev, tok_prev, meta_prev, sets[k - 1],
                          probe_sets[k - 1], method=method, inputs=inputs,
                          earlier_memories=[m for s in sets[:k - 1] for m in s],
                          workdir=run_dir, lengths=lengths, mesh=mesh, log_fn=log_fn)
        model_dir = os.path.join(run_dir, "model")
        model, _, _ = load_checkpoint(model_dir, mesh=place)
        events.append({"cycle": k, "version": k, "checkpoint": os.path.abspath(model_dir),
                       "memories": ids[k - 1], "slot": rep["slot"],
                       "slots": model.config.expert_slots, "steps": rep["steps"],
                       "status": rep["status"], "step_s": rep["step_s"],
                       "compile_s": rep["compile_s"], "rehearsal": rep["rehearsal"],
                       "wake_in_context": wake,
                       "row": closed_book_row(model, tok, probe_sets, tokens=tokens, cfg=scfg),
                       "old": old(model), "kl_to_base": kl(model),
                       "time_s": time.time() - t0})
        _write_events(workdir, events)
    matrix = [e["row"] for e in events]
    entry = {"matrix": matrix, "kl_to_base": [e["kl_to_base"] for e in events[1:]],
             "time_s": [e["time_s"] for e in events[1:]],
             "old": [e.get("old") for e in events],
             "open_book": events[0].get("open_book")}
    out = {"matrix": matrix, "events": events, "method": entry}
    if write_report:
        out["report"] = cycle_report.build({method.name: entry})
        if is_writer():
            cycle_report.write_report(out["report"], workdir)
    return out


def run_methods(base_dir: str, memories: Sequence, probes: Sequence, *, workdir: str,
                cfg: CycleConfig, methods: Sequence[CycleMethod],
                inputs: CycleInputs = CycleInputs(), mesh=None,
                log_fn: Callable | None = None) -> dict:
    """``run_cycle`` of every method over the same stream, each in ``workdir/<name>/``, then
    one report of them side by side in ``workdir`` (each method resumes on its own)."""
    from sleep_jax.eval import cycle_report
    from sleep_jax.runtime import is_writer

    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"cycle method names must be distinct, got {names}")
    for m in methods:  # before any work
        check_inputs(m, inputs)
    if cfg.compilation_cache:
        use_compilation_cache(workdir)  # one cache for every method
    entries, events = {}, {}
    for m in methods:
        t0 = time.time()
        out = run_cycle(base_dir, memories, probes, workdir=os.path.join(workdir, m.name),
                        cfg=cfg, method=m, inputs=inputs, mesh=mesh, log_fn=log_fn)
        entries[m.name], events[m.name] = out["method"], out["events"]
        if is_writer():
            print(f"cycle method {m.name}: {len(out['events']) - 1} cycles "
                  f"({time.time() - t0:.0f} s this call)", flush=True)
    report = cycle_report.build(entries)
    if is_writer():
        cycle_report.write_report(report, workdir)
    return {"report": report, "events": events}
