"""The L2-SP pull toward the initial parameters (sleep_jax/train/optim.py pull_to_init)
against a hand-written SGD reference, and its place in make_optimizer."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sleep_jax.train.optim import OptimConfig, make_optimizer, pull_to_init


def test_pull_adds_strength_times_the_distance_to_the_initial_parameters():
    lam, lr = 0.5, 0.1
    p0 = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
    tx = optax.chain(pull_to_init(lam), optax.sgd(lr))
    state = tx.init(p0)
    grads = [{"w": jnp.array([0.2, 0.4]), "b": jnp.array(-1.0)},
             {"w": jnp.array([-0.1, 0.0]), "b": jnp.array(0.5)}]
    p = p0
    ref = {k: np.asarray(v, np.float64) for k, v in p0.items()}
    for g in grads:
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
        # by hand: theta <- theta - lr * (g + lam * (theta - theta_0))
        ref = {k: ref[k] - lr * (np.asarray(g[k]) + lam * (ref[k] - np.asarray(p0[k])))
               for k in ref}
    for k in ref:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-6)
    with pytest.raises(ValueError, match="needs the parameters"):
        pull_to_init(lam).update(grads[0], pull_to_init(lam).init(p0))


def test_make_optimizer_pulls_only_when_asked():
    p0 = {"w": jnp.ones(3)}
    plain = make_optimizer(OptimConfig(lr=1e-2, weight_decay=0.0), 10)
    pulled = make_optimizer(OptimConfig(lr=1e-2, weight_decay=0.0, pull_to_init=2.0), 10)
    assert len(pulled.init(p0)) == len(plain.init(p0)) + 1
    # at the initial parameters the pull is zero: the first updates agree
    g = {"w": jnp.array([0.1, -0.2, 0.3])}
    u1, _ = plain.update(g, plain.init(p0), p0)
    u2, _ = pulled.update(g, pulled.init(p0), p0)
    np.testing.assert_allclose(np.asarray(u1["w"]), np.asarray(u2["w"]), rtol=1e-6)
