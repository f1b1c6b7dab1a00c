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
question prompts, answers of up to 20 tokens scored on their first sentence, forward KL on
completions the teacher writes once (lam 0, a teacher cache of 2 per row: a step is one student
forward/backward), slot lr 1e-2, 240 steps of 4 rows, half of them replay; with the files of
``sleep-jax example-data``, see the README's "A real model sleeps": these settings learn 0.20
of the val probes (open book 0.83) and keep 20 of the 22 general answers the base gets right;
more steps or a higher lr learned more and forgot more, docs/LOG.md seventh session).
"""

import ml_collections

from sleep_jax.config import section
from sleep_jax.distill.seeding import SeedingConfig
from sleep_jax.sleep import ReplayConfig, SleepConfig
from sleep_jax.train.optim import OptimConfig

_PRESETS = {
    "default": dict(sleep={}, seeding={}),
    "quick": dict(sleep=dict(steps=20, batch_size=8), seeding={}),
    "smollm2": dict(sleep=dict(steps=240, batch_size=4, chat=True, prompts="given",
                               prompt_format="{question}", memory_separator="\n",
                               eval_tokens=20, checkpoint_every=60,
                               optim=OptimConfig(lr=1e-2, warmup_steps=10, weight_decay=0.0)),
                    seeding=dict(max_new_tokens=12, divergence="forward_kl", lam=0.0,
                                 teacher_samples=2),
                    replay=dict(fraction=0.5, samples=32)),
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
