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


class Normals:
    """Standard normal draws for one growth, all sliced from a single ``jax.random.normal``.

    Each separate draw compiles into its own threefry + erf_inv fusions (about 0.6 s of XLA CPU
    compile per draw, tens of draws per growth), so the growth asks this pool instead. With
    ``sizes`` None the pool records the sizes asked for and draws each one separately (use it
    in a shapes-only pass such as ``jax.eval_shape``); with the recorded ``sizes`` it draws
    their sum once and hands out consecutive slices, in the same order.
    """

    def __init__(self, rng: jax.Array, sizes: tuple[int, ...] | None = None):
        self.rng, self.sizes = rng, sizes
        self.asked: list[int] = []
        self._flat, self._offset = None, 0

    def normal(self, shape: tuple[int, ...]) -> jax.Array:
        """[shape] float32 standard normals."""
        n = int(np.prod(shape, dtype=np.int64))
        self.asked.append(n)
        if self.sizes is None:
            return jax.random.normal(jax.random.fold_in(self.rng, len(self.asked)), shape,
                                     jnp.float32)
        i = len(self.asked) - 1
        if i >= len(self.sizes) or self.sizes[i] != n:
            raise AssertionError(f"Normals: draw {i} asks {n} values but the recording pass "
                                 f"asked {self.sizes[i:i + 1]} (the growth traced differently)")
        if self._flat is None:
            self._flat = jax.random.normal(self.rng, (sum(self.sizes),), jnp.float32)
        out = jax.lax.slice_in_dim(self._flat, self._offset, self._offset + n)
        self._offset += n
        return out.reshape(shape)


def _along(vec, ax: int, ndim: int):
    """Reshape a [n] vector to broadcast along axis ``ax`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[ax] = -1
    return jnp.reshape(jnp.asarray(vec), shape)


def _tile(x: jax.Array, n2: int, ax: int) -> jax.Array:
    """[.., n2, ..]: x repeated along ``ax`` (index j holds x[.., j mod n, ..])."""
    n = x.shape[ax]
    reps = -(-n2 // n)
    shape = (*x.shape[:ax], reps, *x.shape[ax:])
    y = jnp.broadcast_to(jnp.expand_dims(x, ax), shape)
    y = y.reshape(*x.shape[:ax], reps * n, *x.shape[ax + 1:])
    return y if reps * n == n2 else jax.lax.slice_in_dim(y, 0, n2, axis=ax)


def _take(x: jax.Array, plan: AxisPlan, ax: int) -> jax.Array:
    """x[.., src[j], ..] along ``ax`` (zeros at new entries' places are overwritten later).

    Tiling is a broadcast + reshape and appending a pad: data movement only (bit-exact), and
    cheap for XLA's SPMD partitioner (a concatenate of copies along a sharded axis compiled to
    ~9x more fusions).
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
        return _tile(x, n2, ax)
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


def _copy_mean(d0: jax.Array, src: np.ndarray, n: int) -> jax.Array:
    """[n', ...] mean of ``d0`` [n', ...] over the copies of each entry's source index.

    Static maps only (no scatter / gather, which compile slowly): the tiling pattern
    src = arange(n') mod n with n | n' is a reshape and a mean; any other map is one product
    with the [n', n'] averaging matrix built in numpy (new entries, src -1, form one group).
    """
    n2 = len(src)
    if n2 % n == 0 and np.array_equal(src, np.arange(n2) % n):
        r = n2 // n
        return _tile(jnp.mean(d0.reshape(r, n, *d0.shape[1:]), axis=0), n2, 0)
    seg = np.where(src >= 0, src, n)
    avg = (seg[:, None] == seg[None, :]).astype(np.float32)
    avg /= avg.sum(axis=1, keepdims=True)
    return jnp.tensordot(jnp.asarray(avg), d0, axes=1, precision=jax.lax.Precision.HIGHEST)


def resize_value(x: jax.Array, axes: tuple[str, ...], plan: AxisPlan, *, is_param: bool,
                 normals: Normals, noise: float, init_std: float) -> jax.Array:
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
    z = normals.normal(y.shape) if how == "random" or noisy else None
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
        d0 = jnp.moveaxis(d, ax, 0)
        d0 = d0 - _copy_mean(d0, plan.src, x.shape[ax])
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
