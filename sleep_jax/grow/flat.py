"""A flat, path-keyed view of NNX states (``{"['blocks']['q']": Variable}``) and its inverse.

Growth rewrites arrays by path and logical axis names; these two functions move between the
nested ``nnx.State`` and that flat view without losing the variables' metadata.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx


def is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def flatten(tree) -> dict[str, nnx.Variable]:
    """{keystr(path): Variable} for every variable leaf of ``tree`` (an nnx.State)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]
    return {jax.tree_util.keystr(p): v for p, v in leaves if is_var(v)}


def axes_of(v: nnx.Variable) -> tuple[str, ...] | None:
    names = v.get_metadata().get("logical_axes")
    return None if names is None else tuple(names)


def rebuild(template, value_of: Callable[[str, nnx.Variable], object]):
    """``template`` with each variable's value replaced by ``value_of(path, variable)``."""
    return jax.tree_util.tree_map_with_path(
        lambda p, v: v.replace(value_of(jax.tree_util.keystr(p), v)) if is_var(v) else v,
        template, is_leaf=is_var)
