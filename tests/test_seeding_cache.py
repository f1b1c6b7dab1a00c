"""The teacher cache (distill.cache): cached logits against a brute-force teacher forward, the
cached step against the sampled lam=0 step on the same completions, a cached sleep that
learns, and its config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sleep_jax.distill import cache as tcache
from sleep_jax.distill import seeding
from sleep_jax.grow import activate_slot, grow_model
from sleep_jax.mesh import make_mesh
from sleep_jax.models import create_model, get_preset
from sleep_jax.train.adapters import create_adapter_state
from sleep_jax.train.state import fresh_copy

CFG = get_preset("tiny", vocab=64, embed=32, mlp=64, layers=2, heads=4, kv_heads=2,
                 head_dim=8)
M = 4


@pytest.fixture(scope="module")
def setup():
    """(teacher, grown student with slot 0 active, mesh, 6 rows as a SeedingBatch, replay)."""
    base = create_model(CFG, seed=0)
    g, st = nnx.split(base)
    base = nnx.merge(g, jax.tree.map(lambda x: x * 6.0, st))  # context matters visibly
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    student, _ = grow_model(base, CFG, CFG.replace(expert_slots=1, expert_rank=4), mesh=mesh,
                            rng=jax.random.key(1))
    student, _ = activate_slot(student, None, 0, jax.random.key(2))
    rng = np.random.default_rng(0)
    rows = lambda n, lo, hi: [list(rng.integers(4, CFG.vocab, int(rng.integers(lo, hi))))
                              for _ in range(n)]
    mems, prompts = rows(4, 3, 9) + [[], []], rows(6, 2, 6)
    batch = seeding.make_batch(mems, prompts, bos_id=1, teacher_len=16, student_len=8)
    replay = np.array([False] * 4 + [True] * 2)
    return base, student, mesh, batch, replay, mems, prompts


def _cfg(**kw):
    return seeding.SeedingConfig(max_new_tokens=M, lam=0.0, divergence="forward_kl",
                                 teacher_samples=2, **kw)


def test_cached_logits_equal_a_row_by_row_teacher_forward(setup):
    """Each cached completion, re-read by the teacher one row at a time (bos + memory
    + prompt + completion): its logits are the cached ones; the student rows hold bos + prompt
    + the same completion."""
    base, _, mesh, batch, replay, mems, prompts = setup
    cache, n = tcache.build_cache(base, batch, replay, cfg=_cfg(), rng=jax.random.key(3),
                                  mesh=mesh, eos_id=None, chunk=4)  # 2 chunks, one padded
    assert n == 6 and cache.teacher_logits.shape == (12, M, CFG.vocab)
    np.testing.assert_array_equal(cache.replay, np.tile(replay, 2))
    assert cache.completion_mask.all()  # no EOS: every completion has M tokens
    L = 24  # rows right-padded to one length: causal attention never reads the padding
    fwd = jax.jit(lambda t: base(t, jnp.arange(L)[None])[0][0])
    for r in range(12):
        i = r % n
        comp = [int(cache.rows.tokens[r, p]) for p in cache.rows.completion_pos[r]]
        pre = [1] + list(prompts[i])
        assert list(cache.rows.tokens[r, :len(pre) + M]) == pre + comp
        seq = [1] + list(mems[i]) + list(prompts[i]) + comp
        logits = fwd(jnp.asarray([seq + [0] * (L - len(seq))]))
        want = np.asarray(logits[len(seq) - M - 1:len(seq) - 1])
        # fp32 reduction order differs between a batch and one row: 4.2e-5 on 2 of 256 logits
        # on one 2-core host (2e-5 held elsewhere)
        np.testing.assert_allclose(cache.teacher_logits[r], want, atol=1e-4, rtol=1e-4)
    # the two samples of a row differ (drawn with different keys)
    assert not np.array_equal(cache.rows.tokens[:n], cache.rows.tokens[n:])


def test_cached_step_equals_the_sampled_step_on_the_same_completions(setup):
    """One chunk, one sample: the cache's completions are those ``seeding_step`` with lam=0
    samples from the same key; a cached step on the rows in order moves the slot as the
    sampled step does."""
    base, student, mesh, batch, replay, _, _ = setup
    cfg1 = dataclasses.replace(_cfg(), teacher_samples=1)
    key = jax.random.key(5)
    cache, n = tcache.build_cache(base, batch, replay, cfg=cfg1, rng=key, mesh=mesh,
                                  eos_id=None, chunk=6)
    tx = optax.adam(1e-2)
    sampled = create_adapter_state(student, 0, tx)
    cached = create_adapter_state(fresh_copy(student), 0, tx)
    step_s = seeding.make_seeding_step(cfg1, sampled, mesh, eos_id=None)
    step_c = tcache.make_cached_step(cfg1, cached, mesh)
    tg, ts = nnx.split(base)
    sample_key = jax.random.fold_in(jax.random.fold_in(key, 0), 0)
    in_order = tcache.CachedBatch(cache.rows, cache.teacher_logits, cache.completion_mask,
                                  cache.replay)
    for _ in range(2):  # the same completions each step (a cache), as the key is the same
        sampled, ms = step_s(sampled, tg, ts, batch, sample_key, None)
        cached, mc = step_c(cached, in_order)
        np.testing.assert_allclose(float(mc["divergence"]), float(ms["divergence"]),
                                   rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sampled.params), jax.tree.leaves(cached.params)):
        # the cached logits come from the KV-cache decode, the sampled step's from a full
        # forward: float rounding apart (Adam moves each entry by about 1e-2 per step)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=3e-5)
    assert step_c.jitted._cache_size() == 1


def test_cached_seeding_lowers_the_divergence_on_memory_rows(setup):
    """20 cached steps on a draw of memory and replay rows: the divergence on all cached memory
    rows falls below half its value before training (a control: the same slot untrained)."""
    base, student, mesh, batch, replay, _, _ = setup
    cfg = _cfg()
    cache, n = tcache.build_cache(base, batch, replay, cfg=cfg, rng=jax.random.key(7),
                                  mesh=mesh, eos_id=None)
    state = create_adapter_state(student, 0, optax.adam(3e-2))
    step = tcache.make_cached_step(cfg, state, mesh)
    draw = tcache.cached_batch_fn(cache, n, batch_size=4, fraction=0.25)
    rng = np.random.default_rng(0)
    b = draw(rng)
    assert int(b.replay.sum()) == 1 and b.teacher_logits.shape == (4, M, CFG.vocab)
    memory = np.flatnonzero(~cache.replay)
    every = tcache.CachedBatch(*(jax.tree.map(lambda x: x[memory], f) for f in
                                 (cache.rows, cache.teacher_logits, cache.completion_mask,
                                  cache.replay)))

    def div(st):
        s, c, _, _ = seeding.divergence_and_experts(st.model(), jnp.asarray(
            every.teacher_logits), jax.tree.map(jnp.asarray, every.rows),
            jnp.asarray(every.completion_mask), cfg)
        return float(s / c)

    before = div(state)
    for _ in range(20):
        state, _ = step(state, draw(rng))
    assert div(state) < 0.5 * before, (before, div(state))


@pytest.mark.parametrize("kw, words", [(dict(lam=0.5), "lam=0"),
                                       (dict(teacher="self"), "teacher='frozen'"),
                                       (dict(alpha=0.5), "alpha=1"),
                                       (dict(teacher_samples=-1), ">= 0")])
def test_teacher_samples_config_errors(kw, words):
    base = dict(max_new_tokens=M, lam=0.0, teacher_samples=2)
    with pytest.raises(ValueError, match="teacher_samples") as e:
        seeding.SeedingConfig(**{**base, **kw})
    assert words in str(e.value)
