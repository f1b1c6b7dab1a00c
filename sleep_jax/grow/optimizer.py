"""Optimizer state under growth: moments follow the operator's gradient rule.

At a function-preserving growth point the grown model's gradient is a linear image of the
source gradient: each copied entry's gradient is the source entry's times a factor set by the
operator (e.g. a Net2Net split: the divided outgoing weights keep the source gradient, the
copied incoming weights get gradient / c). So Adam's first moment (an average of gradients)
maps with that factor and the second moment (an average of squared gradients) with its square;
new entries start at zero (as they would when only new parameters are trained with a mask);
scalars such as Adam's step count are kept. Any optimizer leaf that is a tree shaped like the
parameters is treated as a first moment unless its field is named ``nu`` (optax's second
moment).
"""

from __future__ import annotations

import jax

from sleep_jax.grow.flat import flatten, rebuild


def _params_like(params):
    pdef = jax.tree.structure(params)
    return lambda x: jax.tree.structure(x) == pdef


def is_second_moment(path) -> bool:
    """True for optax's second-moment field (``nu``) anywhere on the path."""
    return any(getattr(k, "name", None) == "nu" for k in path)


def collect_moments(opt_state, params) -> dict[str, tuple[bool, dict]]:
    """{keystr(opt path): (is_second, {param path: array})} for each params-like subtree."""
    out: dict[str, tuple[bool, dict]] = {}
    if opt_state is None:
        return out
    like = _params_like(params)

    def visit(path, sub):
        if like(sub):
            flat = {p: v[...] for p, v in flatten(sub).items()}
            out[jax.tree_util.keystr(path)] = (is_second_moment(path), flat)
        return sub

    jax.tree_util.tree_map_with_path(visit, opt_state, is_leaf=like)
    return out


def rebuild_opt_state(opt_state, params, grown: dict[str, tuple[bool, dict]], template):
    """``opt_state`` with each params-like subtree replaced by ``template`` (the grown params'
    structure) holding the grown moments from ``grown``."""
    if opt_state is None:
        return None
    like = _params_like(params)

    def visit(path, sub):
        if like(sub):
            moments = grown[jax.tree_util.keystr(path)][1]
            return rebuild(template, lambda p, v: moments[p])
        return sub

    return jax.tree_util.tree_map_with_path(visit, opt_state, is_leaf=like)

