"""Foreign Flax models (an NNX module and a Linen module) run through the sampler and scoring."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax.models import Decoder
from sleep_jax.models.protocol import CausalLM, RecomputeLM, linen_lm
from sleep_jax.sampling import generate, score

V, D = 24, 16


def _causal_attend(x, pos_mask):
    """Single-head causal attention over x [B,T,D] with key mask [B,T]."""
    T = x.shape[1]
    s = jnp.einsum("btd,bsd->bts", x, x) / np.sqrt(x.shape[-1])
    allowed = (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None] & pos_mask[:, None, :]
    s = jnp.where(allowed, s, -1e30)
    return jnp.einsum("bts,bsd->btd", jax.nn.softmax(s, -1), x)


class TinyNNX(nnx.Module):
    """A user's own NNX LM with its own signature: logits only, no cache."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(V, D, rngs=rngs)
        self.pos = nnx.Embed(64, D, rngs=rngs)
        self.out = nnx.Linear(D, V, rngs=rngs)

    def logits(self, tokens, positions, mask):
        x = self.emb(tokens) + self.pos(positions)
        return self.out(x + _causal_attend(x, mask)) * 4.0


class TinyLinen(nn.Module):
    @nn.compact
    def __call__(self, tokens, positions, mask):
        x = nn.Embed(V, D)(tokens) + nn.Embed(64, D)(positions)
        return nn.Dense(V)(x + _causal_attend(x, mask)) * 4.0


def _models():
    nnx_lm = RecomputeLM(TinyNNX(nnx.Rngs(0)), lambda m, t, p, k: m.logits(t, p, k))
    linen = linen_lm(TinyLinen(), jnp.zeros((1, 4), jnp.int32), rngs=nnx.Rngs(1))
    return {"nnx": nnx_lm, "linen": linen}


W = 16  # the uncached reference's padded width: one compile for every length (causal models)


@jax.jit(static_argnums=0)
def _logits(graphdef, state, row):
    """Uncached logits [W,V] of one right-padded row [W]."""
    return nnx.merge(graphdef, state)(row[None], jnp.arange(W)[None])[0][0]


def _reference_logits(model, seq):
    """Logits [n,V] of the sequence ``seq`` (n <= W) without a cache; causal models never let a
    position < n see the padding after it."""
    g, s = nnx.split(model)
    padded = np.zeros((W,), np.int32)
    padded[: len(seq)] = seq
    return _logits(g, s, jnp.asarray(padded))[: len(seq)]


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_foreign_model_greedy_and_score(kind):
    model = _models()[kind]
    assert isinstance(model, CausalLM)
    toks = jnp.asarray([[3, 5, 7, 0], [9, 2, 0, 0]], jnp.int32)
    lens = jnp.asarray([3, 2], jnp.int32)
    out = generate(model, toks, lens, jax.random.key(0), max_new_tokens=5, temperature=0.0)
    for b in range(2):
        seq = [int(x) for x in toks[b, :int(lens[b])]]
        for _ in range(5):  # uncached reference: the whole sequence every step
            seq.append(int(jnp.argmax(_reference_logits(model, seq)[-1])))
        assert [int(x) for x in out.tokens[b]] == seq[int(lens[b]):]
    comp = out.tokens
    lp = np.asarray(score(model, toks, lens, comp, out.mask))
    for b in range(2):
        n = int(lens[b])
        seq = [int(x) for x in toks[b, :n]] + [int(x) for x in comp[b]]
        logp = jax.nn.log_softmax(_reference_logits(model, seq), -1)
        ref = [float(logp[n - 1 + i, int(c)]) for i, c in enumerate(comp[b])]
        np.testing.assert_allclose(lp[b], ref, rtol=1e-5, atol=1e-5)


def test_our_decoder_satisfies_the_protocol(tiny_model):
    assert isinstance(tiny_model, CausalLM)
    assert isinstance(tiny_model, Decoder)


# The README's / protocol docstring's RecomputeLM example, verbatim: mask is passed through.
README_FN = "fn=lambda m, tokens, positions, mask: m(tokens, positions, mask)"


class MyLM(nnx.Module):
    """The docstring's MyLM: __call__(tokens, positions, mask), causal, ignores masked keys."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(V, D, rngs=rngs)
        self.pos = nnx.Embed(64, D, rngs=rngs)
        self.out = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tokens, positions, mask):
        x = self.emb(tokens) + self.pos(positions)
        return self.out(x + _causal_attend(x, mask)) * 4.0

    def no_mask(self, tokens):
        """The old README example's call, m(tokens): positions 0.., every key attended."""
        T = tokens.shape[1]
        return self(tokens, jnp.broadcast_to(jnp.arange(T), tokens.shape),
                    jnp.ones(tokens.shape, bool))


# Right-padded prompts; the padding holds junk ids (the sampler must not depend on them).
PROMPTS = np.asarray([[3, 5, 7, 11, 17, 17], [9, 2, 17, 17, 17, 17], [4, 6, 8, 10, 12, 1]],
                     np.int32)
LENGTHS = np.asarray([4, 2, 6], np.int32)


def _padded_vs_alone(lm, M=5):
    """(batch greedy tokens, logprobs, scores) per row and the same for each row run alone."""
    out = generate(lm, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS), jax.random.key(0),
                   max_new_tokens=M, temperature=0.0)
    sc = score(lm, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS), out.tokens, out.mask)
    rows = []
    for b, n in enumerate(LENGTHS):
        p = jnp.asarray(PROMPTS[b:b + 1, :n])
        alone = generate(lm, p, jnp.asarray([n]), jax.random.key(0), max_new_tokens=M,
                         temperature=0.0)
        alone_sc = score(lm, p, jnp.asarray([n]), alone.tokens, alone.mask)
        rows.append(((np.asarray(out.tokens[b]), np.asarray(out.logprobs[b]),
                      np.asarray(sc[b])),
                     (np.asarray(alone.tokens[0]), np.asarray(alone.logprobs[0]),
                      np.asarray(alone_sc[0]))))
    return rows


@pytest.mark.parametrize("fn", ["readme", "mask_dropped"])
def test_recompute_lm_padded_rows_equal_rows_alone(fn):
    from sleep_jax.models import protocol

    assert README_FN in protocol.__doc__  # the test runs what the docs show
    module = MyLM(rngs=nnx.Rngs(0))
    if fn == "readme":
        lm = RecomputeLM(module, fn=lambda m, tokens, positions, mask: m(tokens, positions, mask),
                         config=None)
    else:  # the old README example, which dropped mask: now safe too (valid tokens first)
        lm = RecomputeLM(module, fn=lambda m, tokens, positions, mask: m.no_mask(tokens))
    for b, ((toks, lps, sc), (toks1, lps1, sc1)) in enumerate(_padded_vs_alone(lm)):
        assert toks.tolist() == toks1.tolist(), f"row {b}"
        np.testing.assert_allclose(lps, lps1, rtol=1e-5, atol=1e-5, err_msg=f"row {b}")
        np.testing.assert_allclose(sc, sc1, rtol=1e-5, atol=1e-5, err_msg=f"row {b}")
        np.testing.assert_allclose(sc, lps, rtol=1e-5, atol=1e-5, err_msg=f"row {b}")


class _GappyRecomputeLM(RecomputeLM):
    """RecomputeLM before the valid-first reordering: fn sees the padding between prompt and
    sampled tokens."""

    def _run(self, tokens, positions, mask):
        out = self.fn(self.module, tokens, positions, mask)
        return out if isinstance(out, tuple) else (out, None)


def test_mask_dropped_without_reordering_changes_padded_rows():
    """Negative control: the test above detects the bug it guards against."""
    lm = _GappyRecomputeLM(MyLM(rngs=nnx.Rngs(0)),
                           fn=lambda m, tokens, positions, mask: m.no_mask(tokens))
    rows = _padded_vs_alone(lm)
    (_, lps, _), (_, lps1, _) = rows[1]  # row 1 has 4 padding slots before its sampled tokens
    assert np.max(np.abs(lps - lps1)) > 1e-3
    (toks, lps, _), (toks1, lps1, _) = rows[2]  # row 2 has no padding: unaffected
    assert toks.tolist() == toks1.tolist()
    np.testing.assert_allclose(lps, lps1, rtol=1e-5, atol=1e-5)


def test_forward_returns_one_struct_and_checks_capabilities(tiny_model, tiny_cfg):
    from sleep_jax.grow import grow_model
    from sleep_jax.mesh import make_mesh
    from sleep_jax.models.protocol import EXPERTS, HIDDEN, LMOutput, capabilities, forward

    tokens = jax.random.randint(jax.random.key(3), (2, 6), 0, tiny_cfg.vocab)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    logits, _, hidden = tiny_model(tokens, positions, return_hidden=True)
    out = forward(tiny_model, tokens, positions, hidden=True)
    assert isinstance(out, LMOutput) and out.experts is None
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(out.hidden), np.asarray(hidden))
    assert capabilities(tiny_model) == {HIDDEN}  # no expert slots: no expert activity
    with pytest.raises(ValueError, match="does not declare the 'experts' capability"):
        forward(tiny_model, tokens, positions, experts=True)
    dst = tiny_cfg.replace(expert_slots=2, expert_rank=4)
    grown, _ = grow_model(tiny_model, tiny_cfg, dst, mesh=make_mesh("fsdp=1", jax.devices()[:1]),
                          rng=jax.random.key(0))
    assert capabilities(grown) == {HIDDEN, EXPERTS}
    ref = grown(tokens, positions, return_experts=True)[2]
    ex = forward(grown, tokens, positions, experts=True).experts
    np.testing.assert_array_equal(np.asarray(ex["out_rms"]), np.asarray(ref["out_rms"]))
    plain = RecomputeLM(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), fn=lambda m, t, p, k: m(t),
                        config=None)
    assert capabilities(plain) == {HIDDEN}
