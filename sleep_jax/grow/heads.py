"""Attention-head growth (``heads`` N -> N', ``kv_heads`` K -> K', head_dim fixed).

Grouped-query attention: query head i = k G + g reads kv head k = i // G (G = N / K).

Split (Net2Net function-preserving split, Chen et al. 2016, arXiv 1511.05641, applied to
heads): kv head k' copies kv head k' mod K (K' = m K), and grown query head (k', g') copies
source head (k' mod K, g' mod G) (G' = r G), so every copy sits inside its own (copied) group
and attends exactly as its source. The outgoing rows of o are divided by the copies' count
c = m r: o'[(k', g')] = o[(k, g)] / c, hence sum over copies = source output. Noise: the copies
of one head output identical vectors, so their o rows get zero-sum noise.
Gradients (moments): a copied head's q (and k, v of a copied kv head) receives the source
gradient / c (resp. / m: each kv copy serves G' query heads each weighted 1/(m r), r of each);
o rows keep the source gradient.

Zero (new units, as in the zero-init variants of LEMON, Wang et al. 2023, arXiv 2310.07999):
old heads keep their place (k < K, g < G); new query heads get random q, zero o rows; new kv
heads random k, v. Exact because a new head's output is multiplied by zero rows of o; the o rows
get nonzero gradients so the heads can learn.
"""

from __future__ import annotations

import numpy as np

from sleep_jax.grow.axismap import AxisPlan
from sleep_jax.models.config import ModelConfig


def head_maps(src: ModelConfig, dst: ModelConfig, mode: str = "split"
              ) -> tuple[np.ndarray, np.ndarray]:
    """(kv_src [K'], q_src [N']): the source kv / query head each grown head copies (-1 new)."""
    K, G, K2, G2 = src.kv_heads, src.groups, dst.kv_heads, dst.groups
    if K2 < K or G2 < G:
        raise ValueError(f"heads {src.heads}/{src.kv_heads} -> {dst.heads}/{dst.kv_heads}: "
                         f"kv heads ({K} -> {K2}) and query heads per kv head ({G} -> {G2}) "
                         f"may only grow")
    if mode == "split":
        if K2 % K or G2 % G:
            raise ValueError(f"head split needs kv_heads {K2} to be a multiple of {K} and "
                             f"heads per group {G2} a multiple of {G}; use heads='zero' for "
                             f"other sizes")
        kv = np.arange(K2) % K
        q = np.array([kv[k2] * G + g2 % G for k2 in range(K2) for g2 in range(G2)])
        return kv, q
    kv = np.array([k if k < K else -1 for k in range(K2)])
    q = np.array([k2 * G + g2 if (k2 < K and g2 < G) else -1
                  for k2 in range(K2) for g2 in range(G2)])
    return kv, q


def head_plans(src: ModelConfig, dst: ModelConfig, mode: str = "split") -> list[AxisPlan]:
    """Plans for ``kv_heads`` and ``heads`` (see module doc for the equations)."""
    if (src.heads, src.kv_heads) == (dst.heads, dst.kv_heads):
        return []
    kv, q = head_maps(src, dst, mode)
    plans = []
    if len(kv) != src.kv_heads:
        kvp = AxisPlan("kv_heads", kv, new={"producer": "random"})
        kvp.grad = {"producer": 1.0 / kvp.counts()}
        plans.append(kvp)
    qp = AxisPlan("heads", q, new={"producer": "random", "consumer": "zero"},
                  noise_roles=("consumer",))
    c = qp.counts()
    qp.value, qp.grad = {"consumer": 1.0 / c}, {"producer": 1.0 / c}
    plans.append(qp)
    return plans
