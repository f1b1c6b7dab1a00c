"""The one primitive under every growth operator: resize arrays along a named logical axis.

An ``AxisPlan`` says, for each index of the grown axis, which source index it copies (-1: a new
entry), how copied values are scaled, how gradients (first moments) and squared gradients
(second moments) of copied entries are scaled, and how new entries start. The scale depends on
the *role* the array plays for that axis, read from its logical axis names alone:

- a *producer* computes the axis (the axis is on the output side: ``q`` [embed, heads, head_dim]
  produces ``heads``; for ``embed`` the producers are the residual writers ``o``, ``down``,
  ``expert_b`` and the embedding table, whose ``embed`` axis comes last);
- a *consumer* reads it (input side: ``o`` reads ``heads``, ``down`` reads ``mlp``; for ``embed``
  the readers ``q``, ``k``, ``v``, ``gate``, ``up``, ``expert_a``, ``unembed``);
- a *gain* has the axis as its only feature axis (RMSNorm weights);
- *other*: non-trainable state (e.g. ``SlotMask``) or an array with no ``embed`` axis.

For the structural axes ``layers`` and ``expert`` the role is the array's role for ``embed``
(writers of a new layer or slot start at zero so it adds nothing; readers start random).
Convention assumed of a model: weights are stored as (structural..., input..., output...) and
every weight touches ``embed`` on one side, as in ``sleep_jax.models.llama``.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

STRUCTURAL = ("layers", "expert")
ROLES = ("producer", "consumer", "gain", "other")


def embed_role(axes: tuple[str, ...], is_param: bool = True) -> str:
    """Role of an array for the residual axis ``embed``: writer=producer, reader=consumer."""
    feat = [a for a in axes if a not in STRUCTURAL]
    if not is_param or "embed" not in feat:
        return "other"
    if len(feat) == 1:
        return "gain"
    return "producer" if feat[-1] == "embed" else "consumer"


def axis_role(axes: tuple[str, ...], axis: str, is_param: bool = True) -> str:
    """Role of an array (by its logical ``axes``) for the grown ``axis`` (see module doc)."""
    if axis in STRUCTURAL or axis == "embed":
        return embed_role(axes, is_param)
    feat = [a for a in axes if a not in STRUCTURAL]
    if not is_param or "embed" not in feat:
        return "other"
    return "producer" if feat.index("embed") < feat.index(axis) else "consumer"


@dataclasses.dataclass
class AxisPlan:
    """How one logical axis grows.

    Attributes:
      axis: logical axis name.
      src: [n'] int, the source index each grown index copies; -1 for a new entry.
      value: role -> [n'] (or scalar) scale of copied values (default 1).
      grad: role -> [n'] (or scalar) scale of copied gradients / first moments; second
        moments get its square (default 1).
      new: role -> how new entries start: "zero", "random" (normal, the source array's std),
        "mean" (mean over the axis) or a float fill (default "zero").
      noise_roles: roles whose copies get zero-sum noise (they read identical copies).
    """

    axis: str
    src: np.ndarray
    value: dict = dataclasses.field(default_factory=dict)
    grad: dict = dataclasses.field(default_factory=dict)
    new: dict = dataclasses.field(default_factory=dict)
    noise_roles: tuple[str, ...] = ()

    def __post_init__(self):
        self.src = np.asarray(self.src, np.int64)

    @property
    def size(self) -> int:
        return len(self.src)

    @property
    def is_new(self) -> np.ndarray:
        return self.src < 0

    def counts(self) -> np.ndarray:
        """[n'] copies of each entry's source index (1 for new entries)."""
        c = np.ones(self.size)
        for j, s in enumerate(self.src):
            if s >= 0:
                c[j] = np.sum(self.src == s)
        return c

    def first(self) -> np.ndarray:
        """[n'] True where an entry is the first copy of its source index."""
        seen, out = set(), np.zeros(self.size, bool)
        for j, s in enumerate(self.src):
            if s >= 0 and s not in seen:
                seen.add(s)
                out[j] = True
        return out

    def marks(self) -> bool:
        """Whether any grown entry is new or a second copy (i.e. enters the trainable mask)."""
        return bool(np.any(~self.first()))


def key_for(rng: jax.Array, *names: str) -> jax.Array:
    """A key folded with a stable hash of ``names`` (Python's str hash is salted per process)."""
    return jax.random.fold_in(rng, zlib.crc32("|".join(names).encode()) & 0x7FFFFFFF)


def _along(vec, ax: int, ndim: int):
    """Reshape a [n] vector to broadcast along axis ``ax`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[ax] = -1
    return jnp.reshape(jnp.asarray(vec), shape)


def _take(x: jax.Array, plan: AxisPlan, ax: int) -> jax.Array:
    """x[.., src[j], ..] along ``ax`` (zeros at new entries' places are overwritten later).

    Tiling and appending are written as concatenate / pad, which XLA partitions without the
    all-gather a general gather along a sharded axis can need.
    """
    n, n2 = x.shape[ax], plan.size
    shape = list(x.shape)
    shape[ax] = n2
    if n == 0:  # the variable did not exist in the source (e.g. expert slots 0 -> E)
        return jnp.zeros(shape, x.dtype)
    src = plan.src
    if np.array_equal(src, np.arange(n2)):
        return x
    if n2 > n and np.array_equal(src[:n], np.arange(n)) and np.all(src[n:] < 0):
        return jnp.pad(x, [(0, n2 - n if a == ax else 0) for a in range(x.ndim)])
    if np.array_equal(src, np.arange(n2) % n):
        reps, rest = divmod(n2, n)
        parts = [x] * reps + ([jax.lax.slice_in_dim(x, 0, rest, axis=ax)] if rest else [])
        return jnp.concatenate(parts, axis=ax)
    return jnp.take(x, jnp.asarray(np.maximum(src, 0), jnp.int32), axis=ax)


def _scale(y: jax.Array, s, ax: int) -> jax.Array:
    if s is None:
        return y
    s = np.asarray(s, np.float64)
    if np.all(s == 1.0):  # exact: no multiply at all (bitwise-preserving operators)
        return y
    if s.ndim == 0:
        return y * jnp.asarray(s, y.dtype)
    return y * _along(s.astype(np.float32), ax, y.ndim).astype(y.dtype)


def _std(x: jax.Array, fallback: float) -> jax.Array:
    if x.size == 0:
        return jnp.asarray(fallback, jnp.float32)
    s = jnp.std(x.astype(jnp.float32))
    return jnp.where(s > 0, s, fallback)


def resize_value(x: jax.Array, axes: tuple[str, ...], plan: AxisPlan, *, is_param: bool,
                 rng: jax.Array, noise: float, init_std: float) -> jax.Array:
    """Grow a parameter (or state) array along ``plan.axis``.

    y[.., j, ..] = value_scale[j] * x[.., src[j], ..] for copies; new entries by ``plan.new``;
    plus, for noise roles, d_j - mean_{j' : src[j'] = src[j]} d_j' (sums to zero over the copies
    of one source entry, so copies that read identical inputs keep their sum).
    """
    ax = axes.index(plan.axis)
    role = axis_role(axes, plan.axis, is_param)
    y = _scale(_take(x, plan, ax), plan.value.get(role), ax)
    how = plan.new.get(role, "zero") if plan.is_new.any() else None
    counts = plan.counts()
    noisy = noise > 0 and role in plan.noise_roles and bool(np.any(counts > 1))
    # one draw serves both: new entries and noisy copies are disjoint (fewer RNG ops to compile)
    z = (jax.random.normal(rng, y.shape, jnp.float32) if how == "random" or noisy else None)
    if how is not None:
        if how == "zero":
            fill = jnp.zeros((), y.dtype)
        elif how == "random":
            fill = (z * _std(x, init_std)).astype(y.dtype)
        elif how == "mean":
            fill = (jnp.mean(x, axis=ax, keepdims=True) if x.shape[ax]
                    else jnp.ones((), y.dtype)).astype(y.dtype)
        else:
            fill = jnp.asarray(float(how), y.dtype)
        y = jnp.where(_along(plan.is_new, ax, y.ndim), fill, y)
    if noisy:
        d = z * (noise * _std(x, init_std))
        seg = np.where(plan.src >= 0, plan.src, x.shape[ax])
        d0 = jnp.moveaxis(d, ax, 0)
        sums = jax.ops.segment_sum(d0, jnp.asarray(seg, jnp.int32),
                                   num_segments=x.shape[ax] + 1)
        n_src = np.bincount(seg, minlength=x.shape[ax] + 1).astype(np.float32)
        mean = sums / _along(np.maximum(n_src, 1), 0, d0.ndim)
        d0 = d0 - jnp.take(mean, jnp.asarray(seg, jnp.int32), axis=0)
        d0 = d0 * _along((counts > 1).astype(np.float32), 0, d0.ndim)
        y = y + jnp.moveaxis(d0, 0, ax).astype(y.dtype)
    return y


def resize_moment(m: jax.Array, axes: tuple[str, ...], plan: AxisPlan, *, second: bool
                  ) -> jax.Array:
    """Grow an optimizer moment shaped like its parameter: copies scaled by the gradient rule
    (squared for second moments), new entries zero."""
    ax = axes.index(plan.axis)
    g = plan.grad.get(axis_role(axes, plan.axis, True))
    if g is not None and second:
        g = np.square(np.asarray(g, np.float64))
    y = _scale(_take(m, plan, ax), g, ax)
    if plan.is_new.any():
        y = jnp.where(_along(plan.is_new, ax, y.ndim), jnp.zeros((), y.dtype), y)
    return y


def resize_mask(mask: jax.Array | None, shape: tuple[int, ...], axes: tuple[str, ...],
                plan: AxisPlan) -> jax.Array | None:
    """Grow a trainable mask: copies keep their flag; new entries and second copies are True.

    ``mask`` None means all False (kept None while nothing is marked, so untouched arrays
    cost no mask memory). ``shape`` is the grown array's shape.
    """
    if mask is None and not plan.marks():
        return None
    ax = axes.index(plan.axis)
    marked = _along(~plan.first(), ax, len(shape))
    if mask is None:
        return jnp.broadcast_to(marked, shape)
    return _take(mask, plan, ax) | marked
