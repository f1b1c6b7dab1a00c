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

from sleep_jax.grow.noise import Normals

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
      new: role -> how new entries start: "zero", "random" (near-normal draws of
        ``noise.Normals`` times the source array's std),
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


def _tile(x: jax.Array, n2: int, ax: int) -> jax.Array:
    """[.., n2, ..]: x repeated along ``ax`` (index j holds x[.., j mod n, ..])."""
    n = x.shape[ax]
    reps = -(-n2 // n)
    shape = (*x.shape[:ax], reps, *x.shape[ax:])
    y = jnp.broadcast_to(jnp.expand_dims(x, ax), shape)
    y = y.reshape(*x.shape[:ax], reps * n, *x.shape[ax + 1:])
    return y if reps * n == n2 else jax.lax.slice_in_dim(y, 0, n2, axis=ax)


def _repeat(x: jax.Array, r: int, ax: int) -> jax.Array:
    """[.., r n, ..]: each index of ``ax`` repeated r times in place (index j holds x[j // r]).

    The repeated axis is the major factor of the merge, so an ``ax`` sharded over devices stays
    shard-local (shard s of the result is made of shard s of x only)."""
    shape = (*x.shape[:ax + 1], r, *x.shape[ax + 1:])
    y = jnp.broadcast_to(jnp.expand_dims(x, ax + 1), shape)
    return y.reshape(*x.shape[:ax], x.shape[ax] * r, *x.shape[ax + 1:])


def _repeats(src: np.ndarray, n: int) -> int:
    """r if ``src`` is the in-place repeat arange(n r) // r of n entries, else 0."""
    n2 = len(src)
    r = n2 // n if n and n2 % n == 0 else 0
    return r if r and np.array_equal(src, np.arange(n2) // r) else 0


def _take(x: jax.Array, plan: AxisPlan, ax: int) -> jax.Array:
    """x[.., src[j], ..] along ``ax``, zero at new entries (src -1).

    Tiling and in-place repeats are a broadcast + reshape and appending a pad: data movement
    only (bit-exact), and cheap for XLA's SPMD partitioner (a concatenate of copies along a
    sharded axis compiled to ~9x more fusions).
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
        # lax.pad, not jnp.pad: a primitive, not a nested jit to trace and lower per call
        return jax.lax.pad(x, jnp.zeros((), x.dtype),
                           [(0, n2 - n if a == ax else 0, 0) for a in range(x.ndim)])
    if np.array_equal(src, np.arange(n2) % n):
        return _tile(x, n2, ax)
    if _repeats(src, n):
        return _repeat(x, _repeats(src, n), ax)
    y = jnp.take(x, jnp.asarray(np.maximum(src, 0), jnp.int32), axis=ax)
    if (src < 0).any():  # new entries took index 0: zero them
        y = jnp.where(_along(src < 0, ax, x.ndim), jnp.zeros((), x.dtype), y)
    return y


def _scale(y: jax.Array, s, ax: int) -> jax.Array:
    if s is None:
        return y
    s = np.asarray(s, np.float64)
    if np.all(s == 1.0):  # exact: no multiply at all (bitwise-preserving operators)
        return y
    if s.ndim == 0:
        return y * jnp.asarray(s, y.dtype)
    return y * _along(s.astype(np.float32), ax, y.ndim).astype(y.dtype)


def _moments(x: jax.Array) -> jax.Array:
    """[2] float32: mean(x) and mean(x^2), in one reduction of the two stacked (one kernel and,
    for a sharded ``x``, one all-reduce; ``jnp.std`` makes two passes, each with its kernels
    and all-reduce; a variadic ``lax.reduce`` is partitioned as an all-gather and a second
    kernel)."""
    x = x.astype(jnp.float32)
    return jnp.mean(jnp.stack([x, x * x]), axis=tuple(range(1, x.ndim + 1)))


def stds(arrays: dict, fallback: float) -> dict:
    """{key: float32 scalar}: the standard deviation of each array (``fallback`` where it is 0
    or the array empty).

    var = E[x^2] - E[x]^2 loses relative precision only when |mean| >> std, which weight
    matrices (the arrays whose std scales new weights and noise) are not. The square roots of
    all arrays are one vector op: each scalar tail after its reduction (and all-reduce) was a
    kernel of its own (XLA does not fuse a scalar sqrt into an elementwise consumer).
    """
    keys = [k for k, x in arrays.items() if x.size]
    out = {k: jnp.asarray(fallback, jnp.float32) for k, x in arrays.items() if not x.size}
    if keys:
        m = jnp.stack([_moments(arrays[k]) for k in keys])
        s = jnp.sqrt(jnp.maximum(m[:, 1] - m[:, 0] * m[:, 0], 0.0))
        s = jnp.where(s > 0, s, fallback)
        out.update({k: s[i] for i, k in enumerate(keys)})
    return out


def _how(axes: tuple[str, ...], plan: AxisPlan, is_param: bool, noise: float):
    """(role, how new entries start or None, whether copies get noise) of an array."""
    role = axis_role(axes, plan.axis, is_param)
    how = plan.new.get(role, "zero") if plan.is_new.any() else None
    noisy = noise > 0 and role in plan.noise_roles and bool(np.any(plan.counts() > 1))
    return role, how, noisy


def needs_std(axes: tuple[str, ...], plan: AxisPlan, *, is_param: bool, noise: float) -> bool:
    """Whether ``resize_value`` scales random values by the array's std (give it ``std=``)."""
    _, how, noisy = _how(axes, plan, is_param, noise)
    return how == "random" or noisy


MAX_RUNS = 4  # blocks of new entries placed one by one (more: one select over the array)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop)] of the runs of True in ``flags``."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def resize_value(x: jax.Array, axes: tuple[str, ...], plan: AxisPlan, *, is_param: bool,
                 normals: Normals, noise: float, init_std: float, std=None, clean=None):
    """Grow a parameter (or state) array along ``plan.axis``.

    y[.., j, ..] = value_scale[j] * x[.., src[j], ..] for copies; new entries by ``plan.new``;
    plus, for noise roles, ``noise * std(x)`` times ``Normals.zero_sum`` noise (it sums to zero
    over the copies of one source entry, so copies that read identical inputs keep their sum).
    ``std``: std(x) when ``needs_std`` (computed here when not given; ``stds`` batches them).

    ``clean``: ``x`` without the noise earlier plans added (or ``x`` itself); then returns
    (y, y without any noise), the same copies and new entries in both. Later plans take their
    stds from the clean array: a reduction over the noisy one computes every noise draw again
    inside the reduction (on CPU it cost most of a growth's run time), and the noise changes
    a std by about noise^2 / 2 relative.
    """
    ax = axes.index(plan.axis)
    role, how, noisy = _how(axes, plan, is_param, noise)
    if (how == "random" or noisy) and std is None:
        std = stds({"x": x if clean is None else clean}, init_std)["x"]
    both = [x] if clean is None or clean is x else [x, clean]
    ys = [_scale(_take(v, plan, ax), plan.value.get(role), ax) for v in both]
    runs = _runs(plan.is_new) if how == "random" else []
    if how == "random" and len(runs) <= MAX_RUNS:
        # new entries in a few blocks (appended slots, inserted layers): each block's draw
        # padded into place and added to the zeros _take put there (exact), so the draw is
        # computed only where it lands (a select evaluates both its sides everywhere)
        for (a, b), blk in zip(runs, normals.normal_runs(ys[0].shape, ax, runs)):
            pad = jax.lax.pad((blk * std).astype(x.dtype), jnp.zeros((), x.dtype),
                              [(a, ys[0].shape[ax] - b, 0) if i == ax else (0, 0, 0)
                               for i in range(x.ndim)])
            ys = [y + pad for y in ys]
    elif how is not None and how != "zero":  # "zero": _take already put zeros there
        if how == "random":
            fill = (normals.normal(ys[0].shape) * std).astype(x.dtype)
        elif how == "mean":
            fill = (jnp.mean(both[-1], axis=ax, keepdims=True) if x.shape[ax]
                    else jnp.ones((), x.dtype)).astype(x.dtype)
        else:
            fill = jnp.asarray(float(how), x.dtype)
        new = _along(plan.is_new, ax, x.ndim)
        ys = [jnp.where(new, fill, y) for y in ys]
    y = ys[0]
    if noisy:
        d = normals.zero_sum(y.shape, ax, plan.src) * (noise * std)
        y = y + d.astype(y.dtype)
    if clean is None:
        return y
    return y, ys[-1]


def resize_moment(m: jax.Array, axes: tuple[str, ...], plan: AxisPlan, *, second: bool
                  ) -> jax.Array:
    """Grow an optimizer moment shaped like its parameter: copies scaled by the gradient rule
    (squared for second moments), new entries zero."""
    ax = axes.index(plan.axis)
    g = plan.grad.get(axis_role(axes, plan.axis, True))
    if g is not None and second:
        g = np.square(np.asarray(g, np.float64))
    return _scale(_take(m, plan, ax), g, ax)  # new entries: zero from _take


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
