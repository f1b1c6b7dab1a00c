"""``sleep-jax sleep``: Knowledge Seeding on your own checkpoint, memories and probes.

  sleep-jax sleep --checkpoint CKPT --memories M.jsonl --probes P.jsonl --workdir DIR
      [--config configs/sleep.py[:quick]] [--config.sleep.steps=200] [--config.seeding.lam=0.5]

1. Load the checkpoint (A's format) and the JSONL memories/probes (B's formats).
2. Seeding prompts come from the memories themselves, never from the probes: every sentence of
   a memory cut after its 2nd..(n-1)th word is a continuation prompt (the teacher reads the
   memory first, the student only the prefix); or from ``--prompts`` (e.g. questions in
   wordings the probes do not use) with ``--config.sleep.prompts=given``. With
   ``--config.sleep.chat=True`` every prompt is a user's turn of the checkpoint's chat
   template (the memory opens the teacher's turn). Any prompt that contains a probe question is
   dropped, and the count is reported. Replay prompts come from the model itself: prefixes of
   texts it samples unconditionally (no labels), answered by the pre-sleep model.
3. Grow once to pre-allocated expert slots (exact) and seed only the NEXT FREE slot, with
   replay of the model's own samples and of every earlier sleep's prompts (kept beside the
   model); the one pipeline is ``sleep_jax.sleep`` (AdamW + warmup + clipping, as the demo).
4. Evaluate closed-book before/after and open-book (memory in context) on the probes, and
   write DIR/report.json, DIR/report.md, DIR/metrics.jsonl, checkpoints DIR/train (re-running
   resumes) and the grown checkpoint DIR/model (with DIR/model/sleep_prompts.jsonl), which a
   later ``sleep-jax sleep --checkpoint DIR/model`` sleeps on into its next free slot.

Many processes (``sleep-jax launch --nproc 2 -- sleep-jax sleep ...``, the launch/ scripts, or
the runtime flags): every process runs the same sleep over the mesh of all their devices;
process 0 alone writes the files (every process writes its shards of the checkpoints).
"""

from __future__ import annotations

import json
import sys

from sleep_jax.config import (
    RUNTIME_FLAGS,
    ConfigError,
    Flag,
    check_run_config,
    default_config_path,
    from_section,
    parse_command,
    runtime_config,
    write_run_config,
)
from sleep_jax.distill import seeding

# The prompt helpers live with the sleep pipeline (sleep_jax/sleep.py); re-exported here.
from sleep_jax.sleep import drop_probe_overlap, memory_prompts  # noqa: E402,F401

FLAGS = (Flag("checkpoint", help="checkpoint directory (sleep-jax import / train)", required=True),
         Flag("memories", help='JSONL {"id", "text"}', required=True),
         Flag("probes", help='JSONL {"memory_id", "question", "answers"}', required=True),
         Flag("workdir", help="run folder (re-running resumes)", required=True),
         Flag("prompts", help='JSONL {"memory_id", "prompt"}: seeding prompts (with '
              "--config.sleep.prompts=given; default: cut from the memories)", default=""),
         Flag("retain", help='JSONL {"question", "answers"}: general questions asked before '
              "and after, for retention", default=""),
         Flag("allow_config_change", bool, False,
              help="resume even though the saved config.json differs"), *RUNTIME_FLAGS)


def parse(argv: list[str]):
    """(config, flags, SleepConfig, SeedingConfig, ReplayConfig); (None, ...) after --help.

    Every option is checked here, before any file is read or written: typed overrides, the
    dataclasses' own value checks, and the prompt format's fields. Many processes
    (``sleep_jax.runtime``: the flags or the environment of ``sleep-jax launch`` and the
    launch/ scripts) are joined here, before the meshes touch a device.
    """
    from sleep_jax import runtime
    from sleep_jax.sleep import ReplayConfig, SleepConfig

    config, args = parse_command(argv, default=default_config_path("sleep.py"), flags=FLAGS,
                                 prog="sleep-jax sleep", doc=__doc__)
    if config is None:
        return None, {}, None, None, None
    try:
        runtime.initialize(runtime_config(args))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sleep_cfg = from_section(SleepConfig, config.sleep, "sleep")
    seeding_cfg = from_section(seeding.SeedingConfig, config.seeding, "seeding")
    replay_cfg = from_section(ReplayConfig, config.replay, "replay")
    meshes(config)  # a mesh that does not fit the devices is refused before any work
    try:
        sleep_cfg.prompt_format.format(question="q")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"sleep.prompt_format={sleep_cfg.prompt_format!r}: {e!r}; the only "
                          "field is {question}, e.g. 'question: {question} answer:'") from None
    return config, args, sleep_cfg, seeding_cfg, replay_cfg


def meshes(config):
    """(student mesh, teacher mesh or None) from config.mesh / config.teacher_mesh (""
    = the student's), both over all devices in one order (``mesh.make_mesh``)."""
    from sleep_jax.mesh import make_mesh

    out = []
    for key in ("mesh", "teacher_mesh"):
        spec = config.get(key, "")
        try:
            out.append(make_mesh(spec) if spec else None)
        except ValueError as e:
            raise ConfigError(f"config.{key}={spec!r}: {e}") from None
    return out[0] or make_mesh("fsdp=-1"), out[1]


def main(argv: list[str] | None = None) -> int:
    import logging

    from sleep_jax.data.jsonl import (
        JsonlError,
        read_memories,
        read_probes,
        read_prompts,
        read_questions,
    )

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sleep_jax").setLevel(logging.INFO)
    from sleep_jax.models.checkpoint_dir import CheckpointError, load_checkpoint

    try:
        config, a, sleep_cfg, seeding_cfg, replay_cfg = parse(
            list(sys.argv[1:] if argv is None else argv))
        if config is None:
            return 0  # --help
        mesh, teacher_mesh = meshes(config)
        check_run_config(a["workdir"], config, a["allow_config_change"])
        memories = read_memories(a["memories"])
        probes = read_probes(a["probes"], memory_ids={m.id for m in memories})
        if bool(a["prompts"]) != (sleep_cfg.prompts == "given"):
            raise ValueError(f"--prompts={a['prompts']!r} with sleep.prompts="
                             f"{sleep_cfg.prompts!r}: give a prompts file exactly when "
                             "sleep.prompts is 'given'")
        prompts = read_prompts(a["prompts"], memory_ids={m.id for m in memories}) \
            if a["prompts"] else None
        retain = read_questions(a["retain"]) if a["retain"] else ()
        # straight onto the teacher's shards: on many processes no process holds it all
        base, tok, meta = load_checkpoint(a["checkpoint"], mesh=teacher_mesh or mesh)
        if tok is None:
            raise ValueError(f"checkpoint {a['checkpoint']!r} has no tokenizer.json; sleep "
                             "needs one to read memories")
    except (ConfigError, JsonlError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"sleep-jax sleep: error: {e}", file=sys.stderr)
        return 2
    if sleep_cfg.expert and sleep_cfg.when_full != "grow":  # "grow" adds slots when full
        from sleep_jax.grow import SlotsExhausted, next_free_slot

        try:
            if base.config.expert_slots:
                next_free_slot(base)
        except SlotsExhausted as e:
            print(f"sleep-jax sleep: error: {e}", file=sys.stderr)
            return 2
    from sleep_jax.runtime import is_writer

    if is_writer():  # process 0 writes the files (sleep_checkpoint: the same)
        write_run_config(a["workdir"], config, a["allow_config_change"])
    report = run_sleep(a["checkpoint"], base, tok, meta, memories, probes, seeding_cfg,
                       workdir=a["workdir"], sleep_cfg=sleep_cfg, replay_cfg=replay_cfg,
                       mesh=mesh, teacher_mesh=teacher_mesh, prompts=prompts, retain=retain)
    if not is_writer():
        return 0
    print(json.dumps({k: report[k] for k in ("before", "after", "open_book", "splits")
                      if report.get(k)}, indent=2))
    if report.get("retention"):
        r = report["retention"]
        print(f"retention: {r['kept']} of the {r['base_right']} general questions the base "
              f"answers are still answered ({r['retention']:.3f})")
    print(f"outputs in {a['workdir']}: report.json, report.md, metrics.jsonl, model/ (the "
          f"grown checkpoint; sleep on it again with --checkpoint {a['workdir']}/model)")
    return 0


def run_sleep(checkpoint, base, tok, meta, memories, probes, seeding_cfg=None, *,
              workdir: str, sleep_cfg=None, replay_cfg=None, mesh=None,
              teacher_mesh=None, prompts=None, retain=()) -> dict:
    """The sleep behind the CLI: ``sleep_jax.sleep.sleep_checkpoint`` (see module docstring)."""
    from sleep_jax.sleep import ReplayConfig, SleepConfig, sleep_checkpoint

    return sleep_checkpoint(checkpoint, base, tok, meta, memories, probes, workdir=workdir,
                            cfg=sleep_cfg or SleepConfig(),
                            seeding_cfg=seeding_cfg or seeding.SeedingConfig(),
                            replay=replay_cfg or ReplayConfig(), mesh=mesh,
                            teacher_mesh=teacher_mesh, prompts=prompts, retain=retain)
