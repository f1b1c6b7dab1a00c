"""``sleep-jax plan``: compile every step for every mesh of a TPU topology, print the table.

  sleep-jax plan [--config configs/plan.py] [--config.topology=v5e:16x16]
      [--config.meshes="fsdp=-1;data=2,fsdp=-1;fsdp=-1,tensor=4"] [--config.preset=llama_8b]
      [--config.target=base|grown] [--config.steps=train,seeding,grow,decode,grpo]
      [--config.out=plan.json] [--config.measure=True (tiny preset: time on CPU devices)]

Compile-only: libtpu (the ``plan`` extra) compiles for the topology on this CPU host; nothing
runs on a TPU and nothing is allocated. Prints one line per (mesh, step) as it compiles, the
markdown table, then the JSON plan as the last line (also written atomically to ``out``).
"""

from __future__ import annotations

import json
import os
import sys

from sleep_jax.config import ConfigError, default_config_path, from_section, parse_command


def main(argv: list[str]) -> int:
    try:
        config, _ = parse_command(argv, default=default_config_path("plan.py"),
                                  prog="sleep-jax plan", doc=__doc__)
        if config is None:
            return 0  # --help
        from sleep_jax.plan.run import PlanConfig

        cfg = from_section(PlanConfig, config, "plan")
    except ConfigError as e:
        print(f"sleep-jax plan: error: {e}", file=sys.stderr)
        return 2
    # The TPU programs are compiled through libtpu's topology API; no TPU backend is needed,
    # and the CPU backend gives the devices that `measure` times on (8, as in the tests).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if cfg.measure and "xla_force_host_platform_device_count" not in os.environ.get(
            "XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8").strip()
    from sleep_jax.atomic import write_json
    from sleep_jax.plan.run import markdown, run_plan

    try:
        plan = run_plan(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError) as e:
        print(f"sleep-jax plan: error: {e}", file=sys.stderr)
        return 2
    print(markdown(plan))
    if cfg.out:
        write_json(cfg.out, plan, indent=1)
    print(json.dumps(plan, sort_keys=True))
    return 0
