"""Divergences against a float64 numpy brute force, finite-difference gradients, JSD limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.distill import divergences as dv


# ---------------------------------------------------------------- numpy reference (float64)
def _softmax(x, tau):
    z = np.asarray(x, np.float64) / tau
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _kl_np(p, q):
    return np.sum(p * np.log(p / q), axis=-1)


def ref_per_token(name, s, t, beta=0.5, tau=1.0):
    ps, pt = _softmax(s, tau), _softmax(t, tau)
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return _kl_np(pt, ps)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return _kl_np(ps, pt)
    m = beta * pt + (1 - beta) * ps  # mixture in probability space, not log space
    return beta * _kl_np(pt, m) + (1 - beta) * _kl_np(ps, m)


def ref_reduced(name, s, t, mask, beta=0.5, tau=1.0):
    per = ref_per_token(name, s, t, beta, tau)
    return float(np.sum(per * mask)), float(np.sum(mask))


def _logits(seed, shape=(2, 4, 6), scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale).astype(np.float32)


MASK = np.array([[1, 1, 0, 1], [0, 1, 1, 0]], np.float32)
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9),
         ("jsd", 0.0), ("jsd", 1.0)]


@pytest.mark.parametrize("name,beta", CASES)
@pytest.mark.parametrize("tau", [1.0, 0.7, 2.5])
def test_matches_numpy_brute_force(name, beta, tau):
    s, t = _logits(0), _logits(1)
    per = dv.get_per_token(name, beta=beta, temperature=tau)(jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(per), ref_per_token(name, s, t, beta, tau),
                               rtol=2e-5, atol=1e-6)
    total, count = dv.divergence(name, jnp.asarray(s), jnp.asarray(t), jnp.asarray(MASK),
                                 beta=beta, temperature=tau)
    ref_total, ref_count = ref_reduced(name, s, t, MASK, beta, tau)
    assert float(count) == ref_count == 5.0
    np.testing.assert_allclose(float(total), ref_total, rtol=2e-5, atol=1e-6)


def test_named_functions_and_bool_mask_agree_with_registry():
    s, t = jnp.asarray(_logits(2)), jnp.asarray(_logits(3))
    mask = jnp.asarray(MASK.astype(bool))
    for name, fn in (("forward_kl", dv.forward_kl), ("reverse_kl", dv.reverse_kl)):
        a, b = fn(s, t, mask, temperature=1.3), dv.divergence(name, s, t, mask, temperature=1.3)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    a = dv.jsd(s, t, mask, beta=0.3)
    b = dv.get_divergence("jsd", beta=0.3)(s, t, mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(dv.DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd"}


def test_end_points_are_the_kls_exactly():
    s, t = jnp.asarray(_logits(4)), jnp.asarray(_logits(5))
    np.testing.assert_array_equal(np.asarray(dv.jsd_per_token(s, t, beta=0.0)),
                                  np.asarray(dv.forward_kl_per_token(s, t)))
    np.testing.assert_array_equal(np.asarray(dv.jsd_per_token(s, t, beta=1.0)),
                                  np.asarray(dv.reverse_kl_per_token(s, t)))
    # the two KLs differ here, so the end points are really distinguished
    assert not np.allclose(np.asarray(dv.forward_kl_per_token(s, t)),
                           np.asarray(dv.reverse_kl_per_token(s, t)), rtol=1e-2)


def test_jsd_limits_towards_the_kls():
    """GKD: JSD(beta)/beta -> KL(p_T||p_S) as beta -> 0, JSD(beta)/(1-beta) -> KL(p_S||p_T) as
    beta -> 1; the error shrinks linearly in beta (checked at two betas, in float64)."""
    with jax.enable_x64(True):
        s = jnp.asarray(_logits(6).astype(np.float64))
        t = jnp.asarray(_logits(7).astype(np.float64))
        fkl, rkl = np.asarray(dv.forward_kl_per_token(s, t)), np.asarray(
            dv.reverse_kl_per_token(s, t))
        errs_f, errs_r = [], []
        for eps in (1e-3, 1e-5):
            errs_f.append(np.max(np.abs(np.asarray(dv.jsd_per_token(s, t, beta=eps)) / eps - fkl)))
            errs_r.append(np.max(np.abs(
                np.asarray(dv.jsd_per_token(s, t, beta=1 - eps)) / eps - rkl)))
    assert errs_f[1] < 1e-3 * np.max(fkl) and errs_r[1] < 1e-3 * np.max(rkl), (errs_f, errs_r)
    assert errs_f[1] < errs_f[0] / 10 and errs_r[1] < errs_r[0] / 10, (errs_f, errs_r)


@pytest.mark.parametrize("name,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_gradients_match_finite_differences_and_skip_the_teacher(name, beta):
    tau = 1.7
    s = _logits(8, shape=(1, 3, 5)).astype(np.float64)
    t = _logits(9, shape=(1, 3, 5)).astype(np.float64)
    mask = np.array([[1.0, 0.0, 1.0]])

    def ref_loss(x):
        return ref_reduced(name, x, t, mask, beta, tau)[0]

    fd = np.zeros_like(s)
    h = 1e-6
    for idx in np.ndindex(s.shape):
        e = np.zeros_like(s)
        e[idx] = h
        fd[idx] = (ref_loss(s + e) - ref_loss(s - e)) / (2 * h)
    with jax.enable_x64(True):
        def loss(sl, tl):
            return dv.divergence(name, sl, tl, jnp.asarray(mask), beta=beta, temperature=tau)[0]

        g_s, g_t = jax.grad(loss, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
        g_s, g_t = np.asarray(g_s), np.asarray(g_t)
    np.testing.assert_allclose(g_s, fd, rtol=1e-5, atol=1e-8)
    assert np.all(g_s[0, 1] == 0.0)  # masked-out position
    assert np.abs(g_s).max() > 1e-2
    np.testing.assert_array_equal(g_t, 0.0)  # stop_gradient on the teacher


def test_fp32_gradient_close_to_float64():
    s, t = _logits(10), _logits(11)
    mask = jnp.asarray(MASK)

    def loss(x):
        return dv.jsd(x, jnp.asarray(t), mask, beta=0.5)[0]

    g32 = np.asarray(jax.grad(loss)(jnp.asarray(s)))
    with jax.enable_x64(True):
        g64 = np.asarray(jax.grad(lambda x: dv.jsd(x, jnp.asarray(t, jnp.float64),
                                                   jnp.asarray(MASK, jnp.float64))[0])(
            jnp.asarray(s, jnp.float64)))
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-6)


def test_identical_distributions_give_zero_and_large_logits_stay_finite():
    s = jnp.asarray(_logits(12, scale=50.0))  # peaked distributions, probabilities near 0 and 1
    for name in dv.DIVERGENCES:
        per = np.asarray(dv.get_per_token(name)(s, s))
        np.testing.assert_allclose(per, 0.0, atol=1e-5)
        per = np.asarray(dv.get_per_token(name, beta=0.2)(s, jnp.asarray(_logits(13, scale=50.0))))
        assert np.all(np.isfinite(per)) and np.all(per >= -1e-5)


def test_neg_inf_logits_shared_by_both_sides_are_ignored():
    s, t = _logits(14), _logits(15)
    s[..., 0] = -np.inf
    t[..., 0] = -np.inf
    for name in dv.DIVERGENCES:
        got = np.asarray(dv.get_per_token(name, beta=0.4)(jnp.asarray(s), jnp.asarray(t)))
        want = ref_per_token(name, s[..., 1:], t[..., 1:], 0.4)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
        g = jax.grad(lambda x, n=name: dv.divergence(n, x, jnp.asarray(t), jnp.asarray(MASK),
                                                     beta=0.4)[0])(jnp.asarray(s))
        assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[..., 0] == 0.0), name


def test_jit_bf16_and_no_recompile():
    fn = jax.jit(dv.get_divergence("jsd", beta=0.5, temperature=2.0))
    s, t = jnp.asarray(_logits(16)), jnp.asarray(_logits(17))
    mask = jnp.asarray(MASK)
    out = fn(s, t, mask)
    fn(s + 1.0, t, mask)
    assert fn._cache_size() == 1
    out16 = fn(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), mask)
    assert out16[0].dtype == jnp.float32
    np.testing.assert_allclose(float(out16[0]), float(out[0]), rtol=5e-2)


def test_bad_arguments_raise():
    s = jnp.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        dv.get_divergence("kl")
    with pytest.raises(ValueError, match="beta must be in"):
        dv.jsd_per_token(s, s, beta=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        dv.forward_kl_per_token(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        dv.reverse_kl_per_token(s, jnp.zeros((1, 2, 4)))
    with pytest.raises(ValueError, match="mask must have shape"):
        dv.forward_kl(s, s, jnp.ones((2, 1)))
    with pytest.raises(TypeError, match="concrete Python number"):
        jax.jit(lambda b: dv.jsd_per_token(s, s, beta=b))(0.5)
