"""``sleep-jax cycle``: wake/sleep cycles over your memory stream (``sleep_jax.cycle``).

  sleep-jax cycle --checkpoint CKPT --memories STREAM.jsonl --probes P.jsonl --workdir DIR
      [--texts T.jsonl] [--config configs/cycle.py[:quick]] [--config.cycle.sleep_every=4]
  sleep-jax cycle --config configs/cycle.py:demo [--workdir runs/cycle]   (the demo world:
      sleep beside its baselines, ``sleep_jax.cycle_demo``)

The memories file is the stream in arrival order ({"id", "text"} per line); probes
({"memory_id", "question", "answers"}) are the held-out questions every set is measured on
after every cycle; texts ({"text"}) are general text for KL to the base. Writes DIR/cycle_KKK/
(each sleep; DIR/cycle_KKK/model is checkpoint version K), DIR/events.jsonl and the cycle
report (report.json, report.md, heatmap and curves PNGs). Re-running the same command resumes.
Runs on many processes like ``sleep-jax sleep`` (``sleep-jax launch --nproc N -- sleep-jax
cycle ...``, the launch/ scripts or the runtime flags; the demo presets too, on the mesh of
``demo.mesh``): every checkpoint is loaded onto the mesh's shards, process 0 writes the event
log and the report.
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

FLAGS = (Flag("checkpoint", default="", help="checkpoint directory (before any sleep)"),
         Flag("memories", default="", help='JSONL stream {"id", "text"} in arrival order'),
         Flag("probes", default="", help='JSONL {"memory_id", "question", "answers"}'),
         Flag("workdir", default="", help="run folder (re-running resumes; the demo presets: "
              "default runs/cycle)"),
         Flag("texts", default="", help='JSONL {"text"}: general text for KL to the base'),
         Flag("allow_config_change", bool, False,
              help="resume even though the saved config.json differs"), *RUNTIME_FLAGS)


def main(argv: list[str] | None = None) -> int:
    from sleep_jax.cycle import CycleConfig, CycleInputs, CycleMethod, run_cycle
    from sleep_jax.data.jsonl import JsonlError, read_memories, read_probes, read_texts
    from sleep_jax.distill.cli import meshes
    from sleep_jax.distill.seeding import SeedingConfig
    from sleep_jax.sleep import ReplayConfig, SleepConfig

    try:
        config, a = parse_command(list(sys.argv[1:] if argv is None else argv),
                                  default=default_config_path("cycle.py"), flags=FLAGS,
                                  prog="sleep-jax cycle", doc=__doc__)
        if config is None:
            return 0  # --help
        if "cycle_demo" in config:
            return _demo(config, a)
        from sleep_jax import runtime

        try:  # many processes (sleep-jax launch, launch/ scripts): before any device use
            runtime.initialize(runtime_config(a))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        missing = [f"--{k}" for k in ("checkpoint", "memories", "probes", "workdir") if not a[k]]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (or use a demo preset: "
                              "--config configs/cycle.py:demo)")
        cycle_cfg = from_section(CycleConfig, config.cycle, "cycle")
        sleep_cfg = from_section(SleepConfig, config.sleep, "sleep")
        seeding_cfg = from_section(SeedingConfig, config.seeding, "seeding")
        replay_cfg = from_section(ReplayConfig, config.replay, "replay")
        if not sleep_cfg.expert:
            raise ConfigError("sleep.expert=False: a cycle seeds each sleep into a new slot")
        mesh, _ = meshes(config)
        check_run_config(a["workdir"], config, a["allow_config_change"])
        memories = read_memories(a["memories"])
        probes = read_probes(a["probes"], memory_ids={m.id for m in memories})
        texts = [t.text for t in read_texts(a["texts"])] if a["texts"] else []
    except (ConfigError, JsonlError, FileNotFoundError, ValueError) as e:
        print(f"sleep-jax cycle: error: {e}", file=sys.stderr)
        return 2
    if runtime.is_writer():
        write_run_config(a["workdir"], config, a["allow_config_change"])
    out = run_cycle(a["checkpoint"], memories, probes, workdir=a["workdir"], cfg=cycle_cfg,
                    method=CycleMethod("sleep", sleep_cfg, seeding_cfg, replay_cfg),
                    inputs=CycleInputs(texts=texts), mesh=mesh)
    if not runtime.is_writer():
        return 0
    print(json.dumps(out["report"]["methods"]["sleep"]["summary"], indent=2))
    print(f"outputs in {a['workdir']}: events.jsonl, report.json, report.md, PNGs, "
          f"cycle_KKK/model (checkpoint version K)")
    return 0


def _demo(config, a) -> int:
    """``--config configs/cycle.py:demo``: the demo world's stream, every method."""
    import logging

    from sleep_jax import cycle_demo, runtime
    from sleep_jax.cycle import CycleConfig
    from sleep_jax.demo import DemoConfig, _setup_logging

    given = [f"--{k}" for k in ("checkpoint", "memories", "probes", "texts") if a[k]]
    workdir = a["workdir"] or "runs/cycle"
    try:
        try:  # many processes: before any device use
            runtime.initialize(runtime_config(a))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if given:
            raise ConfigError(f"{', '.join(given)}: the demo presets make their own stream "
                              "and base (see configs/cycle.py)")
        from_section(DemoConfig, config.demo, "demo")
        cd = from_section(cycle_demo.CycleDemoConfig, config.cycle_demo, "cycle_demo")
        cyc = from_section(CycleConfig, config.cycle, "cycle")
        if cd.memories > config.demo.n_new:
            raise ConfigError(f"cycle_demo.memories={cd.memories} > demo.n_new="
                              f"{config.demo.n_new}")
        check_run_config(workdir, config, a["allow_config_change"])
        from sleep_jax.demo_run import demo_mesh

        demo_mesh(from_section(DemoConfig, config.demo, "demo"))  # a bad mesh fails here
    except (ConfigError, ValueError) as e:
        print(f"sleep-jax cycle: error: {e}", file=sys.stderr)
        return 2
    _setup_logging()
    logging.getLogger("sleep_jax.cycle").info(
        "cycle demo: %d memories, a sleep every %d, %d steps per sleep, methods %s",
        cd.memories, cyc.period, cd.steps, ", ".join(cd.methods))
    if runtime.is_writer():
        write_run_config(workdir, config, a["allow_config_change"])
    out = cycle_demo.run(config, workdir)
    if not runtime.is_writer():
        return 0
    for name, e in out["report"]["methods"].items():
        print(name, json.dumps(e["summary"]))
    print(f"wall {out['wall_s']:.0f} s (base training {out['base_train_s']:.0f} s); outputs in "
          f"{workdir}: report.md, report.json, PNGs, <method>/events.jsonl")
    return 0
