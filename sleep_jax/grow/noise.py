"""Random values for growth (new weights, symmetry-breaking noise) that compile to almost nothing.

``Normals`` draws from a counter-based hash of (key, draw number, element coordinates) instead of
``jax.random``. Why: a ``jax.random.normal`` draw compiles on XLA CPU to a threefry while-loop
and erf_inv kernels (~0.6 s of compile per draw, tens of draws per growth); one pooled draw sliced
into every leaf is computed replicated on every device and resharded with an all-reduce per leaf.
A hash of iotas is elementwise: XLA fuses it into the kernel that uses the values (no kernel of
its own), the SPMD partitioner computes each shard's values on its own device (no
communication, nothing replicated), and the values do not depend on the mesh.

The values are near-normal (``_approx_normal``: an Irwin-Hall sum of four uniform bytes, mean 0,
variance 1, |z| <= 3.45); an exact normal (erf_inv of a uniform) made each draw several large
kernels, about 2x the growth's XLA compile time on CPU. They serve as initial values and noise,
not as statistically exact normals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

U32 = jnp.uint32


def _mix(h: jax.Array) -> jax.Array:
    """A 32-bit integer hash with full avalanche (``lowbias32``, C. Wellons' hash-prospector)."""
    h = (h ^ (h >> 16)) * U32(0x7FEB352D)
    h = (h ^ (h >> 15)) * U32(0x846CA68B)
    return h ^ (h >> 16)


def _seed(rng: jax.Array) -> jax.Array:
    """One uint32 word hashed from all the words of ``rng`` (a typed key or raw key data)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    h = U32(0x243F6A88)
    for w in jnp.ravel(rng.astype(U32)):
        h = _mix(h ^ w)
    return h


def _approx_normal(h: jax.Array) -> jax.Array:
    """float32 of mean 0 and variance 1 from uint32 ``h``: the sum of its four bytes (each
    uniform on 0..255: mean 510, variance 4 (256^2 - 1) / 12), centred and scaled."""
    s = (h & U32(0x00FF00FF)) + ((h >> 8) & U32(0x00FF00FF))  # two 16-bit lanes of byte sums
    total = ((s & U32(0xFFFF)) + (s >> 16)).astype(jnp.float32)
    k = np.float32(1.0 / np.sqrt(4 * (256 ** 2 - 1) / 12))
    return total * k - np.float32(510.0 * k)


def _groups(extents) -> list[list[tuple[int, int]]]:
    """Axes, from the last, in groups whose mixed-radix index fits 31 bits: [[(axis, radix)]]."""
    groups, cur, radix = [], [], 1
    for a in reversed(range(len(extents))):
        if cur and radix * extents[a] >= 2 ** 31:
            groups.append(cur)
            cur, radix = [], 1
        cur.append((a, radix))
        radix *= max(int(extents[a]), 1)
    return groups + [cur] if cur else groups


def _vector(vec: np.ndarray, ax: int, ndim: int) -> jax.Array:
    """A static [n] vector (its own dtype) shaped to broadcast along axis ``ax``."""
    shape = [1] * ndim
    shape[ax] = -1
    return jnp.asarray(np.asarray(vec).reshape(shape))


class Normals:
    """Near-normal draws for one growth from ``rng``; each call is a new, independent stream.

    Element values are hash(key, draw, coordinates): a leaf under 2^31 entries costs one mix
    per element (larger ones one per 31-bit group of axes), so no flat index can overflow.
    """

    def __init__(self, rng: jax.Array):
        self.seed = _seed(rng)
        self.draws = 0

    def _stream(self) -> jax.Array:
        self.draws += 1
        return _mix(self.seed ^ U32((self.draws * 0x9E3779B9) & 0xFFFFFFFF))

    @staticmethod
    def _index(shape, extents, skip=None, offset=None):
        """Per axis group, the mixed-radix index of the elements' iota coordinates (axis
        ``skip`` left out: None where a group holds only it), and (group, radix) of ``skip``.
        ``offset``: (axis, start): coordinates along that axis start at ``start``."""
        parts, at = [], None
        for g, group in enumerate(_groups(extents)):
            idx = None
            for a, radix in group:
                if a == skip:
                    at = (g, radix)
                    continue
                term = jax.lax.broadcasted_iota(U32, shape, a)
                if offset is not None and a == offset[0] and offset[1]:
                    term = term + U32(offset[1])
                term = term if radix == 1 else term * U32(radix)
                idx = term if idx is None else idx + term
            parts.append(idx)
        return parts, at

    @staticmethod
    def _finish(h, parts, shape) -> jax.Array:
        for idx in parts:
            h = _mix(h if idx is None else h + idx)
        return jnp.broadcast_to(h, shape)

    def normal(self, shape: tuple[int, ...]) -> jax.Array:
        """[shape] float32, mean 0, variance 1."""
        parts, _ = self._index(shape, shape)
        return _approx_normal(self._finish(self._stream(), parts, shape))

    def normal_runs(self, shape: tuple[int, ...], ax: int, runs) -> list[jax.Array]:
        """One draw over ``shape`` computed only on the blocks ``runs`` = [(start, stop)] of
        axis ``ax``: the list of those slices (the same values as slicing ``normal(shape)``).
        The values at other entries are never computed: a select over the whole shape
        evaluates both of its sides at every element."""
        h = self._stream()
        out = []
        for start, stop in runs:
            block = tuple(stop - start if a == ax else d for a, d in enumerate(shape))
            parts, _ = self._index(block, shape, offset=(ax, start))
            out.append(_approx_normal(self._finish(h, parts, block)))
        return out

    def zero_sum(self, shape: tuple[int, ...], ax: int, src: np.ndarray) -> jax.Array:
        """[shape] noise of variance 1 summing to zero over the copies of each source index.

        Along ``ax`` entry j copies source ``src[j]`` (-1: new). With e(s, k) a draw for copy k
        of source s, copy k gets (e(s, k) - e(s, k + 1 mod c)) / sqrt(2), c the copies of s:
        the differences around the cycle sum to zero, so copies that read identical inputs keep
        their sum; where no source has more than 2 copies, the pair gets +e(s, 0) and -e(s, 0)
        (one draw). Elementwise, at most two draws per element; subtracting
        the mean over copies instead evaluated every copy's draw inside each consumer kernel.
        Entries that are new or the only copy of their source get 0.
        """
        src = np.asarray(src)
        rank, count = np.zeros(len(src), np.int64), np.ones(len(src), np.int64)
        for s in np.unique(src[src >= 0]):
            where = np.flatnonzero(src == s)
            rank[where], count[where] = np.arange(len(where)), len(where)
        width, on = int(count.max()), (src >= 0) & (count > 1)
        extents = list(shape)
        extents[ax] = (int(src.max()) + 1) * width  # axis ax indexed by code = src * width + k
        parts, (g, radix) = self._index(shape, extents, skip=ax)
        h = self._stream()

        def draw(k):  # e(src[j], k[j]) as a [shape] array
            code = (np.where(on, np.maximum(src, 0) * width + k, 0) * radix).astype(np.uint32)
            p = list(parts)
            vec = _vector(code, ax, len(shape))
            p[g] = vec if p[g] is None else p[g] + vec
            return _approx_normal(self._finish(h, p, shape))

        if width == 2:  # pairs (the usual doubling): +e(s, 0) and -e(s, 0), one draw
            sign = np.where(on, 1.0 - 2.0 * rank, 0.0).astype(np.float32)
            return draw(np.zeros_like(rank)) * _vector(sign, ax, len(shape))
        d = (draw(rank) - draw((rank + 1) % count)) * np.float32(1 / np.sqrt(2))
        return d * _vector(on.astype(np.float32), ax, len(shape))
