"""A teacher cache: Knowledge Seeding with the teacher's completions and logits computed once.

With ``lam = 0`` every completion comes from the frozen teacher (given memory + prompt), and
the teacher does not change during a sleep, so what it writes for a row and the logits it
gives those tokens do not depend on the step. ``build_cache`` samples
``SeedingConfig.teacher_samples`` completions per distinct row once, as ``seeding.collect``
samples them, and keeps per completion the student's row (prompt + completion) and the
teacher's logits predicting each completion token [M, V] (the logits it sampled from: no
second teacher pass). A cached step
is ``seeding.seeding_update`` on a draw of cached rows: one student forward and backward, with
no sampling and no teacher forward.

This is GKD with lam = 0 over a fixed set of teacher outputs: sequence-level distillation on
teacher-written completions (Kim & Rush 2016) with the teacher's full distribution per token
as the target. The price: a row has ``teacher_samples`` distinct completions, where sampling
every step gives a new one each time. Host memory: rows x samples x M x V float32 logits (the
build logs the size).
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from sleep_jax.distill import align
from sleep_jax.distill.seeding import SeedingBatch, SeedingConfig, seeding_update
from sleep_jax.sampling import generate

log = logging.getLogger(__name__)


class TeacherCache(NamedTuple):
    """Cached completions, S samples of N distinct rows (row s * N + i is sample s of row i).

    rows: the student's rows (prompt + completion), ``align.Rows`` of [S*N, Q+M] numpy arrays.
    teacher_logits: [S*N, M, V] float32, the teacher's logits predicting each completion token.
    completion_mask: [S*N, M] bool. replay: [S*N] bool, True on replay rows (no memory).
    """

    rows: align.Rows
    teacher_logits: np.ndarray
    completion_mask: np.ndarray
    replay: np.ndarray


class CachedBatch(NamedTuple):
    """One step's draw of cached rows (fields as ``TeacherCache``, B rows)."""

    rows: align.Rows
    teacher_logits: np.ndarray
    completion_mask: np.ndarray
    replay: np.ndarray


def build_cache(teacher, batch: SeedingBatch, replay, *, cfg: SeedingConfig, rng, mesh,
                eos_id: int | None, pad_id: int = 0, chunk: int = 16) -> tuple[TeacherCache, int]:
    """Sample ``cfg.teacher_samples`` teacher completions for every row of ``batch`` (host
    numpy, N distinct rows) and their teacher logits; ``replay`` [N] bool marks replay rows.

    Rows go through the device ``chunk`` at a time (the last chunk padded with row 0, so one
    program serves every chunk); sample s of a chunk starting at row j uses
    ``fold_in(fold_in(rng, s), j)``. Returns (the cache as host numpy, the number of distinct
    rows N).
    """
    from sleep_jax.runtime import host_read, shard_rows

    if cfg.teacher_samples < 1:  # SeedingConfig checks lam, teacher and alpha
        raise ValueError(f"build_cache needs SeedingConfig.teacher_samples >= 1 (got "
                         f"{cfg.teacher_samples})")
    n = int(np.asarray(batch.student_prefix).shape[0])
    tg, ts = nnx.split(teacher)

    @jax.jit
    def one(ts, b, key):
        t = nnx.merge(tg, ts)
        # as ``collect`` with lam = 0 (its key split: the teacher samples with the second
        # half), keeping the logits each token was sampled from: the teacher's logits at the
        # positions predicting the completion, so no second teacher pass is needed
        out = generate(t, b.teacher_prefix, b.teacher_len, jax.random.split(key)[1],
                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature,
                       eos_id=eos_id, pad_id=pad_id, return_logits=True)
        student = align.concat_rows(b.student_prefix, b.student_len, out.tokens, out.mask,
                                    pad_id=pad_id)
        return student, out.logits, out.mask

    parts, t0 = [], time.perf_counter()
    for s in range(cfg.teacher_samples):
        for j in range(0, n, chunk):
            idx = np.arange(j, j + chunk)
            idx = np.where(idx < n, idx, 0)
            b = SeedingBatch(*(np.asarray(x)[idx] for x in batch))
            key = jax.random.fold_in(jax.random.fold_in(rng, s), j)
            with jax.set_mesh(mesh):
                out = one(ts, shard_rows(b, mesh), key)
            keep = min(chunk, n - j)
            parts.append(jax.tree.map(lambda x, k=keep: x[:k], host_read(out)))
    rows = align.Rows(*(np.concatenate([p[0][f] for p in parts]) for f in range(5)))
    logits = np.concatenate([p[1] for p in parts])
    cmask = np.concatenate([p[2] for p in parts])
    cache = TeacherCache(rows, logits, cmask, np.tile(np.asarray(replay, bool),
                                                       cfg.teacher_samples))
    log.info("teacher cache: %d rows x %d samples, %d completion tokens, %.0f MB of logits, "
             "built in %.1f s", n, cfg.teacher_samples, int(cmask.sum()), logits.nbytes / 2**20,
             time.perf_counter() - t0)
    return cache, n


def cached_batch_fn(cache: TeacherCache, n: int, *, batch_size: int, fraction: float):
    """``fn(np_rng) -> CachedBatch``: as ``sleep_rows.batch_fn``, B - round(fraction * B)
    memory rows and the rest replay rows, drawn with replacement (a row and one of its cached
    samples) and shuffled."""
    replay = cache.replay[:n]
    new, old = np.flatnonzero(~replay), np.flatnonzero(replay)
    if not len(new):
        raise ValueError("the teacher cache holds no memory rows")
    samples = cache.replay.shape[0] // n
    n_old = int(round(fraction * batch_size)) if len(old) else 0

    def fn(rng: np.random.Generator) -> CachedBatch:
        pick = np.concatenate([new[rng.integers(0, len(new), batch_size - n_old)],
                               old[rng.integers(0, len(old), n_old)] if n_old
                               else np.zeros(0, np.int64)])
        pick = pick[rng.permutation(batch_size)] + n * rng.integers(0, samples, batch_size)
        return CachedBatch(align.Rows(*(x[pick] for x in cache.rows)),
                           cache.teacher_logits[pick], cache.completion_mask[pick],
                           cache.replay[pick])

    return fn


def make_cached_step(cfg: SeedingConfig, state, mesh, *, rules=None):
    """``step(state, batch: CachedBatch, mask=None) -> (state, metrics)``: ``seeding_update``
    jitted with the state's shardings on ``mesh`` (in and out, the state donated); a host batch
    is placed with its rows over the mesh's batch axes (``runtime.shard_rows``)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from sleep_jax.runtime import shard_rows
    from sleep_jax.train.state import train_state_shardings

    state_sh = (state.shardings(mesh, rules) if hasattr(state, "shardings")
                else train_state_shardings(state, mesh, rules))
    repl = NamedSharding(mesh, PartitionSpec())

    def step(state, batch, mask):
        return seeding_update(state, batch.teacher_logits, batch.rows, batch.completion_mask,
                              batch.replay, mask, cfg=cfg)

    jitted = jax.jit(step, donate_argnums=(0,), out_shardings=(state_sh, repl))

    def run(state, batch, mask=None):
        state = jax.device_put(state, state_sh)
        batch = shard_rows(batch, mesh, rules)
        with jax.set_mesh(mesh):
            return jitted(state, batch, mask)

    run.jitted = jitted
    return run
