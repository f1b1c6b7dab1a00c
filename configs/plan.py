"""Mesh plans: ``sleep-jax plan --config configs/plan.py [--config.KEY=VALUE ...]``.

Every field of sleep_jax.plan.run.PlanConfig at the top level: ``topology`` (v5e:16x16 ...),
``meshes`` (``;``-separated), ``preset`` and ``grow_to`` (the grown target), ``target`` (base or
grown for the train/decode/GRPO steps), ``steps``, the shapes, numerics, ``measure`` (tiny only)
and ``out``. Preset argument: a model preset, e.g. ``configs/plan.py:llama_1b``.
"""

import ml_collections

from sleep_jax.config import section
from sleep_jax.plan.run import PlanConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return section(PlanConfig, **({"preset": arg} if arg else {}))
