"""Jitted KV-cache sampling and teacher scoring over the sleep_jax model protocol.

``generate``: one prefill of the right-padded prompts, then a ``lax.while_loop`` decode that
stops when every row has emitted EOS or ``max_new_tokens``. Row b's new tokens sit at positions
``prompt_len[b] + step``; the cache slots of its prompt padding are invalid, so rows of
different lengths share one batch. ``score``: log-probs of given completions after given prompts
in one forward pass (the completion of row b is placed right after its own prompt).
``token_logprobs``: tempered log-probs of given tokens under given logits (scoring, RL
re-scoring and the training cross-entropy share it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


def token_logprobs(logits_btv: jax.Array, targets_bt: jax.Array,
                   temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature)[target] per position: [B,T] fp32."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]


@struct.dataclass
class SampleOutput:
    """tokens [B,M] (pad after a row stops), logprobs [B,M] under the distribution sampled
    from (tempered, top-k/top-p truncated: RL recomputes policy log-probs with ``score``),
    mask [B,M] (generated tokens, EOS included), lengths [B]; logits [B,M,V]: the model's raw
    logits that each token was sampled from (``return_logits=True``; else None)."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    logits: jax.Array | None = None


def filter_logits(logits_bv: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Keep the top-k tokens and the smallest nucleus with mass >= top_p; others -> -inf."""
    neg = jnp.finfo(logits_bv.dtype).min
    if top_k and top_k < logits_bv.shape[-1]:
        kth = jax.lax.top_k(logits_bv, top_k)[0][..., -1:]
        logits_bv = jnp.where(logits_bv < kth, neg, logits_bv)
    if top_p < 1.0:
        srt = jnp.sort(logits_bv, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep = before < top_p
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff, neg, logits_bv)
    return logits_bv


def _sample(logits_bv, rng, temperature, top_k, top_p):
    logits_bv = logits_bv.astype(jnp.float32)
    if temperature == 0.0:
        tok = jnp.argmax(logits_bv, axis=-1)
        logp = jax.nn.log_softmax(logits_bv, -1)
    else:
        f = filter_logits(logits_bv / temperature, top_k, top_p)
        tok = jax.random.categorical(rng, f, axis=-1)
        logp = jax.nn.log_softmax(f, -1)
    return tok.astype(jnp.int32), jnp.take_along_axis(logp, tok[:, None], -1)[:, 0]


def generate(model, prompt_tokens, prompt_lengths, rng, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, pad_id: int = 0,
             return_logits: bool = False) -> SampleOutput:
    """Sample ``max_new_tokens`` after right-padded prompts (temperature 0 = greedy).

    Args:
      model: follows the sleep_jax protocol (``model(tokens, positions, cache, mask)``,
        ``init_cache``).
      prompt_tokens: [B,P] int32, right-padded; prompt_lengths: [B] (>= 1).
      rng: PRNG key.
      return_logits: also keep the raw logits of every step, [B,M,V] fp32 (what a forward pass
        over prompt + completion gives at the positions predicting the completion: a teacher
        cache reads them instead of running that pass).
    Returns:
      SampleOutput with [B,M] arrays, M = max_new_tokens.
    """
    B, P = prompt_tokens.shape
    M = max_new_tokens
    lengths = prompt_lengths.astype(jnp.int32)
    cache = model.init_cache(B, P + M)
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    valid = pos < lengths[:, None]
    logits, cache = model(prompt_tokens, pos, cache=cache, mask=valid)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    eos = -1 if eos_id is None else eos_id

    def body(carry):
        i, last, cache, done, toks, lps, lgs, rng = carry
        rng, sub = jax.random.split(rng)
        tok, lp = _sample(last, sub, temperature, top_k, top_p)
        tok = jnp.where(done, pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        toks = toks.at[:, i].set(tok)
        lps = lps.at[:, i].set(lp)
        if return_logits:
            lgs = lgs.at[:, i].set(last.astype(jnp.float32))
        new_done = done | (tok == eos)
        logits, cache = model(tok[:, None], (lengths + i)[:, None], cache=cache,
                              mask=~done[:, None])
        return i + 1, logits[:, 0], cache, new_done, toks, lps, lgs, rng

    def cond(carry):
        return (carry[0] < M) & ~jnp.all(carry[3])

    lgs = (jnp.zeros((B, M, last.shape[-1]), jnp.float32) if return_logits
           else jnp.zeros((), jnp.float32))
    init = (jnp.zeros((), jnp.int32), last, cache, jnp.zeros((B,), bool),
            jnp.full((B, M), pad_id, jnp.int32), jnp.zeros((B, M), jnp.float32), lgs, rng)
    n, _, _, _, toks, lps, lgs, _ = jax.lax.while_loop(cond, body, init)
    # generated = before (and including) the first EOS, within the steps run
    is_eos = toks == eos
    after_eos = jnp.cumsum(is_eos, axis=1) - is_eos > 0
    mask = (jnp.arange(M)[None] < n) & ~after_eos
    toks = jnp.where(mask, toks, pad_id)
    return SampleOutput(toks, jnp.where(mask, lps, 0.0), mask, jnp.sum(mask, 1),
                        lgs if return_logits else None)


def join(prompt_tokens, prompt_lengths, completion_tokens, completion_mask, pad_id=0):
    """One row per prompt + its completion: (tokens [B,P+M], positions, valid, completion
    index [B,M]); row b's completion starts right after its own prompt."""
    B, P = prompt_tokens.shape
    M = completion_tokens.shape[1]
    lengths = prompt_lengths.astype(jnp.int32)
    cpos = lengths[:, None] + jnp.arange(M, dtype=jnp.int32)[None]
    toks = jnp.full((B, P + M), pad_id, jnp.int32)
    toks = toks.at[:, :P].set(jnp.where(jnp.arange(P)[None] < lengths[:, None],
                                        prompt_tokens, pad_id))
    toks = toks.at[jnp.arange(B)[:, None], cpos].set(
        jnp.where(completion_mask, completion_tokens, pad_id).astype(jnp.int32))
    n = lengths + jnp.sum(completion_mask, 1)
    valid = jnp.arange(P + M)[None] < n[:, None]
    pos = jnp.broadcast_to(jnp.arange(P + M, dtype=jnp.int32), (B, P + M))
    return toks, pos, valid, cpos


def completion_logits(model, prompt_tokens, prompt_lengths, completion_tokens, completion_mask):
    """Logits [B,M,V] predicting each completion token (row b's completion follows its own
    prompt)."""
    toks, pos, valid, cpos = join(prompt_tokens, prompt_lengths, completion_tokens,
                                   completion_mask)
    logits = model(toks, pos, mask=valid)[0]
    return jnp.take_along_axis(logits, (cpos - 1)[..., None], axis=1)


def score(model, prompt_tokens, prompt_lengths, completion_tokens, completion_mask, *,
          temperature: float = 1.0) -> jax.Array:
    """log p(completion token | prompt, earlier completion) [B,M], 0 where mask is False."""
    lg = completion_logits(model, prompt_tokens, prompt_lengths, completion_tokens,
                           completion_mask)
    lp = token_logprobs(lg, completion_tokens, temperature)
    return jnp.where(completion_mask, lp, 0.0)
