"""One sleep: Knowledge Seeding of memories into the next free expert slot, with replay.

The one pipeline behind ``sleep-jax sleep`` (``distill/cli.py``) and the demo's methods
(``demo_run.run_method``):

1. STUDENT (``prepare_student``). A model without expert slots is grown once to
   ``SleepConfig.slots`` pre-allocated slots (all off; static shapes, so later sleeps compile
   the same programs); the sleep takes the NEXT FREE slot (``grow.experts.next_free_slot``,
   ``SlotsExhausted`` when none is left), never one a previous sleep trained, and activates it
   (random A, B = 0: exact). Only that slot trains, as its own tree
   (``train.adapters.AdapterState``: the optimizer state covers the adapter only); the trained
   adapter is written into the slot at the end. ``expert=False`` fine-tunes the whole model.
2. ROWS (``seeding_rows``). Seeding rows (memory, prompt): the teacher (the pre-sleep model)
   reads the memory, the student only the prompt. Prompts are either given by the caller
   (``prompts="given"``: e.g. questions in training wordings and continuation templates, the
   demo) or cut from the memories (``prompts="memory"``: every sentence cut after its
   2nd..(n-1)th word, the CLI); any prompt that contains a probe question is dropped.
   Replay rows (no memory: self-distillation from the pre-sleep model) come from the wake
   knowledge (``ReplayConfig.source``: the caller's prompts, or prefixes of the model's own
   unconditional samples) and from EVERY EARLIER SLEEP's seeding prompts, kept in the saved
   checkpoint (``PROMPTS_FILE`` beside the model).
3. SEED (``sleep``). ``seeding.make_seeding_step`` (or the SFT train step for the SFT
   baseline) runs through ``train.loop.run_loop`` on an ``RngSource`` of batches; with a
   workdir the run writes metrics.jsonl and checkpoints and resumes when re-run.
4. EVALUATE AND SAVE (``sleep_checkpoint``): closed-book before/after and open-book on the
   probes; the grown model, the accumulated seeding prompts and the report in the workdir.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from sleep_jax.distill import seeding
from sleep_jax.dream.rehearse import RehearseConfig
from sleep_jax.sleep_eval import (  # noqa: F401 (the sleep's evaluation, re-exported)
    LOW_OPEN_BOOK_EM,
    _probe_kw,
    evaluate_probes,
    open_book_scores,
    probe_prompt,
    retain_scores,
    split_scores,
)
from sleep_jax.sleep_rows import (  # noqa: F401 (the sleep's rows, re-exported)
    PROMPTS_FILE,
    ConcatBatches,
    Rows,
    batch_fn,
    chat_parts,
    drop_probe_overlap,
    fitting_examples,
    memory_prompts,
    read_sleep_prompts,
    sample_replay_prompts,
    seeding_rows,
    sft_batches,
    write_sleep_prompts,
)
from sleep_jax.train.optim import OptimConfig

log = logging.getLogger(__name__)

DEFAULT_FORMAT = "question: {question} answer:"
REPLAY_SOURCES = ("prompts", "samples", "texts", "none")
PROMPT_SOURCES = ("given", "memory")
OBJECTIVES = ("seeding", "sft")


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """Replay: rows without memory that stand for the wake knowledge.

    With the seeding objective a replay row is self-distillation from the pre-sleep model;
    with the SFT objective it is the LM loss on a wake training example (``source="texts"``).

    fraction: share of each batch's rows that are replay rows (0 turns replay off).
    source: what stands for the wake knowledge: "prompts" (the caller's replay prompts, e.g.
      questions about OLD entities), "samples" (prefixes of ``samples`` unconditional samples of
      the model, ``sample_tokens`` long, cut to at most ``prefix_tokens``; no labels needed),
      "texts" (SFT only: the caller's wake training examples, texts or (prompt, completion)
      pairs, packed) or "none".
    earlier_sleeps: also replay every earlier sleep's seeding prompts (from the checkpoint).
    """

    fraction: float = 0.5
    source: str = "samples"
    samples: int = 64
    sample_tokens: int = 16
    prefix_tokens: int = 8
    earlier_sleeps: bool = True

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"ReplayConfig.fraction={self.fraction} must be in [0, 1)")
        if self.source not in REPLAY_SOURCES:
            raise ValueError(f"ReplayConfig.source={self.source!r}; allowed: {REPLAY_SOURCES}")


WHEN_FULL = ("error", "grow")


@dataclasses.dataclass(frozen=True)
class SleepConfig:
    """One sleep's student, optimizer, prompts and budget (the demo's settings by default).

    expert: seed into the next free expert slot (only it trains); False: full fine-tune.
    slots / rank / router: growth of a model without slots (E pre-allocated slots of rank R,
      optionally with a learned per-token gate); a model with slots keeps its own.
    when_full: what a sleep does when every slot of the model is used: "error" (refuse:
      ``grow.SlotsExhausted``, the default) or "grow" (grow E -> E + ``slots`` more slots,
      appended off, which is function preserving, then train the first new one). Never an
      overwrite of a trained slot.
    optim: the expert's optimizer (AdamW + warmup + cosine + clipping); full_optim: the full
      fine-tune's.
    prompts: "given" (the caller's prompts per memory) or "memory" (cut from the memory text,
      at most ``max_prompts_per_memory`` each); prompts containing a probe question are dropped.
    memory_separator: text between the memory and the prompt in the teacher's row.
    objective: "seeding" (Knowledge Seeding) or "sft" (LM loss on the memory texts, in the
      expert slot or the full model, with replay of wake texts when ReplayConfig.source is
      "texts"; a baseline). With "sft", a replay fraction > 0 needs source "texts" and
      ``replay_texts``, and ``expert=True`` trains the slot (both used by the demo only;
      ``sleep_checkpoint`` runs the seeding objective).
    eval_every: the caller's eval callback every this many steps (and at the end).
    log_every / checkpoint_every / keep_checkpoints: the run loop (checkpoints with a workdir).
    eval_tokens / prompt_format: probe evaluation (greedy tokens, how a question is asked).
    chat: ask every prompt as a user's turn of the checkpoint's chat template (instruct
      models): the student reads head + prompt + tail, the teacher head + memory + separator
      + prompt + tail (the memory opens the user's turn); probes are asked the same way.
    answer_cut: the part of each greedy answer scored (``eval.qa.cut_answer``): "sentence"
      (its first line up to the first sentence end: a correct answer that goes on is not
      scored wrong), "line" or "none" (all ``eval_tokens`` tokens).
    rehearse: dreaming after consolidation (``dream.rehearse.RehearseConfig``; off while its
      ``generator`` is ""): the trained generator dreams about the memories and the kept
      dreams train this sleep's slot further, mixed with the sleep's replay rows (needs
      ``expert=True`` and the seeding objective). With rehearsal, ``steps=0`` is dreaming
      alone: the slot is grown (B = 0, the model's function unchanged) and only the dreams
      (and replay rows, if any) train it.
    """

    steps: int = 200
    batch_size: int = 32
    expert: bool = True
    slots: int = 4
    rank: int = 64  # 64, not 32, is what every run before 2026-12-03 got: growth ignored it
    router: bool = False
    when_full: str = "error"
    slot_std: float = 0.02
    optim: OptimConfig = OptimConfig(lr=2e-2, warmup_steps=10, weight_decay=0.0)
    full_optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.0)
    prompts: str = "memory"
    max_prompts_per_memory: int = 24
    memory_separator: str = " "
    objective: str = "seeding"
    sft_seq_len: int = 64
    seed: int = 0
    eval_every: int = 0
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    progress_bar: bool = True
    eval_tokens: int = 8
    answer_cut: str = "sentence"
    prompt_format: str = DEFAULT_FORMAT
    chat: bool = False
    rehearse: RehearseConfig = RehearseConfig()

    def __post_init__(self):
        if self.rehearse.enabled and (not self.expert or self.objective != "seeding"):
            raise ValueError(f"SleepConfig.rehearse.generator={self.rehearse.generator!r} "
                             f"trains the sleep's expert slot after seeding: it needs "
                             f"expert=True and objective='seeding' (got expert={self.expert}, "
                             f"objective={self.objective!r})")
        if self.rehearse.enabled and self.chat:
            raise ValueError("SleepConfig.rehearse with chat=True is not supported yet (the "
                             "generator's dreams are raw text); set one of them off")
        if self.prompts not in PROMPT_SOURCES:
            raise ValueError(f"SleepConfig.prompts={self.prompts!r}; allowed: {PROMPT_SOURCES}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"SleepConfig.objective={self.objective!r}; allowed: {OBJECTIVES}")
        from sleep_jax.eval.qa import CUTS

        if self.answer_cut not in CUTS:
            raise ValueError(f"SleepConfig.answer_cut={self.answer_cut!r}; allowed: {CUTS}")
        if self.when_full not in WHEN_FULL:
            raise ValueError(f"SleepConfig.when_full={self.when_full!r}; allowed: {WHEN_FULL}")
        for name in ("steps", "batch_size", "slots", "rank"):
            low = 0 if name == "steps" and self.rehearse.enabled else 1
            if getattr(self, name) < low:
                raise ValueError(f"SleepConfig.{name}={getattr(self, name)} must be >= {low}"
                                 + (" (0 only with rehearsal: dreaming alone)"
                                    if name == "steps" else ""))

    def optimizer(self) -> OptimConfig:
        return self.optim if self.expert else self.full_optim


def configs_to_dict(sleep_cfg: SleepConfig, seeding_cfg: seeding.SeedingConfig | None,
                    replay: ReplayConfig) -> dict:
    """The three configs of a sleep as one JSON-able dict (for reports and checkpoints)."""
    return {"sleep": dataclasses.asdict(sleep_cfg),
            "seeding": None if seeding_cfg is None else dataclasses.asdict(seeding_cfg),
            "replay": dataclasses.asdict(replay)}


# ----------------------------------------------------------------------------------- student


def prepare_student(base, cfg: SleepConfig, rng, *, mesh):
    """(student model, slot or None, its config): the grown, activated copy of ``base``.

    Grows 0 -> ``cfg.slots`` slots only when ``base`` has none, then activates the next free
    slot. When every slot is used: ``SlotsExhausted`` (``cfg.when_full="error"``) or growth to
    ``cfg.slots`` more slots ("grow"; the new ones are off, so the model's function is kept).
    ``rng`` is split into the growth key and the new slot's A key. ``expert=False``: ``base``
    itself (full fine-tune), slot None.
    """
    from sleep_jax.grow import activate_slot, grow_model
    from sleep_jax.grow.experts import SlotsExhausted, next_free_slot

    mcfg = base.config
    if not cfg.expert:
        return base, None, mcfg
    k1, k2 = jax.random.split(rng)
    if mcfg.expert_slots == 0:
        dst = mcfg.replace(expert_slots=cfg.slots, expert_rank=cfg.rank,
                           expert_router=cfg.router)
        model, _ = grow_model(base, mcfg, dst, mesh=mesh, rng=k1)
    else:
        if cfg.router and not mcfg.expert_router:
            raise ValueError("SleepConfig.router=True but the model's expert slots have no "
                             "router (a router is added with the first slots, by growth)")
        model, dst = base, mcfg
        try:
            next_free_slot(model)
        except SlotsExhausted:
            if cfg.when_full != "grow":
                raise
            dst = mcfg.replace(expert_slots=mcfg.expert_slots + cfg.slots)
            model, _ = grow_model(base, mcfg, dst, mesh=mesh, rng=k1)
    slot = next_free_slot(model)
    model, _ = activate_slot(model, None, slot, k2, std=cfg.slot_std)
    return model, slot, dst


@dataclasses.dataclass
class SleepResult:
    """What one sleep returns."""

    model: object  # the student after the sleep (adapter written into its slot)
    slot: int | None  # the slot this sleep trained (None: full fine-tune)
    curve: list[dict]  # [{"step", **eval_fn values}] at step 0, every cfg.eval_every, end
    history: list[dict]  # the metric records (metrics.jsonl with a workdir: resumed runs too)
    times: list[float]  # step wall times of this call (the first includes compilation)
    status: str
    message: str
    rows: Rows | None
    experts: dict  # expert activity per row kind over the last tenth of the steps
    rehearsal: dict | None = None  # dream.rehearse's report when cfg.rehearse is on

    @property
    def step_s(self) -> float:
        from sleep_jax.train.loop import typical_step_s

        return typical_step_s(self.times)

    @property
    def compile_s(self) -> float:
        return float(self.times[0]) if self.times else 0.0


def sleep(base, tokenizer, memories, *, tokens: Mapping, cfg: SleepConfig,
          seeding_cfg: seeding.SeedingConfig | None, replay: ReplayConfig,
          prompts: Mapping[str, Sequence[str]] | None = None,
          replay_prompts: Sequence[str] | None = None, replay_texts: Sequence | None = None,
          earlier: Sequence[dict] = (),
          probe_questions: Sequence[str] = (), mesh=None, teacher_mesh=None,
          workdir: str | None = None, eval_fn: Callable | None = None,
          log_fn: Callable | None = None, desc: str = "sleep",
          row_lengths: tuple[int, int] | None = None) -> SleepResult:
    """One sleep of ``base`` on ``memories`` (module docstring, steps 1-3).

    Args:
      base: the pre-sleep model (the teacher; never modified).
      tokenizer: ``encode(text).ids`` / ``decode(ids)``.
      memories: ``id``/``text`` objects.
      tokens: {"bos_id", "eos_id", "pad_id"} (a missing bos is the pad id).
      cfg, seeding_cfg, replay: the configs (``seeding_cfg`` None with objective "sft").
      prompts, replay_prompts, earlier, probe_questions: see ``seeding_rows``.
      replay_texts: wake training examples replayed by the SFT objective (``sft_batches``).
      mesh: the student's mesh (growth writes the grown model straight onto it); default one
        device.
      teacher_mesh: the teacher's layout, a mesh over the same devices as ``mesh`` (default:
        ``mesh``); the teacher's weights are placed on it by their logical names (a copy:
        ``base`` is not moved).
      workdir: run folder: metrics.jsonl and checkpoints (train/); re-running resumes.
      eval_fn: ``eval_fn(model, step) -> {name: float}`` (or a float, named "eval") for the
        curve: at step 0, every cfg.eval_every and at the end; recorded in the metrics as
        "eval/<name>" (the callback may also keep the model, e.g. ``eval.select.BestCheckpoint``).
      log_fn: called with each metrics record.
      row_lengths: fixed (teacher, student) seeding row lengths (``batch_fn``).
    Keys and batches: numpy ``default_rng(cfg.seed + 17)`` draws the batches,
    ``key(cfg.seed + 1)`` is the base key (growth ``fold_in(., 99)``, replay sampling
    ``fold_in(., 98)``, step i ``fold_in(., i)``), as the demo always had.
    """
    from flax import nnx

    from sleep_jax.mesh import make_mesh
    from sleep_jax.models.sharding import shard_model
    from sleep_jax.train.adapters import create_adapter_state
    from sleep_jax.train.loop import LoopConfig, RngSource, read_metrics, run_loop
    from sleep_jax.train.optim import make_optimizer
    from sleep_jax.train.state import create_train_state, fresh_copy

    mesh = mesh or make_mesh("fsdp=1", devices=jax.devices()[:1])
    teacher_mesh = teacher_mesh or mesh
    if set(teacher_mesh.devices.flat) != set(mesh.devices.flat):
        raise ValueError(f"teacher_mesh {dict(teacher_mesh.shape)} and mesh "
                         f"{dict(mesh.shape)} must span the same devices (teacher and student "
                         "take turns on one set of devices)")
    pad = tokens.get("pad_id") or 0
    bos = tokens.get("bos_id")
    bos = pad if bos is None else bos
    if not tokens.get("add_bos", True):  # rows as the tokenizer writes them (probes alike)
        bos = None
    eos = tokens.get("eos_id")
    np_rng = np.random.default_rng(cfg.seed + 17)
    key = jax.random.key(cfg.seed + 1)
    if cfg.objective == "seeding" and seeding_cfg is None:
        raise ValueError("objective 'seeding' needs a SeedingConfig")

    # the teacher on its layout (a copy: ``base`` is not moved); growth reads it there and
    # writes the student onto ``mesh``
    teacher = shard_model(fresh_copy(base), teacher_mesh)
    student, slot, _ = prepare_student(teacher, cfg, jax.random.fold_in(key, 99), mesh=mesh)
    tx = make_optimizer(cfg.optimizer(), cfg.steps)
    if slot is None:
        state = create_train_state(fresh_copy(student), tx)
    else:
        state = create_adapter_state(student, slot, tx)
    sleep_index = len({r.get("sleep") for r in earlier})

    rows = None
    if cfg.objective == "sft":
        from sleep_jax.mesh import batch_sharding
        from sleep_jax.runtime import ShardedBatches
        from sleep_jax.train.step import make_train_step

        # global batches (the same on every process), each process feeding its rows
        source = ShardedBatches(sft_batches(memories, tokenizer, cfg=cfg, replay=replay,
                                            replay_texts=replay_texts,
                                            seed=int(np_rng.integers(1 << 30))),
                                mesh, batch_sharding(mesh, 2, cfg.batch_size))
        step = make_train_step(state, mesh)
    else:
        replay_ids = None
        if replay.fraction > 0 and replay.source == "samples":
            # with a chat template the model writes a user's message from the chat head
            start = tokenizer.encode(chat_parts(tokens, tokenizer)[0]).ids if cfg.chat else ()
            # no BOS in the rows and no chat head: samples still start from the bos id (or pad)
            fallback = tokens.get("bos_id")
            first = bos if bos is not None or start else (pad if fallback is None else fallback)
            replay_ids = sample_replay_prompts(teacher, replay=replay, bos_id=first,
                                               eos_id=eos, pad_id=pad, start=start,
                                               rng=jax.random.fold_in(key, 98))
        rows = seeding_rows(tokenizer, memories, cfg=cfg, replay=replay, prompts=prompts,
                            replay_prompts=replay_prompts, replay_ids=replay_ids,
                            earlier=earlier, probe_questions=probe_questions,
                            sleep_index=sleep_index, slot=slot, tokens=tokens)
        if seeding_cfg.teacher_samples:  # the teacher writes and scores once: distill.cache
            source, step = _cached_seeding(teacher, state, rows, cfg=cfg, replay=replay,
                                           seeding_cfg=seeding_cfg, mesh=mesh,
                                           teacher_mesh=teacher_mesh, np_rng=np_rng,
                                           rng=jax.random.fold_in(key, 97), bos=bos, eos=eos,
                                           pad=pad, lengths=row_lengths)
        else:
            source = RngSource(batch_fn(rows, batch_size=cfg.batch_size,
                                        fraction=replay.fraction, bos_id=bos, pad_id=pad,
                                        lengths=row_lengths), np_rng)
            sstep = seeding.make_seeding_step(seeding_cfg, state, mesh, eos_id=eos,
                                              pad_id=pad)
            tg, ts = nnx.split(teacher)
            imitate = None
            if seeding_cfg.alpha < 1:
                from sleep_jax.distill.imitation import make_imitation

                imitate = make_imitation(seeding_cfg, decode=tokenizer.decode, judge=None,
                                         eos_id=eos, pad_id=pad)

            def step(st, batch, k):
                imit = None if imitate is None else imitate(st, tg, ts, batch,
                                                            jax.random.fold_in(k, 1))
                return sstep(st, tg, ts, batch, k, None, imit)

    def evaluate(model, n) -> dict:
        v = eval_fn(model, n)
        return {f"eval/{k}": float(x) for k, x in
                (v.items() if isinstance(v, Mapping) else [("eval", v)])}

    curve = [{"step": 0, **evaluate(state.model(), 0)}] if eval_fn is not None else []
    lcfg = LoopConfig(steps=cfg.steps, log_every=cfg.log_every,
                      eval_every=cfg.eval_every if eval_fn is not None else 0,
                      checkpoint_every=cfg.checkpoint_every,
                      keep_checkpoints=cfg.keep_checkpoints, progress_bar=cfg.progress_bar,
                      seed=cfg.seed, tensorboard=False)
    ev = None if eval_fn is None else (lambda n, st: evaluate(st.model(), n))
    res = run_loop(step, state, source, cfg=lcfg, rng=key, workdir=workdir, eval_fn=ev,
                   desc=desc, log_fn=log_fn)
    history = res.history
    if workdir is not None:  # a resumed run: the records of every call
        history = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    curve += [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("eval/")}}
              for r in history if any(k.startswith("eval/") for k in r)]
    curve = [{k.removeprefix("eval/"): v for k, v in c.items()} for c in curve]
    model, rehearsal = res.state.model(), None
    if cfg.rehearse.enabled and res.status == "done":  # dreaming, after consolidation
        from sleep_jax.dream.rehearse import rehearse

        rh = rehearse(res.state, teacher, tokenizer, memories, [p for _, p in rows.replay],
                      cfg=cfg.rehearse, seeding_cfg=seeding_cfg, tokens=tokens,
                      probe_questions=probe_questions, mesh=mesh,
                      workdir=None if workdir is None else os.path.join(workdir, "rehearse"),
                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                      keep_checkpoints=cfg.keep_checkpoints, progress_bar=cfg.progress_bar,
                      log_fn=log_fn)
        model, rehearsal = rh.state.model(), rh.report
    status = res.status if rehearsal is None or rehearsal["status"] in ("done", "no dreams") \
        else rehearsal["status"]  # e.g. "preempted" during rehearsal: not a finished sleep
    return SleepResult(model=model, slot=slot, curve=curve, history=history, times=res.times,
                       status=status, message=res.message, rows=rows,
                       experts=expert_activity(history, replay.fraction), rehearsal=rehearsal)


def _cached_seeding(teacher, state, rows, *, cfg: SleepConfig, replay: ReplayConfig,
                    seeding_cfg: seeding.SeedingConfig, mesh, teacher_mesh, np_rng, rng, bos,
                    eos, pad, lengths):
    """The batch source and step of a sleep with a teacher cache (``distill.cache``): the
    teacher writes ``seeding_cfg.teacher_samples`` completions per row and scores them once
    (on its mesh); each step draws cached rows as ``batch_fn`` draws rows."""
    from sleep_jax.distill.cache import build_cache, cached_batch_fn, make_cached_step
    from sleep_jax.sleep_rows import all_rows
    from sleep_jax.train.loop import RngSource

    every, is_replay = all_rows(rows, bos_id=bos, pad_id=pad, lengths=lengths)
    cache, n = build_cache(teacher, every, is_replay, cfg=seeding_cfg, rng=rng,
                           mesh=teacher_mesh, eos_id=eos, pad_id=pad)
    source = RngSource(cached_batch_fn(cache, n, batch_size=cfg.batch_size,
                                       fraction=replay.fraction), np_rng)
    cstep = make_cached_step(seeding_cfg, state, mesh)
    return source, lambda st, batch, k: cstep(st, batch)


def expert_activity(history: Sequence[dict], replay_fraction: float) -> dict:
    """Mean expert gate and output RMS per row kind over the last tenth of the records."""
    kinds = ("memory",) if replay_fraction == 0 else ("memory", "replay")
    names = [f"{a}_{k}_rows" for a in ("gate", "expert_rms") for k in kinds]
    recs = [r for r in history if names[0] in r]
    if not recs:
        return {}
    tail = recs[-max(1, len(recs) // 10):]
    vals = np.asarray([[r[n] for n in names] for r in tail], np.float32).mean(0)
    return {n.replace("expert_rms", "rms"): float(v) for n, v in zip(names, vals)}


def sleep_checkpoint(checkpoint: str, base, tokenizer, meta: Mapping, memories, probes, *,
                     workdir: str, cfg: SleepConfig, seeding_cfg: seeding.SeedingConfig,
                     replay: ReplayConfig, log_fn: Callable | None = None, mesh=None,
                     teacher_mesh=None, prompts: Mapping[str, Sequence[str]] | None = None,
                     retain: Sequence = ()) -> dict:
    """A sleep on a checkpoint directory's model (``sleep-jax sleep``); writes into ``workdir``:
    model/ (the grown checkpoint with ``PROMPTS_FILE``: every sleep's seeding prompts),
    report.json, report.md, metrics.jsonl and train/ (checkpoints; re-running resumes).
    ``prompts``: {memory id: seeding prompts} (``cfg.prompts == "given"``); ``retain``:
    general questions (``data.jsonl.read_questions``) asked closed book before and after: the
    retention figure is the share of those the base answers that the slept model still
    answers. Probes with a ``split`` are also scored per split. Returns the report."""
    from sleep_jax.atomic import write_json, write_text
    from sleep_jax.models.checkpoint_dir import save_checkpoint
    from sleep_jax.runtime import is_writer

    if cfg.objective != "seeding":
        raise ValueError(f"sleep_checkpoint seeds memories; objective={cfg.objective!r}")
    import time

    os.makedirs(workdir, exist_ok=True)
    tokens = dict(meta["tokens"])
    if cfg.prompts == "given" and not prompts:
        raise ValueError("SleepConfig.prompts='given' needs seeding prompts (sleep-jax sleep "
                         "--prompts P.jsonl)")
    earlier = read_sleep_prompts(checkpoint)
    wall = {}
    t0 = time.perf_counter()
    questions = [pr.question for pr in probes]
    # the teacher's level first: a sleep whose teacher cannot answer has little to consolidate
    opened = open_book_scores(base, tokenizer, memories, probes, tokens=tokens, cfg=cfg)
    warning = None
    wall["open_book_s"] = time.perf_counter() - t0
    level = max(opened["em"], opened["contains"]) if cfg.chat else opened["em"]
    if level < LOW_OPEN_BOOK_EM:
        warning = (f"the teacher's open-book {'accuracy' if cfg.chat else 'EM'} is "
                   f"{level:.2f} on {len(probes)} probes "
                   f"(below {LOW_OPEN_BOOK_EM}): it answers few of them even with the memory "
                   "in context, so seeding has little to consolidate; check "
                   "sleep.prompt_format, sleep.memory_separator and sleep.eval_tokens")
        if is_writer():
            log.warning("sleep: %s", warning)
    t0 = time.perf_counter()
    res = sleep(base, tokenizer, memories, tokens=tokens, cfg=cfg, seeding_cfg=seeding_cfg,
                replay=replay, earlier=earlier, probe_questions=questions, prompts=prompts,
                mesh=mesh, teacher_mesh=teacher_mesh, workdir=workdir, log_fn=log_fn,
                desc="sleep: seeding")
    wall["sleep_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = evaluate_probes(res.model, base, tokenizer, memories, probes, tokens=tokens,
                             cfg=cfg, open_book=opened)
    retention = retain_scores(res.model, base, tokenizer, retain, tokens=tokens,
                              cfg=cfg) if retain else None
    wall["evaluation_s"] = time.perf_counter() - t0
    configs = configs_to_dict(cfg, seeding_cfg, replay)
    sleeps = list(meta.get("extra", {}).get("sleeps", []))
    sleeps.append({"slot": res.slot, "memories": len(memories), "configs": configs})
    model_dir = os.path.join(workdir, "model")
    save_checkpoint(model_dir, res.model, tokenizer, tokens=tokens,  # every process: shards
                    extra={"grown_from": os.path.abspath(checkpoint), "sleeps": sleeps})
    if is_writer():  # many processes: process 0 writes the files below
        write_sleep_prompts(model_dir, list(earlier) + res.rows.records)
    strip = lambda s: {k: v for k, v in s.items() if k != "predictions"}
    report = {"before": strip(scores["before"]), "after": strip(scores["after"]),
              "open_book": strip(scores["open_book"]), "slot": res.slot,
              "seeding_prompts": len(res.rows.seeding),
              "dropped_for_probe_overlap": res.rows.dropped,
              "replay_prompts": len(res.rows.replay),
              "replay_prompts_from_earlier_sleeps": res.rows.earlier,
              "steps": cfg.steps, "status": res.status,
              "step_s": res.step_s if len(res.times) > 3 else None,
              "configs": configs, "checkpoint": os.path.abspath(checkpoint),
              "rehearsal": res.rehearsal, "warning": warning, "wall_s": wall,
              "splits": split_scores(probes, scores), "retention": retention,
              "predictions_after": scores["after"]["predictions"],
              "predictions": [{"memory_id": pr.memory_id, "question": pr.question,
                               "answers": list(pr.answers), "before": b, "after": a,
                               "open_book": o}
                              for pr, b, a, o in zip(probes, scores["before"]["predictions"],
                                                     scores["after"]["predictions"],
                                                     scores["open_book"]["predictions"])]}
    if not is_writer():
        return report
    write_json(os.path.join(workdir, "report.json"), report)
    lines = ["# Sleep report", "", f"Expert slot {res.slot}." if res.slot is not None else
             "Full fine-tune.", "", "| probes | split | EM | F1 | contains |",
             "|---|---|---|---|---|"]
    for name, key in (("closed book, before", "before"), ("closed book, after", "after"),
                      ("open book (teacher)", "open_book")):
        for split, sc in [("all", scores[key])] + [(k, v[key]) for k, v in
                                                   report["splits"].items()]:
            lines.append(f"| {name} | {split} | {sc['em']:.3f} | {sc['f1']:.3f} | "
                         f"{sc['contains']:.3f} |")
    if retention is not None:
        lines += ["", f"Retention on {retention['n']} general questions: the base answers "
                  f"{retention['base_right']} (contains {retention['before']['contains']:.3f}, "
                  f"EM {retention['before']['em']:.3f}); after the sleep contains "
                  f"{retention['after']['contains']:.3f}, EM {retention['after']['em']:.3f}; "
                  f"{retention['kept']} of the base's {retention['base_right']} still answered "
                  f"(retention {retention['retention']:.3f})."]
    lines += ["", "Wall time: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s"
                                            for k, v in wall.items()) + "."]
    lines += ["", f"{len(res.rows.seeding)} seeding prompts ({res.rows.dropped} dropped for "
              f"overlapping a probe), {len(res.rows.replay)} replay prompts "
              f"({res.rows.earlier} from earlier sleeps), {cfg.steps} steps.", ""]
    if res.rehearsal is not None:
        rh, d = res.rehearsal, res.rehearsal["dreams"]
        lines += [f"Rehearsal: {rh['steps']} steps ({rh['status']}) on {d['rows']} dreams "
                  f"({d['kept']} kept, copy share {d['copy_share']:.2f}, {d['dropped_probe']} "
                  f"dropped for a probe question) and {rh['replay_rows']} replay rows, "
                  f"{rh['seconds']:.1f} s.", ""]
    if warning:
        lines += [f"**Warning:** {warning}.", ""]
    cell = lambda t: " ".join(str(t).split()).replace("|", "\\|")
    lines += ["## Predictions (greedy, closed book before and after; open book: the teacher)",
              "", "| question | answers | before | after | open book |", "|---|---|---|---|---|"]
    for r in report["predictions"]:
        lines.append(f"| {cell(r['question'])} | {cell(' / '.join(r['answers']))} | "
                     f"{cell(r['before'])} | {cell(r['after'])} | {cell(r['open_book'])} |")
    write_text(os.path.join(workdir, "report.md"), "\n".join(lines) + "\n")
    return report
