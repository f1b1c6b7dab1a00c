"""``sleep-jax cycle --config configs/cycle.py:demo``: the wake/sleep cycle on the demo world.

The demo's world (``configs/demo.py``'s DemoConfig, seed ``demo.seed``) gives the stream: the
first ``cycle_demo.memories`` NEW entities' passages in order, a sleep every
``cycle.sleep_every`` of them (10 cycles of 3 by default: the base reads up to 3 passages in
context, ``DemoConfig.rc_max_passages``). Each set is measured closed-book on its HELD-OUT
wordings (near + far) after every cycle; OLD retention on the first ``cycle_demo.old_entities``
OLD entities in the same wordings. Every method gets the same steps and batch rows per cycle;
seeding prompts are TRAIN-wording questions and seeding continuations (``demo_run.
entity_prompts``), as in the demo's sleep; replay prompts are OLD questions in TRAIN wordings
(optionally also reading-comprehension prompts and general sentences); no held-out wording
enters training.

Methods (``cycle_demo.methods``; the demo's table, ``sleep_jax.demo.METHODS``, plus
``in_context``):
  sleep        seeding into the next free expert slot + replay of OLD prompts and of every
               earlier sleep's prompts (slots run out: ``SleepConfig.when_full="grow"``)
  seed_full    the same seeding and replay into the full model (seeding without growth)
  sft_replay   SFT of the full model on the passages + replay of the wake mixture and of every
               earlier cycle's passages
  sft_l2_replay  as sft_replay with an L2-SP pull toward the pre-sleep weights (the
               regularisation baseline, in place of EWC; ``demo.l2_pull``)
  in_context   nothing trained: the store of the last ``cycle.store_size`` memories in context
The base: ``cycle_demo.base`` (default the demo's ``runs/demo/seed0/base``) is reused when it
was trained by ``sleep-jax demo`` with the same world and base settings; otherwise the base is
trained here (``demo_run.train_base``) and saved to ``<workdir>/base``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from sleep_jax import cycle as cyc
from sleep_jax import demo_run
from sleep_jax.data import world as worldlib
from sleep_jax.data.jsonl import Memory, Probe

log = logging.getLogger("sleep_jax.cycle")

METHODS = ("sleep", "seed_full", "sft_replay", "sft_l2_replay", "in_context")


@dataclasses.dataclass(frozen=True)
class CycleDemoConfig:
    """The demo stream and its methods (``configs/cycle.py:demo``).

    memories: NEW entities in the stream (the first ones of the world), a multiple of the
      cycle period for equal cycles.
    steps / batch_size: every method's sleep per cycle (the same rows for all).
    slots: pre-allocated expert slots of the sleep method (fewer than cycles: the
      ``when_full`` policy runs).
    old_entities: OLD entities measured after every cycle (held-out wordings).
    replay_reading / replay_general: replay prompts besides the OLD questions: one-passage
      reading-comprehension prompts on fresh entities (TRAIN wordings, no answer) and general
      sentences (other seeds than the KL texts), meant to keep the reading skill the next
      sleep's teacher needs. Off by default: on validation wordings (4 cycles, docs/LOG.md
      2026-12-01 fourth session) 600 + 200 of them doubled the step time and tripled KL to
      the base without a better learning or OLD figure.
    base: a demo base checkpoint to reuse when it matches ("" : always train).
    wordings: the held-out wordings every set (and OLD) is measured in: the test wordings
      ("near", "far": the reported figures) or the validation ones ("val_near", "val_far":
      for choosing settings, never reported as results).
    """

    memories: int = 30
    steps: int = 60
    batch_size: int = 32
    slots: int = 4
    old_entities: int = 30
    replay_reading: int = 0
    replay_general: int = 0
    methods: tuple[str, ...] = ("sleep", "seed_full", "sft_replay")
    base: str = "runs/demo/seed0/base"
    wordings: tuple[str, ...] = ("near", "far")

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"cycle_demo.methods={self.methods!r}: unknown {bad}; allowed: "
                             f"{METHODS}")
        if tuple(self.wordings) not in (("near", "far"), ("val_near", "val_far")):
            raise ValueError(f"cycle_demo.wordings={self.wordings!r}; allowed: ('near', "
                             "'far') (test) or ('val_near', 'val_far') (validation)")
        for name in ("memories", "steps", "batch_size", "slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"cycle_demo.{name}={getattr(self, name)} must be >= 1")


def stream(world: worldlib.World, cd: CycleDemoConfig, demo_cfg=None):
    """(memories, probes, inputs) of the demo stream (module docstring); with ``demo_cfg``
    (the DemoConfig) the wake mixture the SFT baselines replay (``demo_run.base_examples``)."""
    new = world.entities("new")
    if cd.memories > len(new):
        raise ValueError(f"cycle_demo.memories={cd.memories} > the world's {len(new)} NEW "
                         "entities (demo.n_new)")
    ents = new[:cd.memories]
    keep = {e.id for e in ents}
    memories = [Memory(e.id, worldlib.passage(e)) for e in ents]
    probes = [Probe(q.memory_id, q.question, (q.answer,)) for w in cd.wordings
              for q in world.qa("new", w) if q.memory_id in keep]
    old_keep = {e.id for e in world.entities("old")[:cd.old_entities]}
    old_probes = [Probe(q.memory_id, q.question, (q.answer,)) for w in cd.wordings
                  for q in world.qa("old", w) if q.memory_id in old_keep]
    replay = [p for e in world.entities("old") for p in demo_run.entity_prompts(e)]
    if cd.replay_reading:  # the skill the next sleep's teacher reads the memories with
        replay += [worldlib.open_book_prompt(r.context, r.question)
                   for r in world.rc_items(cd.replay_reading, seed=5)]
    if cd.replay_general:
        replay += world.general_text(cd.replay_general, seed=3)
    inputs = cyc.CycleInputs(
        prompts={e.id: demo_run.entity_prompts(e) for e in ents}, replay_prompts=replay,
        replay_texts=demo_run.base_examples(world, demo_cfg) if demo_cfg is not None else (),
        old_probes=old_probes, texts=world.general_text(200, seed=7))
    return memories, probes, inputs


def methods(demo_cfg, cd: CycleDemoConfig, *, progress_bar: bool = True
            ) -> list[cyc.CycleMethod]:
    """The cycle methods: the demo's method plans with the cycle's budget, slots and replay
    of every earlier sleep."""
    out = []
    for name in cd.methods:
        if name == "in_context":
            out.append(cyc.CycleMethod(name, None))
            continue
        plan = demo_run.method_plan(dataclasses.replace(demo_cfg, sleep_steps=cd.steps,
                                                        sleep_batch=cd.batch_size), name)
        scfg = dataclasses.replace(plan.sleep, slots=cd.slots, when_full="grow", eval_every=0,
                                   checkpoint_every=max(cd.steps // 2, 1),
                                   progress_bar=progress_bar)
        out.append(cyc.CycleMethod(name, scfg, plan.seeding,
                                   dataclasses.replace(plan.replay, earlier_sleeps=True)))
    return out


def reusable(path: str, demo_cfg) -> str | None:
    """Why the checkpoint at ``path`` cannot stand for this config's base (None: it can)."""
    import json

    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        return "no checkpoint there"
    with open(cfg_file) as f:
        extra = json.load(f).get("extra", {})
    if extra.get("source") != "sleep-jax demo" or "base_settings" not in extra:
        return "not a base written by this version of `sleep-jax demo`"
    want = demo_run.base_settings(demo_cfg)
    diff = {k: (extra["base_settings"].get(k), v) for k, v in want.items()
            if extra["base_settings"].get(k) != v}
    return f"other base settings (theirs, ours): {diff}" if diff else None


def prepare_base(demo_cfg, cd: CycleDemoConfig, workdir: str) -> tuple[str, float]:
    """(base checkpoint dir, seconds spent training it: 0 when reused)."""
    own = os.path.join(workdir, "base")
    for path in ([cd.base] if cd.base else []) + [own]:
        why = reusable(path, demo_cfg)
        if why is None:
            log.info("base: reusing %s", path)
            return path, 0.0
        if path == cd.base:
            log.info("base: not reusing %s (%s); training one", path, why)
    t0 = time.time()
    ctx = demo_run.make_ctx(demo_cfg)
    base = demo_run.train_base(ctx)
    demo_run.save_base(ctx, base, own)
    return own, time.time() - t0


def run(config, workdir: str) -> dict:
    """The demo cycle: base, stream, every method's cycles, the report side by side."""
    from sleep_jax.config import from_section
    from sleep_jax.demo import DemoConfig

    demo_cfg = from_section(DemoConfig, config.demo, "demo")
    cd = from_section(CycleDemoConfig, config.cycle_demo, "cycle_demo")
    cycle_cfg = from_section(cyc.CycleConfig, config.cycle, "cycle")
    ms = methods(demo_cfg, cd, progress_bar=config.get("progress_bar", True))
    t0 = time.time()
    base_dir, base_s = prepare_base(demo_cfg, cd, workdir)
    world = worldlib.make_world(demo_cfg.seed, demo_cfg.n_old, demo_cfg.n_new, demo_cfg.n_task)
    memories, probes, inputs = stream(world, cd, demo_cfg)
    out = cyc.run_methods(base_dir, memories, probes, workdir=workdir, cfg=cycle_cfg,
                          methods=ms, inputs=inputs, mesh=demo_run.demo_mesh(demo_cfg))
    out["base_dir"], out["base_train_s"] = base_dir, base_s
    out["wall_s"] = time.time() - t0
    return out
