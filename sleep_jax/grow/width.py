"""Width growth of the residual stream (``embed``: D -> D'), function preserving.

Replication (HyperCloning, Samragh et al. 2024, arXiv 2409.12903), D' = n D. The grown residual
stream is x' = rep(x) / n, where rep repeats each dim in place (x'[d n + i] = x[d] / n,
i < n). Any fixed order of the copies preserves the function (every operation below is
equivariant under a common permutation of ``embed``); the in-place repeat keeps each grown dim on
the shard of its source dim when ``embed`` is sharded (fsdp: shard s of D' holds the copies of
shard s of D), so replication moves no data between devices, where tiling (x'[j] = x[j mod D])
needs a collective-permute and an all-gather per array.
Derivation, layer by layer (g = RMSNorm gain, eps its epsilon):

- RMSNorm: mean_{D'}(x'^2) = mean_D(x^2) / n^2, so with eps' = eps / n^2
  x' / sqrt(mean(x'^2) + eps') = rep(x) / sqrt(mean(x^2) + eps): the normalised vector is
  rep(norm(x)) and gains are repeated unscaled, g' = rep(g).
- Readers of a norm output (q, k, v, gate, up, expert A, untied unembed) see rep(y): rows
  W'[j, d] = W[d] / n give sum_j W[d] y_d / n * n = W^T y (each copy reads the same y).
- Writers to the residual (o, down, expert B, the embedding table) must add rep(dx) / n:
  columns W'[.., j, d] = W[.., d] / n.
- Tied embedding E [V, D]: as a writer E' = rep(E) / n; as the unembedding the logits are
  rep(y) . E'^T = sum_j y . E / n = y . E^T. Both roles agree, which is what forces the 1/n
  residual scale (an untied model could use scale 1; we use 1/n for both so one rule serves).
- Symmetry breaking: the readers read identical copies, so rows W/n + d_j with
  sum_j d_j = 0 (paired +/- noise) keep the sum; the tied table also writes, so it gets none.

Gradients at the grown point (for the optimizer moments): every copy of x' receives the full
source gradient dL/dx (a perturbation rep(v)/n of x' is a perturbation v of x), so writers,
readers and the embedding table keep the source gradient repeated (factor 1), and gains get
rep(g) / n (their outputs feed readers scaled 1/n).

Zero-pad (Net2WiderNet-style padding, any D' > D): x' = [x, 0]. mean_{D'}(x'^2) = (D/D')
mean(x^2), so eps' = eps D / D' and gains g' = g sqrt(D/D') on old dims (sqrt(D/D') on new
ones: nonzero, so they can learn) make the norm output [y, 0]. New reader rows are random
(they read zeros), new writer columns are zero (the new dims stay 0 until trained). Gradients:
readers and writers keep the source gradient, gains get g / sqrt(D/D').
"""

from __future__ import annotations

import math

import numpy as np

from sleep_jax.grow.axismap import AxisPlan
from sleep_jax.models.config import ModelConfig


def width_plans(src: ModelConfig, dst: ModelConfig, mode: str = "replicate"
                ) -> tuple[list[AxisPlan], float]:
    """Plans for ``embed`` D -> D' and the grown RMSNorm epsilon.

    Args:
      src, dst: configs before and after (only ``embed`` differs for this operator).
      mode: "replicate" (D' must be a multiple of D) or "zero" (any D' > D).
    Returns:
      ([AxisPlan], eps') with eps' = eps / n^2 (replicate) or eps D / D' (zero).
    """
    D, D2 = src.embed, dst.embed
    if D2 == D:
        return [], src.norm_eps
    if mode == "replicate":
        if D2 % D:
            raise ValueError(f"width replication needs embed {D2} to be a multiple of {D}; "
                             f"use width='zero' for other sizes")
        n = D2 // D
        plan = AxisPlan("embed", np.arange(D2) // n,  # in-place repeat: shard-local (doc)
                        value={"producer": 1.0 / n, "consumer": 1.0 / n},
                        grad={"gain": 1.0 / n}, noise_roles=("consumer",))
        return [plan], src.norm_eps / n ** 2
    s = math.sqrt(D / D2)
    plan = AxisPlan("embed", list(range(D)) + [-1] * (D2 - D), value={"gain": s},
                    grad={"gain": 1.0 / s},
                    new={"producer": "zero", "consumer": "random", "gain": s})
    return [plan], src.norm_eps * D / D2
