"""Train a dream generator: ``sleep-jax dream --config configs/dream.py[:quick]
--checkpoint CKPT --tasks TASKS.jsonl --workdir DIR [--config.KEY=VALUE]``.

Sections (each the frozen dataclass beside the code that uses it):
  run    sleep_jax.dream.cli.DreamRunConfig: steps, contexts per step, growth (slots, rank),
         the generator's optimizer, the dream prompt and question formats, routing noise
         over the checkpoint's trained slots (route_noise), run-loop cadence
  dream  sleep_jax.dream.config.DreamConfig: dreams per context, selection (top-k + random),
         the inner loop (steps, lr, clipping), the reward (contrastive or binary), pg_over
  rl     sleep_jax.rl.config.RLConfig: the generator update ("grpo" or "rest_em") and sampling
         (temperature...); group_size and max_new_tokens come from the dream section
Presets: the default, and ``quick`` (3 steps on 2 contexts, short dreams: a smoke run).
"""

import ml_collections

from sleep_jax.config import section
from sleep_jax.dream.cli import DreamRunConfig
from sleep_jax.dream.config import DreamConfig
from sleep_jax.rl.config import RLConfig

_PRESETS = {
    "default": dict(run={}, dream=dict(dreams=8, keep_top=2, keep_random=1, steps=4,
                                       max_dream_tokens=32), rl={}),
    "quick": dict(run=dict(steps=3, contexts=2, checkpoint_every=2, progress_bar=False),
                  dream=dict(dreams=2, keep_top=1, keep_random=0, steps=2, max_dream_tokens=4),
                  rl={}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "default"
    if name not in _PRESETS:
        raise ValueError(f"unknown dream preset {name!r}; allowed: {', '.join(_PRESETS)}")
    p = _PRESETS[name]
    config = ml_collections.ConfigDict()
    config.preset = name
    config.run = section(DreamRunConfig, **p["run"])
    config.dream = section(DreamConfig, **p["dream"])
    config.rl = section(RLConfig, **p["rl"])
    return config
