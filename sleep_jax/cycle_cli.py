"""``sleep-jax cycle``: wake/sleep cycles over your memory stream (``sleep_jax.cycle``).

  sleep-jax cycle --checkpoint CKPT --memories STREAM.jsonl --probes P.jsonl --workdir DIR
      [--texts T.jsonl] [--config configs/cycle.py[:quick]] [--config.cycle.sleep_every=4]

The memories file is the stream in arrival order ({"id", "text"} per line); probes
({"memory_id", "question", "answers"}) are the held-out questions every set is measured on
after every cycle; texts ({"text"}) are general text for KL to the base. Writes DIR/cycle_KKK/
(each sleep; DIR/cycle_KKK/model is checkpoint version K), DIR/events.jsonl and the cycle
report (report.json, report.md, heatmap and curves PNGs). Re-running the same command resumes.
"""

from __future__ import annotations

import json
import sys

from sleep_jax.config import (
    ConfigError,
    Flag,
    check_run_config,
    default_config_path,
    from_section,
    parse_command,
    write_run_config,
)

FLAGS = (Flag("checkpoint", help="checkpoint directory (before any sleep)", required=True),
         Flag("memories", help='JSONL stream {"id", "text"} in arrival order', required=True),
         Flag("probes", help='JSONL {"memory_id", "question", "answers"}', required=True),
         Flag("workdir", help="run folder (re-running resumes)", required=True),
         Flag("texts", default="", help='JSONL {"text"}: general text for KL to the base'),
         Flag("allow_config_change", bool, False,
              help="resume even though the saved config.json differs"))


def main(argv: list[str] | None = None) -> int:
    from sleep_jax.cycle import CycleConfig, run_cycle
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
    write_run_config(a["workdir"], config, a["allow_config_change"])
    out = run_cycle(a["checkpoint"], memories, probes, workdir=a["workdir"], cfg=cycle_cfg,
                    sleep_cfg=sleep_cfg, seeding_cfg=seeding_cfg, replay=replay_cfg,
                    texts=texts, mesh=mesh)
    print(json.dumps(out["report"]["methods"]["sleep"]["summary"], indent=2))
    print(f"outputs in {a['workdir']}: events.jsonl, report.json, report.md, PNGs, "
          f"cycle_KKK/model (checkpoint version K)")
    return 0
