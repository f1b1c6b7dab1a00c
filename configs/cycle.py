"""Wake/sleep cycles over a memory stream: ``sleep-jax cycle --config configs/cycle.py[:quick]
--checkpoint CKPT --memories STREAM.jsonl --probes P.jsonl --workdir DIR [--texts T.jsonl]``,
or on the demo world: ``sleep-jax cycle --config configs/cycle.py:demo [--workdir DIR]``.

Sections (each the frozen dataclass beside the code that uses it):
  cycle    sleep_jax.cycle.CycleConfig: a sleep every ``sleep_every`` memories or when the
           store of ``store_size`` is full; how many general texts KL to the base uses
  sleep    sleep_jax.sleep.SleepConfig of every sleep (``when_full="grow"``: more slots when
           the pre-allocated ones run out)
  replay   sleep_jax.sleep.ReplayConfig (every earlier sleep's prompts are replayed too)
  seeding  sleep_jax.distill.seeding.SeedingConfig
  mesh     the student's mesh (default all devices)
The ``demo`` and ``demo_full`` presets instead hold ``demo`` (sleep_jax.demo.DemoConfig: the
world and the base, as ``sleep-jax demo`` trains it) and ``cycle_demo``
(sleep_jax.cycle_demo.CycleDemoConfig: the stream's length, the steps and batch of every
method's sleep per cycle, the slots, the methods); the methods' optimizers and replay are the
demo's (``sleep_jax.demo_run.method_plan``).
Presets: the default (a 200-step sleep per cycle), ``quick`` (20 steps, a smoke run),
``demo`` (10 cycles of 3 NEW memories, 60 steps per sleep: sleep beside seeding without
growth and SFT with replay; reuses the demo's base when ``sleep-jax demo`` wrote one with the
same settings, else trains it), ``demo_full`` or ``full`` (the same: as demo, plus SFT with
replay and an L2-SP pull, and the in-context-only baseline; about 21 minutes on a loaded
2-core host with the base reused: 122 s a cycle, docs/LOG.md 2026-12-01).
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
_DEMO_PRESETS = {
    "demo": {},
    "demo_full": dict(methods=("sleep", "seed_full", "sft_replay", "sft_l2_replay",
                               "in_context")),
}
_DEMO_PRESETS["full"] = _DEMO_PRESETS["demo_full"]  # every baseline: the name issue G asks for
ALL = tuple(_PRESETS) + tuple(_DEMO_PRESETS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "default"
    if name not in ALL:
        raise ValueError(f"unknown cycle preset {name!r}; allowed: {', '.join(ALL)}")
    config = ml_collections.ConfigDict()
    config.preset = name
    if name in _DEMO_PRESETS:
        from sleep_jax.cycle_demo import CycleDemoConfig
        from sleep_jax.demo import DemoConfig

        config.cycle = section(CycleConfig, sleep_every=3, store_size=3, kl_texts=200)
        # replay 0.75 (the demo's 0.5 elsewhere): chosen on validation wordings over 4 cycles
        # (docs/LOG.md 2026-12-01, fourth session); every method gets the same share
        # the cycle keeps the world and the settings its figures were measured with: the
        # demo's base of before 2026-12-02 (40 TASK entities, 300 dream items) and no per-row
        # settings (the demo's row_settings were chosen for one sleep, not for cycles), and
        # the slot rank 64 its runs got (growth ignored the setting before 2026-12-03)
        config.demo = section(DemoConfig, replay_fraction=0.75, n_task=40, dream_items=300,
                              row_settings="", expert_rank=64)
        config.cycle_demo = section(CycleDemoConfig, **_DEMO_PRESETS[name])
        config.progress_bar = True
        return config
    p = _PRESETS[name]
    config.cycle = section(CycleConfig, **p["cycle"])
    config.sleep = section(SleepConfig, **p["sleep"])
    config.replay = section(ReplayConfig)
    config.seeding = section(SeedingConfig)
    config.mesh = "fsdp=-1"
    return config
