"""Depth growth (``layers`` L -> L'): insert layers that start as the identity.

A pre-norm residual layer computes x + o(attn(norm(x))) then x + down(mlp(norm(x))) (+ experts).
With its residual writers zero (o = 0, down = 0, expert B = 0) it is exactly x -> x, whatever
its other weights; those start random (the source array's std) so the writers get nonzero
gradients and the layer can learn (zero-output identity init as in LEMON, Wang et al. 2023,
arXiv 2310.07999, and the identity layers of Net2DeeperNet, Chen et al. 2016). Norm gains of a
new layer start at the mean gain of the source layers; expert masks at 0. Bitwise preserving:
x + 0 = x. Old layers keep their parameters and optimizer moments; new ones start with zero
moments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sleep_jax.grow.axismap import AxisPlan
from sleep_jax.models.config import ModelConfig


def layer_map(L: int, L2: int, insert_at: Sequence[int] | None = None) -> np.ndarray:
    """[L'] source layer of each grown layer (-1 = new identity layer).

    ``insert_at``: L' - L source positions p in [0, L]; a new layer goes before source layer p
    (p = L appends). Default: one after every L/(L'-L) source layers, e.g. L=2 -> 4:
    [0, new, 1, new].
    """
    m = L2 - L
    if insert_at is None:
        insert_at = [(j + 1) * L // m for j in range(m)]
    insert_at = sorted(int(p) for p in insert_at)
    if len(insert_at) != m or any(p < 0 or p > L for p in insert_at):
        raise ValueError(f"insert_at={insert_at} must hold {m} positions (layers {L} -> {L2}) "
                         f"each in [0, {L}]")
    out = []
    for p in range(L + 1):
        out += [-1] * insert_at.count(p)
        if p < L:
            out.append(p)
    return np.array(out)


def depth_plans(src: ModelConfig, dst: ModelConfig,
                insert_at: Sequence[int] | None = None) -> list[AxisPlan]:
    """Plan for ``layers`` L -> L' with identity layers (see module doc)."""
    if dst.layers == src.layers:
        return []
    return [AxisPlan("layers", layer_map(src.layers, dst.layers, insert_at),
                     new={"producer": "zero", "consumer": "random", "gain": "mean",
                          "other": "zero"})]
