"""FFN width growth (``mlp`` F -> F'), function preserving.

Split (Net2WiderNet, Chen et al. 2016, arXiv 1511.05641): grown unit f' copies unit
s(f') = f' mod F (its gate and up columns), and the outgoing rows of down are divided by the
number of copies c(f) of its source: down'[f'] = down[s(f')] / c(s(f')). The SwiGLU unit
silu(h.gate_f) (h.up_f) is identical for every copy, so sum_{copies} down[f] / c * unit = the
source term. F' need not be a multiple of F (per-unit counts). Noise: copies' down rows get
zero-sum noise (they read identical units), so the clones can diverge when trained.
Gradients (moments): a copy's gate/up columns receive the source gradient / c (the unit's
output weight is divided by c); down rows keep the source gradient.

Zero (zero-init new units, LEMON-style): new units get random gate/up columns and zero down
rows; exact, and the down rows get nonzero gradients (silu(g) u != 0), so the units learn.
"""

from __future__ import annotations

import numpy as np

from sleep_jax.grow.axismap import AxisPlan
from sleep_jax.models.config import ModelConfig


def ffn_plans(src: ModelConfig, dst: ModelConfig, mode: str = "split") -> list[AxisPlan]:
    """Plans for ``mlp`` F -> F' (see module doc for the equations)."""
    F, F2 = src.mlp, dst.mlp
    if F2 == F:
        return []
    if mode == "split":
        plan = AxisPlan("mlp", np.arange(F2) % F, noise_roles=("consumer",))
        c = plan.counts()
        plan.value, plan.grad = {"consumer": 1.0 / c}, {"producer": 1.0 / c}
        return [plan]
    return [AxisPlan("mlp", list(range(F)) + [-1] * (F2 - F),
                     new={"producer": "random", "consumer": "zero"})]
