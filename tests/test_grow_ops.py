"""Growth operators: every operator preserves the function through the full forward (bitwise for
expert slots and depth), decode and padding, G_stack is not preserving, zero-init units learn,
expert-slot activation, and a composed growth across three (source, target) mesh pairs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sleep_jax.grow import (
    GrowOptions,
    SlotsExhausted,
    activate_slot,
    grow,
    grown_config,
    next_free_slot,
    reset_slots,
    used_slots,
)
from sleep_jax.grow.optimizer import EntryClockState
from sleep_jax.mesh import make_mesh
from sleep_jax.models import Decoder, ModelConfig, create_model, state_shardings
from sleep_jax.train.loss import cross_entropy
from sleep_jax.train.state import apply_gradients, create_train_state

SRC = ModelConfig(vocab=64, embed=16, mlp=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                  expert_rank=4, max_seq_len=64)
MESH = "data=2,fsdp=2,tensor=2"
B, T = 2, 8
# name: (overrides, options, bitwise)
OPS = {
    "experts": (dict(expert_slots=2), GrowOptions(), True),
    "experts_router": (dict(expert_slots=2, expert_router=True), GrowOptions(), True),
    "width_replicate": (dict(embed=32), GrowOptions(noise=0.01), False),
    "width_zero": (dict(embed=24), GrowOptions(width="zero"), False),
    "heads_split": (dict(heads=8, kv_heads=4), GrowOptions(noise=0.01), False),
    "heads_zero": (dict(heads=6, kv_heads=3), GrowOptions(heads="zero"), False),
    "ffn_split": (dict(mlp=48), GrowOptions(noise=0.01), False),
    "ffn_zero": (dict(mlp=48), GrowOptions(mlp="zero"), False),
    "depth": (dict(layers=4), GrowOptions(), True),
}


def _on(mesh, x):
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))


@pytest.fixture(scope="module")
def source():
    mesh = make_mesh(MESH)
    model = create_model(SRC, mesh=mesh, seed=0)
    state = create_train_state(model, optax.adamw(1e-2))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, SRC.vocab)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    fwd = nnx.jit(lambda m, t, p: m(t, p)[0])
    return dict(mesh=mesh, state=state, tokens=tokens, positions=positions, fwd=fwd,
                ref=fwd(model, tokens, positions), cache={})


def _grown(source, name):
    if name not in source["cache"]:
        over, opts, _ = OPS[name]
        source["cache"][name] = grow(source["state"], SRC, SRC.replace(**over),
                                     mesh=source["mesh"], rng=jax.random.key(7), options=opts)
    return source["cache"][name]


def _close(out, ref, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=rtol,
                               atol=rtol * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("name", sorted(OPS))
def test_operator_preserves_logits_and_shapes(source, name):
    over, opts, bitwise = OPS[name]
    state, mask = _grown(source, name)
    cfg = grown_config(SRC, SRC.replace(**over), opts)
    model = state.model()
    assert model.config == cfg
    want = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    got = jax.tree.map(lambda x: (x.shape, x.dtype), state.params)
    assert got == jax.tree.map(lambda x: (x.shape, x.dtype), want)
    out = source["fwd"](model, source["tokens"], source["positions"])
    if bitwise:
        assert bool(jnp.all(out == source["ref"])), "expected bitwise-equal logits"
    else:
        _close(out, source["ref"])
    # something is new (mask) and the adam step count is kept; entries whose moments start at
    # zero (new, not copies) get their own clock (EntryClockState), copies keep clock 0
    assert any(bool(jnp.any(m)) for m in jax.tree.leaves(mask))
    opt = state.opt_state
    if name in ("width_replicate", "heads_split", "ffn_split"):  # copies only: no new clock
        assert not isinstance(opt, EntryClockState) and state.tx is source["state"].tx
    else:
        assert isinstance(opt, EntryClockState) and state.tx.clocks == 2
        assert np.asarray(opt.start).tolist() == [[0], [0]]
        assert any(bool(np.any(np.asarray(c) == 1)) for c in jax.tree.leaves(opt.clock))
        opt = opt.inner
    assert int(state.step) == 0 and int(opt[0].count) == 0


def test_norm_eps_derivation():
    assert grown_config(SRC, SRC.replace(embed=48)).norm_eps == pytest.approx(SRC.norm_eps / 9)
    zero = grown_config(SRC, SRC.replace(embed=24), GrowOptions(width="zero"))
    assert zero.norm_eps == pytest.approx(SRC.norm_eps * 16 / 24)


@pytest.mark.parametrize("name", ["width_replicate", "heads_split"])
def test_decode_and_padded_batch(source, name):
    """Right-padded prompt through the mask, then a cached prefill + one decode step."""
    src_model = source["state"].model()
    model = _grown(source, name)[0].model()
    tokens, positions = source["tokens"], source["positions"]
    pad = jnp.array([[True] * T, [True] * (T - 3) + [False] * 3])
    a = src_model(tokens, positions, mask=pad)[0]
    b = model(tokens, positions, mask=pad)[0]
    _close(jnp.where(pad[..., None], b, 0), jnp.where(pad[..., None], a, 0))

    def decode(m):
        cache = m.init_cache(B, T + 2)
        _, cache = m(tokens, positions, cache=cache, mask=pad)
        nxt = jnp.array([[3], [5]])
        pos = jnp.sum(pad, axis=1, keepdims=True)
        return m(nxt, pos, cache=cache)[0]

    _close(decode(model), decode(src_model))


def test_gstack_is_not_preserving(source):
    state, _ = grow(source["state"], SRC, SRC.replace(layers=4), mesh=source["mesh"],
                    rng=jax.random.key(7), options=GrowOptions(depth="stack"))
    out = source["fwd"](state.model(), source["tokens"], source["positions"])
    rel = float(jnp.max(jnp.abs(out - source["ref"])) / jnp.max(jnp.abs(source["ref"])))
    assert rel > 1e-2, f"G_stack unexpectedly preserved the function (rel. diff {rel:.2e})"
    # its copies are exact copies of the source layers
    q = np.asarray(state.params["blocks"]["q"][...])
    np.testing.assert_array_equal(q[2:], q[:2])


def _loss(model, tokens, positions):
    logits = model(tokens, positions)[0]
    s, c = cross_entropy(logits[:, :-1], tokens[:, 1:], jnp.ones_like(tokens[:, 1:], bool))
    return s / c


_GRAD = nnx.jit(nnx.grad(_loss))

# arrays whose new entries must receive gradient at the growth point (the zero-init writers)
ZERO_INIT_WRITERS = {"width_zero": ["o", "down"], "heads_zero": ["o"], "ffn_zero": ["down"],
                     "depth": ["o", "down"]}


@pytest.mark.parametrize("name", sorted(ZERO_INIT_WRITERS))
def test_new_zero_init_units_get_gradients(source, name):
    state, mask = _grown(source, name)
    model = state.model()
    grads = _GRAD(model, source["tokens"], source["positions"])
    for key in ZERO_INIT_WRITERS[name]:
        g = np.asarray(grads["blocks"][key][...])
        w = np.asarray(state.params["blocks"][key][...])
        m = np.broadcast_to(np.asarray(mask["blocks"][key][...]), g.shape)
        assert m.any() and np.all(w[m] == 0), f"{key}: new entries must start at zero"
        assert np.abs(g[m]).sum() > 1e-6, f"{key}: new zero-init entries get no gradient"


def test_expert_slot_activate_train_reset(source):
    state, _ = _grown(source, "experts")
    fwd, tokens, positions = source["fwd"], source["tokens"], source["positions"]
    state, mask = activate_slot(state, [1], 0, jax.random.key(3))
    assert bool(jnp.all(fwd(state.model(), tokens, positions) == source["ref"]))
    assert state.other["blocks"]["expert_mask"][...].tolist() == [[0, 0], [1, 0]]
    for key, m in mask["blocks"].items():
        m = np.asarray(m[...])
        if key in ("expert_a", "expert_b"):
            want = np.zeros(m.shape, bool)
            want[1, 0] = True
            np.testing.assert_array_equal(m, want)
        else:
            assert not m.any()
    grads = _GRAD(state.model(), tokens, positions)
    new = apply_gradients(state, nnx.state(grads, nnx.Param), mask)
    for a, b, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params),
                       jax.tree.leaves(mask)):
        m = np.broadcast_to(np.asarray(m), a.shape)
        np.testing.assert_array_equal(np.asarray(a)[~m], np.asarray(b)[~m])
    assert not np.array_equal(new.params["blocks"]["expert_b"][...][1, 0],
                              state.params["blocks"]["expert_b"][...][1, 0])
    trained = fwd(new.model(), tokens, positions)
    assert float(jnp.max(jnp.abs(trained - source["ref"]))) > 0
    off = reset_slots(new, 1, 0)
    assert bool(jnp.all(fwd(off.model(), tokens, positions) == source["ref"]))
    assert not np.any(np.asarray(off.params["blocks"]["expert_b"][...]))


def test_slots_are_never_handed_out_twice(source):
    """Slot 0 activated and trained: next_free_slot is 1, activating 0 again is refused,
    activating slot 1 leaves slot 0's A/B bitwise and the output unchanged (slot 1 has B = 0);
    a slot on in one layer only counts as used; all used -> SlotsExhausted; overwrite=True
    re-initialises on purpose."""
    grown, _ = _grown(source, "experts")  # E = 2, both off
    fwd, tokens, positions = source["fwd"], source["tokens"], source["positions"]
    model = grown.model()
    assert used_slots(model) == [] and next_free_slot(model) == 0
    model, _ = activate_slot(model, None, 0, jax.random.key(3))
    rng = np.random.default_rng(0)
    b = np.asarray(model.blocks.expert_b[...]).copy()
    b[:, 0] = rng.normal(0, 0.3, b[:, 0].shape)  # stands for a trained slot 0
    model.blocks.expert_b[...] = jnp.asarray(b)
    a0 = np.asarray(model.blocks.expert_a[...])[:, 0].copy()
    b0 = b[:, 0].copy()
    trained_out = fwd(model, tokens, positions)
    assert float(jnp.max(jnp.abs(trained_out - source["ref"]))) > 1e-3  # slot 0 matters
    assert used_slots(model) == [0] and next_free_slot(model) == 1
    with pytest.raises(ValueError, match=r"slot 0 is already on .*erasing.*Free slots: \[1\]"):
        activate_slot(model, None, 0, jax.random.key(4))
    model, mask = activate_slot(model, None, 1, jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(model.blocks.expert_a[...])[:, 0], a0)
    np.testing.assert_array_equal(np.asarray(model.blocks.expert_b[...])[:, 0], b0)
    assert not np.any(np.asarray(model.blocks.expert_b[...])[:, 1])
    assert bool(jnp.all(fwd(model, tokens, positions) == trained_out))
    m = np.asarray(mask["blocks"]["expert_b"][...])
    assert m[:, 1].all() and not m[:, 0].any()
    assert used_slots(model) == [0, 1]
    with pytest.raises(SlotsExhausted, match="all 2 expert slot.*larger expert_slots"):
        next_free_slot(model)
    assert issubclass(SlotsExhausted, ValueError)
    # overwrite=True re-draws A and zeroes B of a used slot: the first slot's training is gone
    again, _ = activate_slot(model, None, 0, jax.random.key(6), overwrite=True)
    assert not np.any(np.asarray(again.blocks.expert_b[...])[:, 0])
    assert not np.array_equal(np.asarray(again.blocks.expert_a[...])[:, 0], a0)
    # a slot on in one layer only is used; a train state is read like a model
    state, _ = activate_slot(grown, [1], 1, jax.random.key(7))
    assert used_slots(state) == [1] and next_free_slot(state) == 0
    with pytest.raises(ValueError, match="slot 1 is already on \\(layers \\[1\\]\\)"):
        activate_slot(state, [0], 1, jax.random.key(8))
    with pytest.raises(ValueError, match="out of range for 2 slots"):
        activate_slot(state, None, 2, jax.random.key(8))
    with pytest.raises(ValueError, match="no expert slots"):
        next_free_slot(source["state"])


COMPOSED = dict(layers=3, embed=32, mlp=48, heads=8, kv_heads=4, expert_slots=2)
NOISELESS = GrowOptions(noise=0.0)  # noise is covered on one mesh; keeps this compile short
PAIRS = [("fsdp=8", "data=2,tensor=4"), ("data=2,tensor=4", "fsdp=4,tensor=2"),
         ("data=8", "data=2,fsdp=2,tensor=2")]


def test_composed_growth_across_mesh_pairs(source):
    dst = SRC.replace(**COMPOSED)
    cfg = grown_config(SRC, dst)
    first = None
    for src_spec, dst_spec in PAIRS:
        src_mesh, dst_mesh = make_mesh(src_spec), make_mesh(dst_spec)
        # the source state resharded onto the source mesh, scalars included (as restored)
        state = source["state"]
        shard = state_shardings(state.params, src_mesh)
        state = state.replace(
            params=jax.device_put(state.params, shard), step=_on(src_mesh, state.step),
            opt_state=jax.tree.map(lambda x, m=src_mesh: _on(m, x) if x.ndim == 0 else x,
                                   state.opt_state))
        state = state.replace(opt_state=(state.opt_state[0]._replace(
            mu=jax.device_put(state.opt_state[0].mu, shard),
            nu=jax.device_put(state.opt_state[0].nu, shard)), *state.opt_state[1:]))
        rng = _on(src_mesh, jax.random.key(7))
        grown, mask = grow(state, SRC, dst, mesh=dst_mesh, rng=rng, options=NOISELESS)
        want = state_shardings(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))),
                               dst_mesh)
        want_p = jax.tree.leaves(nnx.state(want, nnx.Param))
        for x, w in zip(jax.tree.leaves(grown.params), want_p):
            assert x.sharding.is_equivalent_to(w, x.ndim), (src_spec, dst_spec, x.sharding, w)
        assert isinstance(grown.opt_state, EntryClockState)  # new slots and layers: clock 1
        for x, w in zip(jax.tree.leaves(grown.opt_state.inner[0].mu), want_p):
            assert x.sharding.is_equivalent_to(w, x.ndim)
        for x, w in zip(jax.tree.leaves(grown.opt_state.clock), want_p):  # sharded like params
            assert x.sharding.is_equivalent_to(w, x.ndim)
        for x in jax.tree.leaves((grown.other, mask, grown.step)):
            assert x.sharding.mesh.shape == dst_mesh.shape
        if first is None:
            first = grown
            out = source["fwd"](grown.model(), source["tokens"], source["positions"])
            _close(out, source["ref"])
        else:
            for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(grown.params)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # after warm-up: no transfer of any kind (no host round-trip) inside the grow call
    with jax.transfer_guard("disallow"):
        again, _ = grow(state, SRC, dst, mesh=dst_mesh, rng=rng, options=NOISELESS)
        jax.block_until_ready(again.params)
    assert math.isclose(again.model().config.norm_eps, SRC.norm_eps / 4)


def test_grow_model_params_only(source):
    """The model-level convenience (seeding's entry point) on the same mesh: bitwise for slots."""
    from sleep_jax.grow import grow_model

    rank = SRC.expert_rank + 3  # the first slots take the target's rank (once ignored)
    model, mask = grow_model(source["state"].model(), SRC,
                             SRC.replace(expert_slots=2, expert_rank=rank),
                             mesh=source["mesh"], rng=jax.random.key(7))
    assert (model.config.expert_slots, model.config.expert_rank) == (2, rank)
    assert model.blocks.expert_a[...].shape == (SRC.layers, 2, SRC.embed, rank)
    assert model.blocks.expert_b[...].shape == (SRC.layers, 2, rank, SRC.embed)
    assert bool(jnp.all(source["fwd"](model, source["tokens"], source["positions"])
                        == source["ref"]))
    assert bool(jnp.all(mask["blocks"]["expert_a"][...])) and not bool(mask["embed"][...])


def test_router_gates_the_slot_like_an_explicit_gate(source):
    """A routed slot equals the unrouted slot with ``expert_gate`` = the router's gates
    (independent path), the gates are sigmoid(h.w + b) in (0, 1) and a zero router gives
    exactly sigmoid(b); the reported output RMS is linear in B and 0 with the slots gated
    off; adding a router to a model that has slots is refused."""
    from sleep_jax.grow import grow_model
    from sleep_jax.grow.spec import check_growth

    one = SRC.replace(layers=1)
    base = create_model(one, seed=3)
    routed_cfg = one.replace(expert_slots=2, expert_router=True)
    routed, _ = grow_model(base, one, routed_cfg, mesh=source["mesh"], rng=jax.random.key(1))
    routed, _ = activate_slot(routed, None, 0, jax.random.key(2))
    routed, _ = activate_slot(routed, None, 1, jax.random.key(3))
    rng = np.random.default_rng(0)
    routed.blocks.expert_b[...] = jnp.asarray(rng.normal(0, 0.3, routed.blocks.expert_b.shape),
                                              jnp.float32)
    routed.blocks.expert_router_bias[...] = jnp.asarray([[[0.7], [-1.2]]], jnp.float32)
    plain_cfg = one.replace(expert_slots=2)
    plain = Decoder(plain_cfg, rngs=nnx.Rngs(0))
    for name in ("embed", "final_norm"):
        getattr(plain, name)[...] = getattr(routed, name)[...]
    for name, v in vars(plain.blocks).items():
        if isinstance(v, nnx.Variable):
            v[...] = getattr(routed.blocks, name)[...]
    tokens, positions = source["tokens"], source["positions"]
    logits, _, ex = routed(tokens, positions, return_experts=True)
    gates = ex["gate"]
    assert gates.shape == (1, B, T, 2)
    assert bool(jnp.all((gates > 0) & (gates < 1)))
    assert float(jnp.std(gates[..., 0])) > 1e-4  # per-token: the router reads h
    ref = plain(tokens, positions, expert_gate=gates[0])[0]
    _close(logits, ref)
    assert float(jnp.max(jnp.abs(ref - plain(tokens, positions)[0]))) > 1e-4  # gate matters
    routed.blocks.expert_router[...] = jnp.zeros_like(routed.blocks.expert_router[...])
    _, _, ex0 = routed(tokens, positions, return_experts=True)
    np.testing.assert_allclose(np.asarray(ex0["gate"][0, 0, 0]), 1 / (1 + np.exp([-0.7, 1.2])),
                               rtol=1e-6)
    rms = ex0["out_rms"]
    assert rms.shape == (1, B, T) and float(jnp.min(rms)) > 1e-4
    routed.blocks.expert_b[...] = 2 * routed.blocks.expert_b[...]
    _close(routed(tokens, positions, return_experts=True)[2]["out_rms"], 2 * rms)
    off = plain(tokens, positions, expert_gate=jnp.zeros(2), return_experts=True)[2]
    assert float(jnp.max(off["out_rms"])) < 1e-5
    with pytest.raises(ValueError, match="expert_router"):
        check_growth(plain_cfg, plain_cfg.replace(expert_slots=3, expert_router=True))
    with pytest.raises(ValueError, match="return_experts"):
        base(tokens, positions, return_experts=True)


def test_growth_noise_draws():
    """``noise.Normals``: unit variance, mean 0, deterministic per key, independent streams, and
    zero-sum noise that sums to 0 over each source's copies (pairs and larger groups)."""
    from sleep_jax.grow.noise import Normals

    draws = Normals(jax.random.key(0))
    a, b = np.asarray(draws.normal((64, 256))), np.asarray(draws.normal((64, 256)))
    assert abs(a.mean()) < 0.02 and abs(a.std() - 1) < 0.02
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02
    np.testing.assert_array_equal(a, np.asarray(Normals(jax.random.key(0)).normal((64, 256))))
    assert not np.allclose(a, np.asarray(Normals(jax.random.key(1)).normal((64, 256))))
    for src in (np.arange(8) // 2, np.array([0, 1, 2, 0, 1, 2, 0, -1, 3])):
        z = np.asarray(Normals(jax.random.key(2)).zero_sum((4000, len(src)), 1, src))
        for s in range(src.max() + 1):
            copies = src == s
            np.testing.assert_allclose(z[:, copies].sum(axis=1), 0, atol=1e-5)
            if copies.sum() == 1:  # the only copy: no noise
                assert not z[:, copies].any()
            else:
                assert abs(z[:, copies].std() - 1) < 0.05
        assert not z[:, src < 0].any()



def test_growth_noise_blocks_match_the_whole_draw():
    """``Normals.normal_runs`` (a draw computed only on blocks of one axis) gives the slices of
    the whole draw ``normal`` would make as the same draw, bitwise; ``axismap._runs`` finds the
    blocks of new entries; and a plan's random new entries placed block by block equal the
    select over the whole array."""
    from sleep_jax.grow.axismap import AxisPlan, _runs, resize_value
    from sleep_jax.grow.noise import Normals

    assert _runs(np.array([1, 1, 0, 0, 1, 0, 1], bool)) == [(0, 2), (4, 5), (6, 7)]
    assert _runs(np.zeros(3, bool)) == []
    shape, runs = (3, 10, 5), [(0, 2), (4, 5), (7, 10)]
    whole = np.asarray(Normals(jax.random.key(3)).normal(shape))
    blocks = Normals(jax.random.key(3)).normal_runs(shape, 1, runs)
    for (a, b), blk in zip(runs, blocks):
        np.testing.assert_array_equal(np.asarray(blk), whole[:, a:b])
    # layers 0..3 -> 6 with new layers at 2 and 5 (two blocks): readers start random
    src = np.array([0, 1, -1, 2, 3, -1])
    plan = AxisPlan("layers", src, new={"consumer": "random"})
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 6)), jnp.float32)
    axes = ("layers", "embed", "mlp")
    got = resize_value(x, axes, plan, is_param=True, normals=Normals(jax.random.key(4)),
                       noise=0.0, init_std=0.02, std=jnp.float32(0.5))
    ref = np.asarray(Normals(jax.random.key(4)).normal((6, 8, 6))) * np.float32(0.5)
    ref[src >= 0] = np.asarray(x)[src[src >= 0]]
    np.testing.assert_array_equal(np.asarray(got), ref)

def test_width_replication_is_shard_local():
    """On an fsdp mesh (``embed`` sharded), replicating the width moves no data between
    devices: the in-place repeat keeps each copy on its source's shard (only the noise std's
    all-reduce communicates)."""
    from sleep_jax.grow.api import compile_growth

    mesh = make_mesh("fsdp=8")
    state = create_train_state(create_model(SRC, mesh=mesh, seed=0), optax.adamw(1e-2))
    args = (state.params, state.other, state.opt_state, _on(mesh, state.step),
            _on(mesh, jax.random.key(0)))
    fn, _, _ = compile_growth(SRC, SRC.replace(embed=32), mesh, args, GrowOptions(noise=0.01))
    hlo = fn.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and "collective-permute" not in hlo and "all-to-all" not in hlo
