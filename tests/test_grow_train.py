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
from sleep_jax.mesh import make_mesh
from sleep_jax.models import ModelConfig, create_model
from sleep_jax.train.loss import cross_entropy
from sleep_jax.train.state import apply_gradients, create_train_state

SRC = ModelConfig(vocab=64, embed=16, mlp=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                  expert_rank=4, max_seq_len=64)
MESH = "data=2,fsdp=2,tensor=2"
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
    mesh = make_mesh(MESH)
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
    mu, nu = grown.opt_state[0].mu, grown.opt_state[0].nu
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
    # a wrong rule (plain copies, no 1/c or 1/n factors) would not match
    gate_src = np.asarray(g["blocks"]["gate"][...])
    gate_new = np.asarray(g2["blocks"]["gate"][...])[:, :16, :32]
    assert not np.allclose(gate_new, gate_src, rtol=1e-2)
    norm_new = np.asarray(g2["final_norm"][...])[:16]
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
    assert int(grown.step) == 1 and int(grown.opt_state[0].count) == 1
    mu_old = np.asarray(trained.opt_state[0].mu["blocks"]["down"][...])
    mu_new = np.asarray(grown.opt_state[0].mu["blocks"]["down"][...])
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
