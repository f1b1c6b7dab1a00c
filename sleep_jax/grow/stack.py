"""G_stack, the non-preserving depth baseline: stack copies of the existing layers.

Layer j' of the grown model is a copy of source layer j' mod L (for L' = 2L: the whole stack
twice), parameters, masks and optimizer moments alike (Gong et al. 2019 "stacking", and
G_stack of Du et al. 2024, arXiv 2405.15319). The grown model computes a different function
(every layer runs twice), which is what the tests use as a negative control for the preserving
operators.
"""

from __future__ import annotations

import numpy as np

from sleep_jax.grow.axismap import AxisPlan
from sleep_jax.models.config import ModelConfig


def stack_plans(src: ModelConfig, dst: ModelConfig) -> list[AxisPlan]:
    """Plan for ``layers`` L -> L' by copying layer j' mod L."""
    if dst.layers == src.layers:
        return []
    return [AxisPlan("layers", np.arange(dst.layers) % src.layers)]
