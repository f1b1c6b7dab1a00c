"""The demo's stages for one seed: wake (base training), sleep (each method), evaluation, report.

See ``sleep_jax.demo`` for the story; this module holds the work so each stage can be tested.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import numpy as np
import optax
from flax import nnx

from sleep_jax import runtime
from sleep_jax.atomic import write_json, write_text
from sleep_jax.data import world as worldlib
from sleep_jax.data.pipeline import make_dataset
from sleep_jax.data.tokenizers import special_ids, word_level_tokenizer
from sleep_jax.distill import seeding
from sleep_jax.eval import probes
from sleep_jax.eval.report import write_report
from sleep_jax.grow import activate_slot, grow_model
from sleep_jax.mesh import batch_sharding, run_mesh
from sleep_jax.models import ModelConfig, create_model
from sleep_jax.models.checkpoint_dir import save_checkpoint
from sleep_jax.sleep import ReplayConfig, SleepConfig, configs_to_dict
from sleep_jax.sleep import sleep as run_sleep_pipeline
from sleep_jax.train.optim import OptimConfig, make_optimizer
from sleep_jax.train.state import create_train_state, fresh_copy
from sleep_jax.train.step import make_train_step

log = logging.getLogger("sleep_jax.demo")
TEST_WORDINGS = worldlib.EVALUATION  # ("near", "far"): read only for the final table


@dataclasses.dataclass
class Ctx:
    """What every stage of one seed shares."""

    cfg: object  # DemoConfig
    world: worldlib.World
    tok: object
    ids: dict
    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh

    def prompt_ids(self, text: str) -> list[int]:
        return self.tok.encode(text).ids


# ----------------------------------------------------------------------------------- WAKE
def base_examples(world: worldlib.World, cfg) -> list:
    """Base-training examples (the wake mixture); held-out wordings (near/far, validation)
    never appear.

    OLD passages in all templates and general text (LM loss on every token); OLD closed-book
    questions in TRAIN wordings, repeated ``cfg.qa_repeat`` times (loss on the answer); reading
    comprehension on fresh entities over 1..``rc_max_passages`` passages (the others are
    distractors: context + question -> answer); dreaming-format examples on TASK entities
    (``World.dream_examples``: the prompts dreaming will use, never about OLD or NEW).
    """
    ex: list = list(world.passages("old", all_templates=True))
    ex += [(worldlib.closed_book_prompt(q.question), " " + q.answer)
           for q in world.qa("old", "train")] * cfg.qa_repeat
    ex += [(worldlib.open_book_prompt(r.context, r.question), " " + r.answer)
           for r in world.rc_items(cfg.rc_items, seed=1, n_passages=1,
                                   max_passages=cfg.rc_max_passages)]
    ex += world.general_text(cfg.general_items, seed=1)
    ex += world.dream_examples(cfg.dream_items, seed=1)  # TASK entities only
    return ex


def train_base(ctx: Ctx) -> nnx.Module:
    """WAKE: trains the base model from scratch on packed ``base_examples`` (AdamW, warmup +
    cosine), on the run loop (in memory: loss read every 50 steps, nothing written)."""
    from sleep_jax.train.loop import IteratorSource, LoopConfig, run_loop

    cfg = ctx.cfg
    model = place_model(create_model(ctx.model_cfg, seed=cfg.seed), ctx.mesh)
    tx = make_optimizer(OptimConfig(lr=cfg.base_lr, warmup_steps=cfg.base_warmup,
                                    weight_decay=0.0), cfg.base_steps)
    state = create_train_state(model, tx)
    step = make_train_step(state, ctx.mesh)
    ds = make_dataset(base_examples(ctx.world, cfg), ctx.tok, seq_len=cfg.seq_len,
                      batch_size=cfg.base_batch, seed=cfg.seed, shard=(0, 1))
    # every process reads the same global batches (shard (0, 1)) and feeds its rows of each
    batches = runtime.ShardedBatches(iter(ds), ctx.mesh,
                                     batch_sharding(ctx.mesh, 2, cfg.base_batch))
    r = run_loop(step, state, IteratorSource(batches),
                 cfg=LoopConfig(steps=cfg.base_steps, log_every=50),
                 rng=jax.random.key(cfg.seed), desc="wake: base training")
    log.info("base model trained: %d steps, final loss %.3f", cfg.base_steps,
             r.history[-1]["loss"])
    return r.state.model()


# ----------------------------------------------------------------------------------- SLEEP
def entity_prompts(e: worldlib.Entity) -> list[str]:
    """The seeding prompts of one entity: questions in TRAIN wordings (closed-book form) and the
    seeding continuation templates. No held-out wording is used."""
    out = []
    for a in worldlib.ATTRIBUTES:
        for k in range(len(worldlib.QUESTION_TEMPLATES[a]["train"])):
            out.append(worldlib.closed_book_prompt(worldlib.question(e, a, "train", k)))
    out += [t.format(name=e.name) for t in worldlib.SEEDING_TEMPLATES]
    return out


def seeding_rows(ctx: Ctx, split: str, with_memory: bool) -> list[tuple[list, list]]:
    """(memory ids, prompt ids) rows: TRAIN-wording questions and seeding continuations.

    With ``with_memory`` the teacher reads the entity's passage first (seeding); without it
    (replay) teacher and student see the same prompt. No held-out wording is used.
    """
    rows = []
    for e in ctx.world.entities(split):
        mem = ctx.prompt_ids(worldlib.passage(e)) if with_memory else []
        rows += [(mem, ctx.prompt_ids(p)) for p in entity_prompts(e)]
    return rows


def seeding_batches(ctx: Ctx, replay_fraction: float, rng: np.random.Generator):
    """Endless SeedingBatches: NEW rows with memory, and replay rows on OLD prompts (the batch
    shape of the demo's sleep; ``sleep_step_time`` uses it)."""
    from sleep_jax.sleep import Rows, batch_fn

    new = seeding_rows(ctx, "new", True)
    old = seeding_rows(ctx, "old", False) if replay_fraction > 0 else []
    fn = batch_fn(Rows(new, old, [], 0, 0), batch_size=ctx.cfg.sleep_batch,
                  fraction=replay_fraction, bos_id=ctx.ids["bos"], pad_id=ctx.ids["pad"])
    while True:
        yield fn(rng)


def grow_student(ctx: Ctx, base: nnx.Module, rng, router: bool = False
                 ) -> tuple[nnx.Module, object, ModelConfig]:
    """The grown self: one low-rank expert slot beside every MLP, activated (B = 0: exact);
    with ``router`` the slot has a learned per-token gate."""
    dst = ctx.model_cfg.replace(expert_slots=1, expert_rank=ctx.cfg.expert_rank,
                                expert_router=router)
    k1, k2 = jax.random.split(rng)
    grown, _ = grow_model(base, ctx.model_cfg, dst, mesh=ctx.mesh, rng=k1)
    grown, mask = activate_slot(grown, None, 0, k2)
    return grown, mask, dst


# What each demo method is made of (descriptions in ``sleep_jax.demo.METHODS``): grow an expert
# slot (else train the whole model), give it a router, replay "full" / "low" / "none", and the
# seeding options it turns on ("sft": LM loss on the passages instead of seeding, replaying the
# wake mixture; "l2": an L2-SP pull toward the pre-sleep weights; "teacher": "self" for OPSD;
# "lam": the on-policy fraction).
METHOD_PARTS = {
    "sft": dict(expert=False, replay="none", sft=True),
    "sft_replay": dict(expert=False, sft=True),
    "sft_l2_replay": dict(expert=False, sft=True, l2=True),
    "sft_slot_replay": dict(sft=True),
    "opsd": dict(expert=False, replay="none", teacher="self", lam=1.0),
    "opsd_frozen": dict(expert=False, replay="none", lam=1.0),
    "seed_full": dict(expert=False),
    "seed_noreplay": dict(replay="none"),
    "sleep": {},
    "sleep_gated": dict(router=True, gate_l1=True),
    "sleep_low": dict(replay="low"),
    "sleep_gated_low": dict(router=True, gate_l1=True, replay="low"),
    "sleep_sparse": dict(expert_l1=True),
    "sleep_sparse_low": dict(expert_l1=True, replay="low"),
    "sleep_routed_sparse_low": dict(router=True, expert_l1=True, replay="low"),
    "sleep_imitate": dict(imitation=True),
    "sleep_dream": dict(rehearse="trained"),
    "sleep_dream_untrained": dict(rehearse="untrained"),
    "sleep_long": dict(extra_steps=True),
    "dream_only": dict(rehearse="trained", replay="none", dream_only=True),
}


@dataclasses.dataclass(frozen=True)
class MethodPlan:
    """A demo method as the sleep pipeline's configs (``sleep_jax.sleep``)."""

    sleep: SleepConfig
    seeding: seeding.SeedingConfig | None  # None: SFT on the NEW passages
    replay: ReplayConfig

    @property
    def expert(self) -> bool:
        return self.sleep.expert


# The settings a row may set for itself (DemoConfig.row_settings), and the rows that take
# another row's settings when they have none of their own (sleep + something takes sleep's).
ROW_KEYS = ("expert_lr", "full_lr", "replay_fraction", "low_replay_fraction", "l2_pull",
            "rehearse_lr", "rehearse_replay", "eval_every", "expert_rank", "sleep_warmup")
# eval_every: an early checkpoint can qualify
INT_ROW_KEYS = ("eval_every", "expert_rank", "sleep_warmup")
ROW_FAMILY = {"sleep_dream": "sleep", "sleep_dream_untrained": "sleep", "sleep_long": "sleep"}


def parse_row_settings(text: str) -> dict[str, dict[str, float]]:
    """``"sleep:expert_lr=1e-2,replay_fraction=0.625;seed_full:replay_fraction=0.75"`` ->
    {method: {key: value}}; raises ValueError naming the bad part and what is allowed."""
    out: dict[str, dict[str, float]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        method, sep, body = part.partition(":")
        method = method.strip()
        if not sep or method not in METHOD_PARTS:
            raise ValueError(f"row_settings part {part!r}: expected METHOD:KEY=VALUE,... with "
                             f"a method of {', '.join(METHOD_PARTS)}")
        for kv in filter(None, (x.strip() for x in body.split(","))):
            key, eq, value = (x.strip() for x in kv.partition("="))
            if not eq or key not in ROW_KEYS:
                raise ValueError(f"row_settings {method}: {kv!r}; keys allowed: "
                                 f"{', '.join(ROW_KEYS)}")
            try:
                v = float(value)
            except ValueError:
                raise ValueError(f"row_settings {method}: {key}={value!r} is not a number") \
                    from None
            if key in INT_ROW_KEYS and (v != int(v) or v < 1):
                raise ValueError(f"row_settings {method}: {key}={value!r} must be an "
                                 f"integer >= 1")
            out.setdefault(method, {})[key] = int(v) if key in INT_ROW_KEYS else v
    return out


def row_config(cfg, method: str):
    """``cfg`` with ``method``'s own settings from ``cfg.row_settings`` (or its family's)."""
    rows = parse_row_settings(cfg.row_settings)
    own = rows.get(method, rows.get(ROW_FAMILY.get(method, ""), {}))
    return dataclasses.replace(cfg, **own) if own else cfg


def method_plan(cfg, method: str, generators: dict | None = None) -> MethodPlan:
    """The plan of a demo method under the DemoConfig ``cfg``: one expert slot (the demo grows
    one sleep's worth), the demo's optimizer, budget and prompts, with the row's own settings
    (``row_settings``); a dreaming row rehearses with ``generators[which]`` (a generator
    folder, ``demo_dream.train_demo_generator``)."""
    from sleep_jax.dream.rehearse import RehearseConfig

    cfg = row_config(cfg, method)
    parts = {"expert": True, "router": False, "replay": "full", **METHOD_PARTS[method]}
    replay = {"full": cfg.replay_fraction, "low": cfg.low_replay_fraction,
              "none": 0.0}[parts["replay"]]
    scfg = None
    if not parts.get("sft"):
        scfg = seeding.SeedingConfig(
            gate_l1=cfg.gate_l1 if parts.get("gate_l1") else 0.0,
            expert_l1=cfg.expert_l1 if parts.get("expert_l1") else 0.0,
            alpha=cfg.imitation_alpha if parts.get("imitation") else 1.0,
            teacher=parts.get("teacher", "frozen"), lam=parts.get("lam", 0.5))
    opt = lambda lr, pull=0.0: OptimConfig(lr=lr, warmup_steps=cfg.sleep_warmup,
                                           weight_decay=0.0, pull_to_init=pull)
    rehearse = RehearseConfig()
    if parts.get("rehearse"):
        from sleep_jax.demo_dream import dream_config

        if not generators or parts["rehearse"] not in generators:
            raise ValueError(f"demo method {method!r} needs the {parts['rehearse']} generator")
        alone = parts.get("dream_only", False)  # SEAL-like: a fresh slot, dreams only, the
        # steps of sleep_dream, the lr every fresh slot trains with (not swept)
        rehearse = RehearseConfig(
            generator=generators[parts["rehearse"]],
            steps=cfg.rehearse_steps + (cfg.sleep_steps if alone else 0),
            batch_size=cfg.sleep_batch, replay_fraction=0.0 if alone else cfg.rehearse_replay,
            rounds=cfg.rehearse_rounds, optim=opt(cfg.expert_lr if alone else cfg.rehearse_lr),
            dream=dream_config(cfg), temperature=cfg.dream_temperature, seed=cfg.seed)
    steps = cfg.sleep_steps + (cfg.rehearse_steps if parts.get("extra_steps") else 0)
    steps = 0 if parts.get("dream_only") else steps
    sleep_cfg = SleepConfig(
        steps=steps, batch_size=cfg.sleep_batch, expert=parts["expert"], slots=1,
        rank=cfg.expert_rank, router=parts["router"], optim=opt(cfg.expert_lr),
        full_optim=opt(cfg.full_lr, cfg.l2_pull if parts.get("l2") else 0.0),
        prompts="given", memory_separator="",
        objective="sft" if parts.get("sft") else "seeding", sft_seq_len=cfg.sft_seq_len,
        seed=cfg.seed, eval_every=cfg.eval_every, checkpoint_every=0, rehearse=rehearse)
    source = "texts" if parts.get("sft") else "prompts"
    return MethodPlan(sleep_cfg, scfg, ReplayConfig(fraction=replay, source=source,
                                                    earlier_sleeps=False))


def run_method(ctx: Ctx, method: str, base: nnx.Module, validation, base_val_old: float,
               generators: dict | None = None) -> dict:
    """Sleep with one method through the sleep pipeline (``sleep_jax.sleep.sleep``), choosing
    its checkpoint on validation as it trains (``eval.select.BestCheckpoint``: best validation
    NEW with validation OLD drop <= ``max_old_drop``). Returns the end model, the selected
    model (None when no evaluation point qualifies) and its record, the validation curve, step
    timings, the method's configs and, with an expert, its activity per row kind."""
    from sleep_jax.data.jsonl import Memory
    from sleep_jax.eval.select import BestCheckpoint

    plan = method_plan(ctx.cfg, method, generators)
    new = ctx.world.entities("new")
    memories = [Memory(e.name, worldlib.passage(e)) for e in new]
    prompts = {e.name: entity_prompts(e) for e in new}
    replay_prompts = [p for e in ctx.world.entities("old") for p in entity_prompts(e)]
    replay_texts = base_examples(ctx.world, ctx.cfg) if plan.seeding is None else None
    best = BestCheckpoint(base_val_old, ctx.cfg.max_old_drop)

    def on_eval(model, step):
        rec = validation(model)
        best.update(step, rec, nnx.state(model, nnx.Param))
        return rec

    r = run_sleep_pipeline(base, ctx.tok, memories, tokens={
        "bos_id": ctx.ids["bos"], "eos_id": ctx.ids["eos"], "pad_id": ctx.ids["pad"]},
        cfg=plan.sleep, seeding_cfg=plan.seeding, replay=plan.replay, prompts=prompts,
        replay_prompts=replay_prompts, replay_texts=replay_texts, mesh=ctx.mesh,
        eval_fn=on_eval, desc=f"sleep: {method}",
        # dreaming rows: no dream or replay row may hold an evaluation question
        probe_questions=probe_questions(ctx) if plan.sleep.rehearse.enabled else ())
    curve = [{**c, "train_s": c["step"] * r.step_s} for c in r.curve]
    end_step = r.history[-1]["step"] if r.history else 0
    if r.rehearsal is not None and r.rehearsal["steps"]:  # dreaming's end: one more point
        train_s = end_step * r.step_s + r.rehearsal["seconds"]  # dreams and rehearsal steps
        end_step += r.rehearsal["steps"]
        curve.append({"step": end_step, **on_eval(r.model, end_step), "train_s": train_s})
    selected = None
    if best.qualifies:  # the host copy back onto the end model's shardings
        selected = fresh_copy(r.model)
        end = nnx.state(selected, nnx.Param)
        nnx.update(selected, jax.tree.map(lambda h, x: jax.device_put(h, x.sharding),
                                          best.params, end))
    if r.status != "done":
        log.warning("%s stopped early (%s): %s", method, r.status, r.message)
    out = {"model": r.model, "selected_model": selected, "selected": best.record,
           "end_step": end_step, "status": r.status,
           "curve": curve, "compile_s": r.compile_s,
           # dreaming alone: no consolidation step, the rehearsal's steps are the row's
           "step_s": r.step_s if r.times or r.rehearsal is None
           else (r.rehearsal["step_s"] or 0.0),
           "configs": configs_to_dict(plan.sleep, plan.seeding, plan.replay)}
    if r.experts:
        out["experts"] = r.experts
    if r.rehearsal is not None:
        out["rehearsal"] = r.rehearsal
    return out


def probe_questions(ctx: Ctx) -> list[str]:
    """Every question the demo evaluates NEW memories with (test and validation wordings):
    a dream or replay row holding one is dropped (``dream.rehearse``)."""
    return [q.question for w in (*TEST_WORDINGS, *worldlib.VALIDATION)
            for q in ctx.world.qa("new", w)]


def sft_step_time(ctx: Ctx, base: nnx.Module, n: int = 12) -> float:
    """Median time of an SFT step of the grown model on the sleep batch shape (the unit of the
    seeding step cost)."""
    grown, mask, _ = grow_student(ctx, base, jax.random.key(5))
    state = create_train_state(fresh_copy(grown), optax.adamw(1e-3))
    step = make_train_step(state, ctx.mesh, mask=mask)
    rows = next(seeding_batches(ctx, ctx.cfg.replay_fraction, np.random.default_rng(0)))
    B, P = rows.student_prefix.shape
    T = P + seeding.SeedingConfig().max_new_tokens
    batch = {"inputs": np.zeros((B, T), np.int32), "targets": np.zeros((B, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
             "segment_ids": np.ones((B, T), np.int32), "mask": np.ones((B, T), bool),
             "loss_mask": np.ones((B, T), bool)}
    batch = runtime.shard_batch(batch, ctx.mesh, batch_sharding(ctx.mesh, 2, B))
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        state, m = step(state, batch, jax.random.key(i))
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


# ----------------------------------------------------------------------------------- EVAL
def _scores(ctx: Ctx, model, prompts: list[str], items) -> float:
    return probes.qa_scores(model, ctx.tok, prompts, [[q.answer] for q in items],
                            bos_id=ctx.ids["bos"], eos_id=ctx.ids["eos"],
                            pad_id=ctx.ids["pad"])["em"]


def closed_book(ctx: Ctx, model, items) -> float:
    """Exact match of closed-book answers to ``items`` (QAItems)."""
    return _scores(ctx, model, [worldlib.closed_book_prompt(q.question) for q in items], items)


def evaluate(ctx: Ctx, model, base) -> dict:
    """Closed-book NEW/OLD on the held-out TEST wordings (near, far) and KL to the base on
    general text: the final table's figures (never read to choose anything)."""
    out = {f"closed_{split}_{w}": closed_book(ctx, model, ctx.world.qa(split, w))
           for split in ("new", "old") for w in TEST_WORDINGS}
    general = ctx.world.general_text(200, seed=7)
    out["kl_to_base"] = probes.kl_to_base(model, base, ctx.tok, general, bos_id=ctx.ids["bos"],
                                          pad_id=ctx.ids["pad"])
    return out


def open_book(ctx: Ctx, model) -> dict:
    """NEW questions (test wordings) with the right passage alone in context: the teacher's
    level."""
    out = {}
    for w in TEST_WORDINGS:
        items = ctx.world.qa("new", w)
        out[f"open_new_{w}"] = _scores(
            ctx, model, [worldlib.open_book_prompt(q.passage, q.question) for q in items], items)
    return out


def in_context(ctx: Ctx, model) -> dict:
    """The in-context-only baseline: every NEW question (test wordings) asked with a bounded
    store of the last ``store_size`` NEW memories (arrival order) in context; a memory that
    left the store is not there to read."""
    n = ctx.cfg.store_size
    store = " ".join(worldlib.passage(e) for e in ctx.world.entities("new")[-n:])
    out = {}
    for w in TEST_WORDINGS:
        items = ctx.world.qa("new", w)
        out[f"closed_new_{w}"] = _scores(
            ctx, model, [worldlib.open_book_prompt(store, q.question) for q in items], items)
    return out


def make_validation(ctx: Ctx):
    """``validation(model) -> {"val_new", "val_old"}``: closed-book accuracy on the
    VALIDATION wordings (val_near + val_far), NEW entities and the first ``val_old_entities``
    OLD ones (0 = all, the default). The only figures that choose a checkpoint."""
    keep = {e.id for e in ctx.world.entities("old")[:ctx.cfg.val_old_entities or None]}
    new = [q for w in worldlib.VALIDATION for q in ctx.world.qa("new", w)]
    old = [q for w in worldlib.VALIDATION for q in ctx.world.qa("old", w)
           if q.memory_id in keep]

    def validation(model) -> dict:
        return {"val_new": closed_book(ctx, model, new), "val_old": closed_book(ctx, model, old)}

    return validation


# the DemoConfig fields that make the base model (a reused base must match them all)
BASE_FIELDS = ("seed", "n_old", "n_new", "n_task", "embed", "layers", "heads", "mlp",
               "base_steps", "base_batch", "seq_len", "qa_repeat", "base_lr", "base_warmup",
               "rc_items", "rc_max_passages", "general_items", "dream_items")


def base_settings(cfg) -> dict:
    """The settings of a DemoConfig that make its base model."""
    return {k: getattr(cfg, k) for k in BASE_FIELDS}


def demo_mesh(cfg) -> jax.sharding.Mesh:
    """The demo's mesh: ``cfg.mesh`` over every device of every process, or over the first
    ``cfg.devices`` (one process only; ``mesh.run_mesh``).

    Raises:
      ConfigError: a mesh spec the devices do not fit, a device count out of range.
    """
    from sleep_jax.config import ConfigError

    try:
        return run_mesh(cfg.mesh, cfg.devices)
    except ValueError as e:
        raise ConfigError(f"demo.mesh={cfg.mesh!r}, demo.devices={cfg.devices}: {e}") from None


def place_model(model: nnx.Module, mesh) -> nnx.Module:
    """A model built alike on every process (same config and seed) put onto ``mesh`` by its
    logical names, each process placing its own shards (from host copies: the values are
    those of the eager build, bitwise)."""
    from sleep_jax.models.sharding import state_shardings

    graphdef, state = nnx.split(model)
    state = jax.device_put(jax.tree.map(np.asarray, state), state_shardings(state, mesh))
    return nnx.merge(graphdef, state)


def make_ctx(cfg) -> Ctx:
    """One seed's world, tokenizer, model config and mesh (``demo_mesh``)."""
    world = worldlib.make_world(cfg.seed, cfg.n_old, cfg.n_new, cfg.n_task)
    tok = word_level_tokenizer(world.vocabulary_corpus())
    ids = special_ids(tok)
    model_cfg = ModelConfig(vocab=tok.get_vocab_size(), embed=cfg.embed, mlp=cfg.mlp,
                            layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.heads,
                            head_dim=cfg.embed // cfg.heads, max_seq_len=256)
    return Ctx(cfg, world, tok, ids, model_cfg, demo_mesh(cfg))


def save_base(ctx: Ctx, base: nnx.Module, path: str) -> str:
    """The base model in the checkpoint format, with the settings it was trained under
    (``extra.base_settings``: what ``sleep-jax cycle --config configs/cycle.py:demo`` checks
    before it reuses this base)."""
    ids = ctx.ids
    save_checkpoint(path, base, ctx.tok,
                    tokens={"bos_id": ids["bos"], "eos_id": ids["eos"], "pad_id": ids["pad"],
                            "unk_id": ids["unk"], "add_bos": True, "chat_template": None},
                    extra={"source": "sleep-jax demo", "seed": ctx.cfg.seed,
                           "base_settings": base_settings(ctx.cfg)})
    return path


def run_seed(cfg, workdir: str) -> dict:
    """Everything for one seed; writes report.json / report.md / plots into ``workdir``."""
    from sleep_jax.demo import METHODS

    os.makedirs(workdir, exist_ok=True)
    t_start = time.time()
    ctx = make_ctx(cfg)
    world, tok, model_cfg = ctx.world, ctx.tok, ctx.model_cfg
    log.info("seed %d: world %d OLD / %d NEW / %d TASK entities, vocabulary %d, model %s",
             cfg.seed, cfg.n_old, cfg.n_new, cfg.n_task, tok.get_vocab_size(), model_cfg)

    t0 = time.time()
    base = train_base(ctx)
    t_base = time.time() - t0
    # the base model in the checkpoint format, and NEW memories/probes as JSONL, so that
    # `sleep-jax sleep --checkpoint <workdir>/base --memories ... --probes ...` can be tried
    save_base(ctx, base, os.path.join(workdir, "base"))  # every process: its shards
    if runtime.is_writer():
        world.export_jsonl(os.path.join(workdir, "data"), "new", TEST_WORDINGS)
    validation = make_validation(ctx)
    t0 = time.time()
    base_eval = {**evaluate(ctx, base, base), **open_book(ctx, base), **validation(base)}
    in_ctx = in_context(ctx, base)
    t_eval = time.time() - t0
    log.info("base: %s; in-context (store of %d): %s (%.0f s)", _fmt(base_eval),
             cfg.store_size, _fmt(in_ctx), t_eval)

    results, curves, timing, method_configs = {}, {}, {}, {}
    generators, dreaming = None, None
    from sleep_jax import demo_dream

    if demo_dream.needs_generator(cfg.methods):  # once per seed, before the rows
        dreaming = demo_dream.train_demo_generator(ctx, base, os.path.join(workdir, "dream"))
        generators = {k: dreaming[k] for k in ("trained", "untrained")}
        timing["dream_generator"] = {"step_s": dreaming.pop("step_s"), "compile_s":
                                     dreaming.pop("compile_s"), "wall_s": dreaming["wall_s"]}
    for method in cfg.methods:
        t0 = time.time()
        r = run_method(ctx, method, base, validation, base_eval["val_old"], generators)
        last = r["curve"][-1]
        if last["step"] != r["end_step"]:  # stopped between evaluations: validate the end too
            last = {"step": r["end_step"], **validation(r["model"])}
        end = {"step": r["end_step"], **evaluate(ctx, r["model"], base),
               "val_new": last["val_new"], "val_old": last["val_old"]}
        sel = r["selected"]
        if sel is not None:
            figures = (end if sel["step"] == end["step"]
                       else evaluate(ctx, r["selected_model"], base))
            sel = {**figures, "step": sel["step"], "val_new": sel["val_new"],
                   "val_old": sel["val_old"]}
        results[method] = {"description": METHODS[method], "qualifies": sel is not None,
                           "selected": sel, "end": end,
                           "extra": {f"expert_{k}": float(v)
                                     for k, v in r.get("experts", {}).items()}}
        if "rehearsal" in r:
            results[method]["rehearsal"] = r["rehearsal"]
        curves[method] = r["curve"]
        timing[method] = {"step_s": r["step_s"], "compile_s": r["compile_s"],
                          "wall_s": time.time() - t0}
        method_configs[method] = r["configs"]
        log.info("%s: selected %s; end %s (%.0f s)", method,
                 "none qualifies" if sel is None else _fmt(sel), _fmt(end),
                 timing[method]["wall_s"])
    report = {
        "seed": cfg.seed, "config": dataclasses.asdict(cfg), "model_config": model_cfg.to_dict(),
        "platform": jax.devices()[0].platform, "max_old_drop": cfg.max_old_drop,
        "store_size": cfg.store_size, "base": base_eval, "in_context": in_ctx,
        "methods": results, "curves": curves, "timing": timing,
        "sft_step_s": sft_step_time(ctx, base), "method_configs": method_configs,
        "base_train_s": t_base, "base_eval_s": t_eval, "wall_s": time.time() - t_start,
    }
    if dreaming is not None:
        report["dreaming"] = dreaming
    if runtime.is_writer():
        write_report(report, workdir)
    return report


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in d.items())


def summarize(reports: list[dict], workdir: str) -> str:
    """Mean and spread over seeds of every figure; writes summary.json and summary.md."""
    from sleep_jax.eval.report import summary_table

    text, data = summary_table(reports)
    if not runtime.is_writer():
        return text
    write_json(os.path.join(workdir, "summary.json"), data)
    write_text(os.path.join(workdir, "summary.md"), text + "\n")
    return text
