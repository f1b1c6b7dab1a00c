"""The KV-cache sampler and teacher scoring against uncached forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax.mesh import make_mesh
from sleep_jax.models import create_model, get_preset
from sleep_jax.sampling import filter_logits, generate, score

CFG = get_preset("tiny", vocab=48, embed=32, mlp=64, layers=2, heads=4, kv_heads=2,
                 head_dim=8)


@pytest.fixture(scope="module")
def model():
    m = create_model(CFG, seed=0)
    graphdef, state = nnx.split(m)  # sharper than the default init: greedy paths differ
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 5.0, state))


def _prompts(lengths, P, seed=0):
    rng = np.random.default_rng(seed)
    toks = np.zeros((len(lengths), P), np.int32)
    for i, n in enumerate(lengths):
        toks[i, :n] = rng.integers(3, CFG.vocab, n)
    return jnp.asarray(toks), jnp.asarray(lengths, jnp.int32)


@jax.jit(static_argnums=0)
def _last_logits(graphdef, state, seq, n):
    """Uncached logits at position n-1 of one right-padded row [W] (one compile for every n:
    causal attention keeps the padding after n out of position n-1)."""
    logits = nnx.merge(graphdef, state)(seq[None], jnp.arange(seq.shape[0])[None])[0][0]
    return logits[n - 1]


def _greedy_reference(model, row, n_new, width=16):
    """Uncached: re-run the whole sequence (right-padded to ``width``) for every new token."""
    graphdef, state = nnx.split(model)
    seq = list(row)
    assert len(row) + n_new <= width
    logits_seen = []
    for _ in range(n_new):
        padded = jnp.asarray(seq + [0] * (width - len(seq)), jnp.int32)
        logits = _last_logits(graphdef, state, padded, len(seq))
        logits_seen.append(np.asarray(logits))
        seq.append(int(jnp.argmax(logits)))
    return seq[len(row):], logits_seen


@jax.jit(static_argnums=(0, 4, 5))
def _gen(graphdef, state, toks, lens, n, temperature):
    return generate(nnx.merge(graphdef, state), toks, lens, jax.random.key(0),
                    max_new_tokens=n, temperature=temperature)


def test_greedy_equals_uncached_argmax_and_padded_rows_equal_rows_alone(model):
    lengths = [5, 2, 7]
    toks, lens = _prompts(lengths, 8)
    g, s = nnx.split(model)
    out = _gen(g, s, toks, lens, 6, 0.0)
    assert out.tokens.shape == (3, 6) and bool(out.mask.all())
    for b, n in enumerate(lengths):
        ref, ref_logits = _greedy_reference(model, np.asarray(toks[b, :n]), 6)
        assert list(np.asarray(out.tokens[b])) == ref
        # log-probs of greedy tokens = log_softmax of the uncached logits
        lp = [jax.nn.log_softmax(lg)[t] for lg, t in zip(ref_logits, ref)]
        np.testing.assert_allclose(np.asarray(out.logprobs[b]), lp, rtol=1e-4, atol=1e-5)
        alone = _gen(g, s, toks[b:b + 1], lens[b:b + 1], 6, 0.0)  # no other rows beside it
        assert list(np.asarray(alone.tokens[0])) == ref
    # a second call with the same shapes does not recompile
    size = _gen._cache_size()
    _gen(g, s, toks + 1, lens, 6, 0.0)
    assert _gen._cache_size() == size


def test_eos_stops_rows_and_pads(model):
    toks, lens = _prompts([4, 6], 6, seed=3)
    free = generate(model, toks, lens, jax.random.key(0), max_new_tokens=5, temperature=0.0)
    eos = int(free.tokens[0, 1])  # make row 0's second token the EOS
    out = generate(model, toks, lens, jax.random.key(0), max_new_tokens=5, temperature=0.0,
                   eos_id=eos, pad_id=0)
    row = np.asarray(out.tokens[0])
    first = int(np.argmax(row == eos))
    assert first <= 1
    assert np.all(np.asarray(out.mask[0])[:first + 1])
    assert not np.any(np.asarray(out.mask[0])[first + 1:])
    assert np.all(row[first + 1:] == 0)
    assert int(out.lengths[0]) == first + 1


def test_score_equals_log_softmax_gather(model):
    toks, lens = _prompts([3, 6], 6, seed=5)
    comp = jnp.asarray([[7, 8, 9, 0], [10, 11, 0, 0]], jnp.int32)
    cmask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    lp = np.asarray(score(model, toks, lens, comp, cmask, temperature=0.7))
    for b, n in enumerate([3, 6]):
        c = [int(x) for x, m in zip(comp[b], cmask[b]) if m]
        seq = list(np.asarray(toks[b, :n])) + c
        logits = model(jnp.asarray([seq]), jnp.arange(len(seq))[None])[0][0]
        ref = [jax.nn.log_softmax(logits[n - 1 + i] / 0.7)[t] for i, t in enumerate(c)]
        np.testing.assert_allclose(lp[b, :len(c)], ref, rtol=1e-4, atol=1e-5)
        assert np.all(lp[b, len(c):] == 0)


def test_filter_logits_top_k_and_top_p_against_numpy():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    k2 = np.asarray(filter_logits(logits, top_k=2))
    assert np.isfinite(k2[0, :2]).all() and (k2[0, 2:] < -1e30).all()
    # nucleus: smallest set with mass >= 0.8 = {0.5, 0.2, 0.15} (0.85)
    p = np.asarray(filter_logits(logits, top_p=0.8))
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    order = np.argsort(-probs)
    keep = order[:np.searchsorted(np.cumsum(probs[order]), 0.8) + 1]
    assert set(np.flatnonzero(p[0] > -1e30)) == set(keep)
    # sampling with top-p never leaves the nucleus
    draws = jax.random.categorical(jax.random.key(0), filter_logits(
        jnp.repeat(logits, 2000, 0), top_p=0.8), axis=-1)
    assert set(np.unique(np.asarray(draws))) <= set(keep)


def test_top_k_one_equals_greedy_and_sharded_equals_unsharded(model):
    toks, lens = _prompts([5, 3, 4, 2, 6, 1, 3, 4], 6, seed=7)
    greedy = generate(model, toks, lens, jax.random.key(0), max_new_tokens=4, temperature=0.0)
    k1 = generate(model, toks, lens, jax.random.key(1), max_new_tokens=4, temperature=1.3,
                  top_k=1)
    assert np.array_equal(np.asarray(greedy.tokens), np.asarray(k1.tokens))
    mesh = make_mesh("data=2,tensor=4")
    sharded = create_model(CFG, mesh=mesh, seed=0)
    g, s = nnx.split(sharded)
    s = jax.tree.map(lambda x: x * 5.0, s)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda s, t, n: generate(nnx.merge(g, s), t, n, jax.random.key(0),
                                               max_new_tokens=4, temperature=0.0))(s, toks,
                                                                                   lens)
    assert np.array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))


def test_token_logprobs_live_with_sampling_not_training():
    """sampling.py and rl/rollout.py import nothing from sleep_jax.train (read from their
    source), importing sleep_jax.sampling loads no training module, and train.loss re-exports
    the same function; its values are numpy's log-softmax gather at the temperature."""
    import ast
    import os
    import subprocess
    import sys

    import sleep_jax.sampling as sampling
    import sleep_jax.train.loss as train_loss

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for rel in ("sleep_jax/sampling.py", "sleep_jax/rl/rollout.py"):
        with open(os.path.join(root, rel)) as f:
            tree = ast.parse(f.read())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert "sleep_jax.sampling" in names or rel.endswith("sampling.py")
        assert not [m for m in names if m.startswith("sleep_jax.train")], (rel, names)
    code = ("import sys, sleep_jax.sampling; "
            "print([m for m in sys.modules if m.startswith('sleep_jax.train')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert train_loss.token_logprobs is sampling.token_logprobs

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    tgt = rng.integers(0, 5, (2, 3))
    z = logits / 0.7
    want = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - z.max(-1, keepdims=True)
    want = np.take_along_axis(want, tgt[..., None], -1)[..., 0]
    got = sampling.token_logprobs(jnp.asarray(logits), jnp.asarray(tgt), 0.7)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
