"""A sleep on your checkpoint: ``sleep-jax sleep --config configs/sleep.py[:quick]
--checkpoint CKPT --memories M.jsonl --probes P.jsonl --workdir DIR [--config.KEY=VALUE]``.

Sections (each the frozen dataclass beside the code that uses it):
  sleep    sleep_jax.sleep.SleepConfig: student (next free expert slot of ``slots`` pre-allocated
           ones, rank, router, or a full fine-tune), optimizer (``sleep.optim``: AdamW + warmup
           + cosine + clipping, the demo's settings), prompt source, budget, checkpoint cadence;
           ``sleep.rehearse`` (dream.rehearse.RehearseConfig): dreaming after seeding, on when
           ``--config.sleep.rehearse.generator=DIR`` names a ``sleep-jax dream`` model/ folder
  replay   sleep_jax.sleep.ReplayConfig: share of each batch and source of the replay rows
  seeding  sleep_jax.distill.seeding.SeedingConfig: divergence, lambda, alpha, completion length
           M, Learning-to-Imitate options (its GRPO settings derive from these)
  mesh     the student's mesh (e.g. "fsdp=-1", "data=2,fsdp=-1", "fsdp=2,tensor=4"; default
           all devices): the model is grown straight onto it
  teacher_mesh  the teacher's layout over the same devices ("" = the student's mesh)
Many processes: every process runs the same command (``sleep-jax launch --nproc N -- sleep-jax
sleep ...`` or a launch/ script); process 0 writes the files.
Presets: the default, and ``quick`` (20 steps, a smoke run).
"""

import ml_collections

from sleep_jax.config import section
from sleep_jax.distill.seeding import SeedingConfig
from sleep_jax.sleep import ReplayConfig, SleepConfig

_PRESETS = {
    "default": dict(sleep={}, seeding={}),
    "quick": dict(sleep=dict(steps=20, batch_size=8), seeding={}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "default"
    if name not in _PRESETS:
        raise ValueError(f"unknown sleep preset {name!r}; allowed: {', '.join(_PRESETS)}")
    p = _PRESETS[name]
    config = ml_collections.ConfigDict()
    config.preset = name
    config.sleep = section(SleepConfig, **p["sleep"])
    config.replay = section(ReplayConfig)
    config.seeding = section(SeedingConfig, **p["seeding"])
    config.mesh = "fsdp=-1"
    config.teacher_mesh = ""
    return config
