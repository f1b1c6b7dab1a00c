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
            t = jnp.asarray([seq])
            logits = model(t, jnp.arange(len(seq))[None])[0]
            seq.append(int(jnp.argmax(logits[0, -1])))
        assert [int(x) for x in out.tokens[b]] == seq[int(lens[b]):]
    comp = out.tokens
    lp = np.asarray(score(model, toks, lens, comp, out.mask))
    for b in range(2):
        n = int(lens[b])
        seq = jnp.asarray([[int(x) for x in toks[b, :n]] + [int(x) for x in comp[b]]])
        logp = jax.nn.log_softmax(model(seq, jnp.arange(seq.shape[1])[None])[0][0], -1)
        ref = [float(logp[n - 1 + i, int(c)]) for i, c in enumerate(comp[b])]
        np.testing.assert_allclose(lp[b], ref, rtol=1e-5, atol=1e-5)


def test_our_decoder_satisfies_the_protocol(tiny_model):
    assert isinstance(tiny_model, CausalLM)
    assert isinstance(tiny_model, Decoder)
