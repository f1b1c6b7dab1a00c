"""Growth and training: optimizer moments follow each operator's gradient rule (checked against
autodiff of the grown model), noise breaks clone symmetry, masked training leaves frozen entries
bitwise unchanged, a step after growth lowers the loss, bad overrides fail clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sleep_jax.grow import GrowOptions, grow, target_config
from sleep_jax.grow.api import plan_growth
from sleep_jax.grow.flat import flatten, rebuild
from sleep_jax.grow.optimizer import ClockedTransformation, EntryClockState, entry_clocks
from sleep_jax.mesh import make_mesh
from sleep_jax.models import ModelConfig, create_model
from sleep_jax.train.loss import cross_entropy
from sleep_jax.train.state import apply_gradients, create_train_state

SRC = ModelConfig(vocab=64, embed=16, mlp=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                  expert_rank=4, max_seq_len=64)
# One device: these are value checks of the optimizer rules; growth onto sharded meshes is
# tested in test_grow_ops.py (an 8-device mesh took 3x longer to compile on 2 cores).
DEVICES = jax.devices()[:1]
B, T = 4, 8


def _loss(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits = model(tokens, positions)[0]
    s, c = cross_entropy(logits[:, :-1], tokens[:, 1:], jnp.ones_like(tokens[:, 1:], bool))
    return s / c


_LOSS = nnx.jit(_loss)
_GRAD = nnx.jit(nnx.grad(_loss))


def _params_grad(state, tokens):
    return nnx.state(_GRAD(state.model(), tokens), nnx.Param)


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh("data=1", devices=DEVICES)
    state = create_train_state(create_model(SRC, mesh=mesh, seed=0), optax.adamw(1e-2))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, SRC.vocab)
    return mesh, state, tokens


def test_moments_follow_the_gradient_rule(setup):
    """Put g and g^2 in Adam's mu and nu, grow (experts, heads, FFN, width composed), and compare
    with the autodiff gradient of the grown model at the growth point."""
    mesh, state, tokens = setup
    g = _params_grad(state, tokens)
    adam = state.opt_state[0]
    state = state.replace(opt_state=(adam._replace(mu=g, nu=jax.tree.map(jnp.square, g)),
                                     *state.opt_state[1:]))
    dst = SRC.replace(expert_slots=2, heads=8, kv_heads=4, mlp=48, embed=32)
    grown, _ = grow(state, SRC, dst, mesh=mesh, rng=jax.random.key(2),
                    options=GrowOptions(noise=0.0))
    g2 = _params_grad(grown, tokens)
    mu, nu = grown.opt_state.inner[0].mu, grown.opt_state.inner[0].nu
    flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])
    want, got_mu, got_nu = flat(g2), flat(mu), flat(nu)
    for path, w in want.items():
        w = np.asarray(w)
        scale = float(np.abs(w).max()) or 1.0
        np.testing.assert_allclose(np.asarray(got_mu[path]), w, rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=f"first moment {jax.tree_util.keystr(path)}")
        np.testing.assert_allclose(np.asarray(got_nu[path]), w * w, rtol=2e-4,
                                   atol=1e-5 * scale ** 2,
                                   err_msg=f"second moment {jax.tree_util.keystr(path)}")
    # a wrong rule (plain copies, no 1/c or 1/n factors) would not match; the first copies:
    # embed repeats each dim in place (d -> 2d, 2d + 1), mlp tiles (f -> f, f + 32)
    gate_src = np.asarray(g["blocks"]["gate"][...])
    gate_new = np.asarray(g2["blocks"]["gate"][...])[:, ::2, :32]
    assert not np.allclose(gate_new, gate_src, rtol=1e-2)
    norm_new = np.asarray(g2["final_norm"][...])[::2]
    assert not np.allclose(norm_new, np.asarray(g["final_norm"][...]), rtol=1e-2)
    # a training step after growth lowers the loss
    before = float(_LOSS(grown.model(), tokens))
    after = float(_LOSS(apply_gradients(grown, g2).model(), tokens))
    assert before == pytest.approx(float(_LOSS(setup[1].model(), tokens)), rel=1e-5)
    assert after < before - 0.02, (before, after)


def _unit_activations(state, x):
    """SwiGLU units of layer 0 for inputs x [B, D]: silu(x gate) * (x up), [B, F]."""
    gate = state.params["blocks"]["gate"][...][0]
    up = state.params["blocks"]["up"][...][0]
    return np.asarray(jax.nn.silu(x @ gate) * (x @ up))


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_clones_stay_identical_without_noise_and_split_with_it(setup, noise):
    mesh, state, tokens = setup
    grown, _ = grow(state, SRC, SRC.replace(mlp=64), mesh=mesh, rng=jax.random.key(2),
                    options=GrowOptions(noise=noise))
    grown = apply_gradients(grown, _params_grad(grown, tokens))
    act = _unit_activations(grown, jax.random.normal(jax.random.key(4), (8, SRC.embed)))
    first, second = act[:, :32], act[:, 32:]
    diff = np.abs(first - second).max() / np.abs(first).max()
    if noise == 0:
        assert diff < 1e-5, f"clones diverged without noise ({diff:.2e})"
    else:
        assert diff > 1e-3, f"noise did not break the clones' symmetry ({diff:.2e})"


def test_masked_training_leaves_frozen_entries_bitwise(setup):
    mesh, state, tokens = setup
    trained = apply_gradients(state, _params_grad(state, tokens))  # nonzero moments, step 1
    grown, mask = grow(trained, SRC, SRC.replace(mlp=48, layers=3), mesh=mesh,
                       rng=jax.random.key(2), options=GrowOptions(mlp="zero", insert_at=(1,)))
    assert int(grown.step) == 1 and int(grown.opt_state.inner[0].count) == 1
    mu_old = np.asarray(trained.opt_state[0].mu["blocks"]["down"][...])
    mu_new = np.asarray(grown.opt_state.inner[0].mu["blocks"]["down"][...])
    np.testing.assert_array_equal(mu_new[[0, 2], :32], mu_old)  # layers 0, 1 -> 0, 2
    assert not mu_new[1].any() and not mu_new[:, 32:].any()  # new layer and units: zero
    stepped = apply_gradients(grown, _params_grad(grown, tokens), mask)
    moved = 0
    for a, b, m in zip(jax.tree.leaves(grown.params), jax.tree.leaves(stepped.params),
                       jax.tree.leaves(mask)):
        a, b = np.asarray(a), np.asarray(b)
        m = np.broadcast_to(np.asarray(m), a.shape)
        np.testing.assert_array_equal(b[~m], a[~m])
        moved += int(np.sum(b[m] != a[m]))
    assert moved > 0
    down_m = np.asarray(mask["blocks"]["down"][...])
    assert down_m[1].all() and down_m[:, 32:].all() and not down_m[0, :32].any()


def _random_grads(params, key):
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
                              for i, x in enumerate(leaves)])


# grown (expert_slots 0 -> 2, mlp 32 -> 48 zero-init) path -> (old entries, new entries)
_FFN = {"['blocks']['gate']": (np.s_[..., :32], np.s_[..., 32:]),
        "['blocks']['up']": (np.s_[..., :32], np.s_[..., 32:]),
        "['blocks']['down']": (np.s_[:, :32], np.s_[:, 32:])}
_NEW_LEAVES = ("['blocks']['expert_a']", "['blocks']['expert_b']")


def _old(path, x):
    return x[_FFN[path][0]] if path in _FFN else x


def _new(flat):
    out = {k: np.asarray(flat[k][...]) for k in _NEW_LEAVES}
    out.update({k: np.asarray(flat[k][...])[sl[1]] for k, sl in _FFN.items()})
    return out


def test_new_entries_get_their_own_adam_count(setup):
    """After T = 1000 AdamW steps (b2 = 0.999), grow expert slots 0 -> 2 and the FFN 32 -> 48
    (zero-init units), then take k = 10 steps on random gradients: the new entries must equal a
    fresh optax AdamW run on those entries alone, the old entries the source state continued on
    its own entries' gradients. The old behaviour (the global count for new entries) is the
    control: its first update is > 2x the fresh optimizer's."""
    mesh = setup[0]
    T, K = 1000, 10
    make_tx = lambda: optax.adamw(1e-3, b1=0.9, b2=0.999, weight_decay=1e-2)
    src = create_train_state(create_model(SRC, mesh=mesh, seed=0), make_tx())

    @jax.jit
    def warm(state):
        body = lambda i, s: apply_gradients(s, _random_grads(s.params, jax.random.key(i)))
        return jax.lax.fori_loop(0, T, body, state)

    src = warm(src)
    assert int(src.opt_state[0].count) == T
    dst = SRC.replace(expert_slots=2, mlp=48)
    grown, mask = grow(src, SRC, dst, mesh=mesh, rng=jax.random.key(2),
                       options=GrowOptions(mlp="zero"))
    assert isinstance(grown.tx, ClockedTransformation) and grown.tx.clocks == 2
    assert isinstance(grown.opt_state, EntryClockState)
    assert np.asarray(grown.opt_state.start).tolist() == [[0], [T]]
    clock, gmask = flatten(grown.opt_state.clock), flatten(mask)
    for k in (*_NEW_LEAVES, *_FFN):  # the new entries by hand == clock 1 == trainable mask
        want = np.zeros(clock[k].shape, bool)
        want[_FFN[k][1] if k in _FFN else np.s_[...]] = True
        np.testing.assert_array_equal(np.asarray(clock[k][...]) == 1, want, err_msg=k)
        np.testing.assert_array_equal(np.broadcast_to(np.asarray(gmask[k][...]), want.shape),
                                      want, err_msg=k)
    assert not any(np.asarray(v[...]).any() for k, v in clock.items()
                   if k not in _NEW_LEAVES and k not in _FFN)

    step = jax.jit(apply_gradients)
    keys = [jax.random.key(10_000 + t) for t in range(K)]
    # the reference for new entries: a fresh optax AdamW on them alone
    ref_tx = make_tx()
    ref_p = _new(flatten(grown.params))
    ref_opt = ref_tx.init(ref_p)
    ref_first = None
    state, old_ref = grown, src
    for t, key in enumerate(keys):
        g = _random_grads(state.params, key)
        g_flat = flatten(g)
        g_new = {k: jnp.asarray(v) for k, v in _new(g_flat).items()}
        upd, ref_opt = ref_tx.update(g_new, ref_opt, ref_p)
        if t == 0:
            ref_first = upd
            plain = grown.replace(tx=grown.tx.inner, opt_state=grown.opt_state.inner)
            plain_first = _new(flatten(step(plain, g).params))
        ref_p = optax.apply_updates(ref_p, upd)
        state = step(state, g)
        old_g = rebuild(old_ref.params, lambda k, v, g_flat=g_flat: _old(k, g_flat[k][...]))
        old_ref = step(old_ref, old_g)
    got = flatten(state.params)
    got_new = _new(got)
    for k, want in ref_p.items():
        np.testing.assert_allclose(got_new[k], np.asarray(want), rtol=1e-6, atol=1e-7,
                                   err_msg=f"new entries of {k}")
    for k, v in flatten(old_ref.params).items():
        np.testing.assert_allclose(np.asarray(_old(k, got[k][...])), np.asarray(v[...]),
                                   rtol=1e-6, atol=1e-7, err_msg=f"old entries of {k}")
    # the control: with the global count the new entries' first step is mis-scaled
    start = _new(flatten(grown.params))
    ratio = (sum(np.abs(plain_first[k] - start[k]).sum() for k in start)
             / sum(np.abs(np.asarray(u)).sum() for u in ref_first.values()))
    assert ratio > 2.0, f"global-count update / fresh update = {ratio:.3f}"


def test_second_growth_adds_a_clock(setup):
    """Growing a clocked state again adds a third clock for the newest entries only: one step
    after growing expert slots 2 -> 3 the new slot moves like a fresh AdamW, the slots of the
    first growth keep theirs; a clocked state with a plain tx is refused."""
    mesh = setup[0]
    make_tx = lambda: optax.adam(1e-3, b2=0.999)
    src = create_train_state(create_model(SRC, mesh=mesh, seed=0), make_tx())
    step = jax.jit(apply_gradients)
    for t in range(3):
        src = step(src, _random_grads(src.params, jax.random.key(t)))
    one = SRC.replace(expert_slots=2)
    grown, _ = grow(src, SRC, one, mesh=mesh, rng=jax.random.key(2))
    for t in range(2):
        grown = step(grown, _random_grads(grown.params, jax.random.key(10 + t)))
    with pytest.raises(ValueError, match="entry_clocks"):
        grow(grown.replace(tx=make_tx()), one, one.replace(expert_slots=3), mesh=mesh,
             rng=jax.random.key(3))
    again, _ = grow(grown, one, one.replace(expert_slots=3), mesh=mesh, rng=jax.random.key(3))
    assert again.tx.clocks == 3
    assert np.asarray(again.opt_state.start).tolist() == [[0], [3], [5]]
    c = np.asarray(again.opt_state.clock["blocks"]["expert_b"][...])
    assert (c[:, :2] == 1).all() and (c[:, 2] == 2).all()
    g = _random_grads(again.params, jax.random.key(99))
    out = step(again, g)
    for name in ("expert_a", "expert_b"):
        p0 = again.params["blocks"][name][...][:, 2]
        gn = g["blocks"][name][...][:, 2]
        ref_tx = make_tx()
        upd, _ = ref_tx.update(gn, ref_tx.init(p0), p0)
        np.testing.assert_allclose(np.asarray(out.params["blocks"][name][...][:, 2]),
                                   np.asarray(p0 + upd), rtol=1e-6, atol=1e-7)
    # the first growth's slots: their own (third) step from their moments
    mu = again.opt_state.inner[0].mu["blocks"]["expert_a"][...][:, :2]
    nu = again.opt_state.inner[0].nu["blocks"]["expert_a"][...][:, :2]
    gn = g["blocks"]["expert_a"][...][:, :2]
    mu1, nu1 = 0.9 * mu + 0.1 * gn, 0.999 * nu + 0.001 * gn * gn
    want = (again.params["blocks"]["expert_a"][...][:, :2]
            - 1e-3 * (mu1 / (1 - 0.9 ** 3)) / (jnp.sqrt(nu1 / (1 - 0.999 ** 3)) + 1e-8))
    np.testing.assert_allclose(np.asarray(out.params["blocks"]["expert_a"][...][:, :2]),
                               np.asarray(want), rtol=2e-5, atol=1e-7)
    assert entry_clocks(make_tx(), 3).init(again.params).start.shape == (3, 1)


def test_activated_slot_gets_its_own_adam_count(setup):
    """activate_slot on a live state zeroes the slot's moments after T = 50 steps; from then on
    the slot moves exactly like a fresh optax Adam on it alone, and every other entry moves as
    the state without the activation does (Adam's update does not read the weights)."""
    from sleep_jax.grow import activate_slot

    mesh = setup[0]
    T, K = 50, 3
    make_tx = lambda: optax.adam(1e-3, b2=0.999)
    src = create_train_state(create_model(SRC.replace(expert_slots=2), mesh=mesh, seed=0),
                             make_tx())
    step = jax.jit(apply_gradients)
    for t in range(T):
        src = step(src, _random_grads(src.params, jax.random.key(t)))
    state, _ = activate_slot(src, None, 0, jax.random.key(7))
    assert state.tx.clocks == 2 and np.asarray(state.opt_state.start).tolist() == [[0], [T]]
    ref_tx = make_tx()
    names = ("expert_a", "expert_b")
    ref_p = {n: state.params["blocks"][n][...][:, 0] for n in names}
    ref_opt = ref_tx.init(ref_p)
    start, other0 = flatten(state.params), flatten(src.params)
    other = src
    for t in range(K):
        g = _random_grads(state.params, jax.random.key(1000 + t))
        upd, ref_opt = ref_tx.update({n: g["blocks"][n][...][:, 0] for n in names}, ref_opt)
        ref_p = optax.apply_updates(ref_p, upd)
        state, other = step(state, g), step(other, g)
    for n in names:
        np.testing.assert_allclose(np.asarray(state.params["blocks"][n][...][:, 0]),
                                   np.asarray(ref_p[n]), rtol=1e-6, atol=1e-7, err_msg=n)
    got, want = flatten(state.params), flatten(other.params)
    for k in got:  # every other entry: the same step as without the activation
        d_got = np.asarray(got[k][...]) - np.asarray(start[k][...])
        d_want = np.asarray(want[k][...]) - np.asarray(other0[k][...])
        if k.endswith(("['expert_a']", "['expert_b']")):
            d_got, d_want = d_got[:, 1:], d_want[:, 1:]
        np.testing.assert_allclose(d_got, d_want, rtol=1e-5, atol=1e-9, err_msg=k)


@pytest.mark.parametrize("text, field", [
    ("head_dim=16", "head_dim"), ("vocab=128", "vocab"), ("layers=1", "layers"),
    ("bogus=3", "bogus"), ("embed=abc", "embed"), ("rope_theta=5", "rope_theta"),
    ("mlp", "mlp"),
])
def test_bad_overrides_name_the_field(text, field):
    with pytest.raises(ValueError, match=field):
        target_config(SRC, text)


def test_bad_operator_sizes_name_the_field():
    with pytest.raises(ValueError, match="embed"):
        plan_growth(SRC, SRC.replace(embed=24))  # replication needs a multiple
    with pytest.raises(ValueError, match="heads"):
        plan_growth(SRC, SRC.replace(heads=4, kv_heads=4))  # fewer heads per group
    with pytest.raises(ValueError, match="insert_at"):
        plan_growth(SRC, SRC.replace(layers=4), GrowOptions(insert_at=(0, 9)))
    with pytest.raises(ValueError, match="width"):
        GrowOptions(width="wide")
