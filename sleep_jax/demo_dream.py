"""The demo's dreaming rows (issue 12, item 11): a generator trained on the TASK entities, then
sleep + dreaming beside its controls.

1. GENERATOR (``train_demo_generator``, once per seed, only when a dreaming row runs). The base
   model's generator adapter is trained by ``sleep-jax dream``'s run (``dream.cli.
   train_generator``: GRPO on the contrastive reward over the null dream) on the world's TASK
   split: each TASK entity's passage is a context C and its own attributes, asked in the TASK
   wording, are tau. TASK entities are never evaluated, and no OLD/NEW passage and no near, far
   or validation wording enters generation, selection, reward or training
   (``check_task_discipline``). The untrained generator (the same adapter before its first
   update) is kept beside it for the control.
2. ROWS (``sleep_jax.demo.METHODS``). ``sleep_dream``: the sleep row's consolidation, then
   rehearsal (``dream.rehearse``): the trained generator dreams about each NEW memory and the
   kept dreams, mixed with the sleep's replay rows, train the sleep's slot ``rehearse_steps``
   more steps. ``sleep_dream_untrained``: the same with the untrained generator (does training
   the generator matter?). ``sleep_long``: the sleep row given the same extra steps as
   consolidation steps (is it only more steps?). Each is selected on validation like every row:
   the rehearsal's end is one more evaluation point of its curve.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from sleep_jax import runtime
from sleep_jax.data import world as worldlib

log = logging.getLogger("sleep_jax.demo")
DREAM_PARTS = {"sleep_dream": "trained", "sleep_dream_untrained": "untrained"}
UNTRAINED_DIR = "generator_untrained"  # beside the trained generator's model/ folder


def needs_generator(methods) -> bool:
    return any(m in DREAM_PARTS for m in methods)


def check_task_discipline(world: worldlib.World, records: list[dict]) -> None:
    """Refuses a task set with a record that is not a TASK entity's, holds a question in an
    evaluation wording (near, far, validation) or names an OLD or NEW entity: the generator
    learns on TASK entities only.

    Raises:
      ValueError: naming the record and what it holds.
    """
    import re

    task = {e.id: e for e in world.entities("task")}
    held_out = {q.question for split in ("old", "new")
                for w in (*worldlib.EVALUATION, *worldlib.VALIDATION)
                for q in world.qa(split, w)}
    names = [e.name for split in ("old", "new") for e in world.entities(split)]
    for r in records:
        if r["id"] not in task:
            raise ValueError(f"task record {r['id']!r} is not a TASK entity of this world")
        for q in r["questions"]:
            if q["question"] in held_out:
                raise ValueError(f"task record {r['id']!r} asks an evaluation question "
                                 f"{q['question']!r}")
        # its own name out first: a 3-syllable OLD name may begin a 4-syllable TASK name
        text = " ".join([r["context"], *(q["question"] for q in r["questions"])])
        text = " " + re.sub(r"[^a-z0-9]+", " ", text).replace(task[r["id"]].name, " ") + " "
        bad = [n for n in names if f" {n} " in text]
        if bad:
            raise ValueError(f"task record {r['id']!r} names evaluated entity {bad[0]!r}")


def generator_configs(cfg):
    """(DreamRunConfig, DreamConfig, RLConfig) of the demo's generator training."""
    from sleep_jax.dream.cli import DreamRunConfig
    from sleep_jax.rl.config import RLConfig
    from sleep_jax.train.optim import OptimConfig

    run = DreamRunConfig(steps=cfg.dream_updates, contexts=cfg.dream_contexts, seed=cfg.seed,
                         rank=min(cfg.dream_rank, cfg.expert_rank),
                         optim=OptimConfig(lr=cfg.dream_lr, warmup_steps=0, weight_decay=0.0),
                         dream_template=worldlib.DREAM_TEMPLATES["implications"],
                         prompt_format=worldlib.CLOSED_BOOK_FORMAT,
                         log_every=max(1, cfg.dream_updates // 20),
                         checkpoint_every=0, progress_bar=True)
    return run, dream_config(cfg), RLConfig(temperature=cfg.dream_temperature)


def dream_config(cfg):
    from sleep_jax.dream.config import DreamConfig

    return DreamConfig(dreams=cfg.dreams, keep_top=cfg.dream_keep_top,
                       keep_random=cfg.dream_keep_random, steps=cfg.dream_inner_steps,
                       max_dream_tokens=cfg.dream_tokens)


def train_demo_generator(ctx, base, workdir: str) -> dict:
    """Trains the generator on the world's TASK split (module docstring, step 1) into
    ``workdir`` (its model/ folder), writes the untrained control beside it; returns
    {"trained", "untrained" (folders), "rewards" [(update, mean reward)], "wall_s", ...}."""
    from sleep_jax.dream.cli import train_generator
    from sleep_jax.dream.generator import GENERATOR_FILE, save_generator
    from sleep_jax.dream.tasks import read_tasks, task_arrays, world_task_records

    t0 = time.time()
    records = world_task_records(ctx.world)
    check_task_discipline(ctx.world, records)
    tasks_path = os.path.join(workdir, "tasks.jsonl")
    if runtime.is_writer():
        from sleep_jax.data.jsonl import write_jsonl

        write_jsonl(tasks_path, records)
    runtime.barrier("sleep_jax_demo_tasks_written")
    run, dcfg, rl = generator_configs(ctx.cfg)
    enc = lambda s: ctx.tok.encode(s, add_special_tokens=False).ids
    arrays = task_arrays(read_tasks(tasks_path), enc, dream_template=run.dream_template,
                         prompt_format=run.prompt_format, bos_id=ctx.ids["bos"],
                         pad_id=ctx.ids["pad"])
    tokens = {"bos_id": ctx.ids["bos"], "eos_id": ctx.ids["eos"], "pad_id": ctx.ids["pad"],
              "unk_id": ctx.ids["unk"], "add_bos": True, "chat_template": None}
    res = train_generator(base, ctx.tok, {"tokens": tokens, "extra": {}}, arrays, run=run,
                          cfg=dcfg, rl=rl, workdir=os.path.join(workdir, "train"),
                          checkpoint=os.path.join(workdir, "..", "base"), mesh=ctx.mesh)
    trained = os.path.join(workdir, "train", "model")
    untrained = os.path.join(workdir, UNTRAINED_DIR)
    if runtime.is_writer():  # config.json + tokenizer.json + the adapter before training
        os.makedirs(untrained, exist_ok=True)
        for f in os.listdir(trained):
            if f.endswith(".json") and os.path.isfile(os.path.join(trained, f)):
                shutil.copy(os.path.join(trained, f), os.path.join(untrained, f))
        save_generator(untrained, res["initial_adapter"])
    runtime.barrier("sleep_jax_demo_generators_written")
    rewards = [(r["step"], r["reward_mean"]) for r in res["history"] if "reward_mean" in r]
    log.info("dream generator: %d updates on %d TASK contexts, mean reward %.3f -> %.3f "
             "(%.0f s); %s", res["step"], len(records), rewards[0][1] if rewards else
             float("nan"), rewards[-1][1] if rewards else float("nan"), time.time() - t0,
             GENERATOR_FILE)
    return {"trained": trained, "untrained": untrained, "rewards": rewards,
            "status": res["status"], "updates": res["step"], "contexts": len(records),
            "step_s": res["step_s"], "compile_s": res["compile_s"], "wall_s": time.time() - t0}
