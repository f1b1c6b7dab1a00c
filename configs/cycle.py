"""Wake/sleep cycles over a memory stream: ``sleep-jax cycle --config configs/cycle.py[:quick]
--checkpoint CKPT --memories STREAM.jsonl --probes P.jsonl --workdir DIR [--texts T.jsonl]``.

Sections (each the frozen dataclass beside the code that uses it):
  cycle    sleep_jax.cycle.CycleConfig: a sleep every ``sleep_every`` memories or when the
           store of ``store_size`` is full; how many general texts KL to the base uses
  sleep    sleep_jax.sleep.SleepConfig of every sleep (``when_full="grow"``: more slots when
           the pre-allocated ones run out)
  replay   sleep_jax.sleep.ReplayConfig (every earlier sleep's prompts are replayed too)
  seeding  sleep_jax.distill.seeding.SeedingConfig
  mesh     the student's mesh (default all devices)
Presets: the default (a 200-step sleep per cycle), and ``quick`` (20 steps, a smoke run).
"""

import ml_collections

from sleep_jax.config import section
from sleep_jax.cycle import CycleConfig
from sleep_jax.distill.seeding import SeedingConfig
from sleep_jax.sleep import ReplayConfig, SleepConfig

_PRESETS = {
    "default": dict(cycle={}, sleep=dict(when_full="grow")),
    "quick": dict(cycle={}, sleep=dict(when_full="grow", steps=20, batch_size=8)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "default"
    if name not in _PRESETS:
        raise ValueError(f"unknown cycle preset {name!r}; allowed: {', '.join(_PRESETS)}")
    p = _PRESETS[name]
    config = ml_collections.ConfigDict()
    config.preset = name
    config.cycle = section(CycleConfig, **p["cycle"])
    config.sleep = section(SleepConfig, **p["sleep"])
    config.replay = section(ReplayConfig)
    config.seeding = section(SeedingConfig)
    config.mesh = "fsdp=-1"
    return config
