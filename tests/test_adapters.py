"""Slot adapters (sleep_jax/train/adapters.py): the active expert slot trained as its own tree
equals training that slot's entries of the full model through a mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax.grow import activate_slot, grow_model
from sleep_jax.mesh import make_mesh
from sleep_jax.models import create_model, get_preset
from sleep_jax.train import adapters
from sleep_jax.train.optim import OptimConfig, make_optimizer
from sleep_jax.train.state import apply_gradients, create_train_state

E, SLOT = 3, 1


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "router"])
def slotted(request):
    """A tiny model grown to E slots with slot 0 trained-looking and slot SLOT activated, its
    A/B (and router) set to random values so every entry carries gradient."""
    cfg = get_preset("tiny", vocab=64, embed=32, mlp=64, layers=2, heads=4, kv_heads=2,
                     head_dim=8)
    base = create_model(cfg, seed=0)
    dst = cfg.replace(expert_slots=E, expert_rank=4, expert_router=request.param)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    grown, _ = grow_model(base, cfg, dst, mesh=mesh, rng=jax.random.key(1))
    grown, _ = activate_slot(grown, None, 0, jax.random.key(2))
    grown, mask = activate_slot(grown, None, SLOT, jax.random.key(3))
    g, params, other = nnx.split(grown, nnx.Param, ...)
    params = jax.tree.map(lambda x: x, params)
    for i, (_name, v) in enumerate(sorted(adapters.slot_leaves(params).items())):
        v.set_value(jax.random.normal(jax.random.key(10 + i), v.shape) * 0.1)
    return nnx.merge(g, params, other), mask


def _batch():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 6)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    return tokens, pos


def _loss(model):
    tokens, pos = _batch()
    logits = model(tokens, pos)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * jnp.arange(6))


def _slot_entries(params, slot=SLOT):
    out = {}
    for name, v in adapters.slot_leaves(params).items():
        ax = v.get_metadata()["logical_axes"].index("expert")
        out[name] = np.take(np.asarray(v[...]), slot, axis=ax)
    return out


def test_forward_with_adapter_equals_the_model_with_it_written_in(slotted):
    model, _ = slotted
    st = adapters.create_adapter_state(model, SLOT, make_optimizer(OptimConfig(), 10))
    # a changed adapter, composed under jit with the slot as a traced value
    st = st.replace(params=jax.tree.map(lambda x: x * 1.5 + 0.01, st.params))
    tokens, pos = _batch()
    composed = jax.jit(lambda s: s.model()(tokens, pos)[0])(st)
    written = adapters.write_back(st)
    direct = jax.jit(lambda m: m(tokens, pos)[0])(written)
    np.testing.assert_array_equal(np.asarray(composed), np.asarray(direct))
    # the other slots are untouched by the write-back
    before, after = nnx.state(model, nnx.Param), nnx.state(written, nnx.Param)
    for e in range(E):
        if e == SLOT:
            continue
        for name, x in _slot_entries(before, e).items():
            np.testing.assert_array_equal(x, _slot_entries(after, e)[name])


def test_adapter_gradient_equals_the_full_gradient_of_the_slot(slotted):
    model, _ = slotted
    st = adapters.create_adapter_state(model, SLOT, make_optimizer(OptimConfig(), 10))
    ga = jax.jit(jax.grad(lambda p: _loss(nnx.merge(st.graphdef, st.full_params(p),
                                                   st.other))))(st.params)
    g, params, other = nnx.split(model, nnx.Param, ...)
    gf = jax.jit(jax.grad(lambda p: _loss(nnx.merge(g, p, other))))(params)
    full = _slot_entries(gf)
    for name, v in ga.items():
        assert np.abs(full[name]).max() > 0, name
        # equal up to float summation order (the two programs fuse differently)
        np.testing.assert_allclose(np.asarray(v[...]), full[name], rtol=1e-5,
                                   atol=1e-6 * np.abs(full[name]).max())


def test_adam_steps_on_the_adapter_equal_masked_full_model_steps(slotted):
    """Clipping + AdamW with weight decay, three steps: the adapter path against the masked
    full-model ``apply_gradients`` path, an independent reference."""
    model, mask = slotted
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.1, clip_norm=0.05),
                        10)
    st_a = adapters.create_adapter_state(model, SLOT, tx)
    st_f = create_train_state(model, tx)
    jmask = jax.tree.map(jnp.asarray, mask)

    @jax.jit
    def step_a(s):
        gr = jax.grad(lambda p: _loss(nnx.merge(s.graphdef, s.full_params(p), s.other)))(
            s.params)
        return apply_gradients(s, gr)

    @jax.jit
    def step_f(s):
        gr = jax.grad(lambda p: _loss(nnx.merge(s.graphdef, p, s.other)))(s.params)
        return apply_gradients(s, gr, jmask)

    for _ in range(3):
        st_a, st_f = step_a(st_a), step_f(st_f)
    ref = _slot_entries(st_f.params)
    moved = _slot_entries(nnx.state(model, nnx.Param))
    for name, v in st_a.params.items():
        assert not np.allclose(ref[name], moved[name]), name  # the step moved the slot
        np.testing.assert_allclose(np.asarray(v[...]), ref[name], rtol=1e-5, atol=1e-7)
    # the model written back equals the masked full-model result everywhere
    back = nnx.state(adapters.write_back(st_a), nnx.Param)
    for (pa, a), (_pb, b) in zip(jax.tree_util.tree_leaves_with_path(back),
                                jax.tree_util.tree_leaves_with_path(st_f.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(pa))
    # the optimizer state covers only the adapter
    n_opt = sum(x.size for x in jax.tree.leaves(st_a.opt_state))
    n_adapter = sum(x.size for x in jax.tree.leaves(st_a.params))
    assert n_opt <= 2 * n_adapter + 4


def test_the_slot_is_a_traced_value_not_a_recompile(slotted):
    model, _ = slotted
    tx = make_optimizer(OptimConfig(), 10)
    f = jax.jit(lambda s: s.model()(*_batch())[0])
    for e in range(E):
        f(adapters.create_adapter_state(model, e, tx))
    assert f._cache_size() == 1


def _lm_batch(B=8, T=6):
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, 64, (B, T + 1)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[::3, -2:] = False  # padded rows: micro-batches carry unequal token counts
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
            "segment_ids": mask.astype(np.int32), "mask": mask, "loss_mask": mask}


def test_micro_batches_on_the_adapter_equal_one_batch_and_the_masked_full_step(slotted):
    """train_step_fn with micro_batches=4 on an AdapterState: the same loss and update as one
    batch (exact accumulation: sums, then one division by the total token count; the padded
    rows give the micro-batches unequal counts) and as the masked full-model step with the
    same micro-batching, an independent path. SGD, so the update is the gradient itself (Adam
    would turn a gradient entry's float summation order into a sign flip near 0)."""
    import optax

    from sleep_jax.train.step import train_step_fn

    model, mask = slotted
    tx = optax.sgd(0.5)
    batch = {k: jnp.asarray(v) for k, v in _lm_batch().items()}
    key = jax.random.key(0)
    jmask = jax.tree.map(jnp.asarray, mask)

    def step(s, k, m=None):
        return jax.jit(lambda s: train_step_fn(s, batch, key, m, micro_batches=k))(s)

    one, m1 = step(adapters.create_adapter_state(model, SLOT, tx), 1)
    four, m4 = step(adapters.create_adapter_state(model, SLOT, tx), 4)
    full, mf = step(create_train_state(model, tx), 4, jmask)
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["loss"]), float(mf["loss"]), rtol=1e-6)
    assert float(m4["tokens"]) == float(m1["tokens"]) == float(batch["loss_mask"].sum())
    ref, start = _slot_entries(full.params), _slot_entries(nnx.state(model, nnx.Param))
    for name, v in four.params.items():
        a, b = np.asarray(v[...]), np.asarray(one.params[name][...])
        scale = np.abs(a - start[name]).max()
        assert scale > 0, name  # the step moved the slot
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale, err_msg=name)
        np.testing.assert_allclose(a, ref[name], rtol=0, atol=1e-5 * scale, err_msg=name)
