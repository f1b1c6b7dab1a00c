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
Presets: the default, ``quick`` (20 steps, a smoke run) and ``smollm2`` (an instruct model:
SmolLM2-135M-Instruct from ``sleep-jax import --from smollm2``; its chat template, given
question prompts, answers of up to 20 tokens scored on their first sentence, forward KL, slot
lr 1e-2, 60 steps of 4 rows; with the files of ``sleep-jax example-data``, see the README's "A
real model sleeps": with these settings it keeps 21 of 22 general answers but learns none of
the 30 facts in 60 steps; lr 5e-2 broke the model, JSD with lr 2e-2 learned nothing either).
"""

import ml_collections

from sleep_jax.config import section
from sleep_jax.distill.seeding import SeedingConfig
from sleep_jax.sleep import ReplayConfig, SleepConfig
from sleep_jax.train.optim import OptimConfig

_PRESETS = {
    "default": dict(sleep={}, seeding={}),
    "quick": dict(sleep=dict(steps=20, batch_size=8), seeding={}),
    "smollm2": dict(sleep=dict(steps=60, batch_size=4, chat=True, prompts="given",
                               prompt_format="{question}", memory_separator="\n",
                               eval_tokens=20, checkpoint_every=10,
                               optim=OptimConfig(lr=1e-2, warmup_steps=10, weight_decay=0.0)),
                    seeding=dict(max_new_tokens=12, divergence="forward_kl"),
                    replay=dict(fraction=0.25, samples=32)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "default"
    if name not in _PRESETS:
        raise ValueError(f"unknown sleep preset {name!r}; allowed: {', '.join(_PRESETS)}")
    p = _PRESETS[name]
    config = ml_collections.ConfigDict()
    config.preset = name
    config.sleep = section(SleepConfig, **p["sleep"])
    config.replay = section(ReplayConfig, **p.get("replay", {}))
    config.seeding = section(SeedingConfig, **p["seeding"])
    config.mesh = "fsdp=-1"
    config.teacher_mesh = ""
    return config
