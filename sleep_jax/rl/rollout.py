"""Rollouts: G sampled completions per prompt, re-scored into one pytree batch.

``sample_rollout`` is a pure function (jit it, or use ``make_rollout``): repeat each prompt G
times (row g*G + i is completion i of prompt g), sample with the jitted KV-cache sampler, then
recompute the behaviour log-probs (and PPO values) with the policy and the reference log-probs
with the frozen reference, by one scoring forward pass each at the sampling temperature. The
sampler's own log-probs are not used: under top-k/top-p truncation they belong to the truncated
distribution, not to the policy being optimised.

``ValueLM`` adds a scalar value head on the final hidden states of any model that follows the
sleep_jax protocol with ``return_hidden`` (PPO's critic, sharing the policy's trunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sleep_jax.models.protocol import HIDDEN, capabilities, forward
from sleep_jax.rl.config import RLConfig
from sleep_jax.rl.losses import token_entropy
from sleep_jax.sampling import generate, join, token_logprobs


@struct.dataclass
class Rollout:
    """One RL batch of B = prompts x G rows.

    prompt [B,P] int32 (right-padded), prompt_len [B]; completion [B,M] int32, mask [B,M] bool;
    old_logp, ref_logp [B,M] fp32 (tempered policy / reference log-probs of the completion);
    values [B,M] (PPO critic at the rollout, else 0); rewards [B]; advantages, returns [B,M].
    """

    prompt: jax.Array
    prompt_len: jax.Array
    completion: jax.Array
    mask: jax.Array
    old_logp: jax.Array
    ref_logp: jax.Array
    values: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    returns: jax.Array


class ValueLM(nnx.Module):
    """A protocol model plus a value head V(h_t) = h_t . w + b on its final hidden states.

    Calls and ``init_cache`` go to the wrapped model, so the sampler and scoring use it as is;
    ``values`` returns (logits [B,T,V], values [B,T]). The head starts at zero (V = 0).
    """

    def __init__(self, lm: nnx.Module):
        if HIDDEN not in capabilities(lm):
            raise ValueError(f"ValueLM reads the final hidden states: {type(lm).__name__} does "
                             f"not declare the {HIDDEN!r} capability ({sorted(capabilities(lm))})")
        self.lm = lm
        self.config = lm.config
        d = lm.config.embed
        self.value_w = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("embed",))
        self.value_b = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    @property
    def capabilities(self) -> frozenset[str]:
        return capabilities(self.lm)

    def __call__(self, tokens, positions, cache=None, mask=None, segment_ids=None, **kw):
        return self.lm(tokens, positions, cache=cache, mask=mask, segment_ids=segment_ids, **kw)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return self.lm.init_cache(batch, max_len, dtype)

    def values(self, tokens, positions, mask=None):
        out = forward(self.lm, tokens, positions, mask=mask, hidden=True)
        logits, h = out.logits, out.hidden
        v = jnp.einsum("btd,d->bt", h.astype(jnp.float32), self.value_w[...]) + self.value_b[...]
        return logits, v


def policy_outputs(model, prompt_bp, prompt_len_b, completion_bm, mask_bm, *,
                   temperature: float, values: bool = False, entropy: bool = False) -> dict:
    """One forward pass over prompt + completion rows.

    Returns a dict with ``logp`` [B,M] (tempered log-prob of each completion token, 0 where
    masked) and, if asked, ``values`` [B,M] (critic before each completion token) and
    ``entropy`` [B,M] (of the tempered next-token distribution).
    """
    toks, pos, valid, cpos = join(prompt_bp, prompt_len_b, completion_bm, mask_bm)
    if values:
        logits, v = model.values(toks, pos, mask=valid)
    else:
        logits = model(toks, pos, mask=valid)[0]
    idx = (cpos - 1)[..., None]
    lg = jnp.take_along_axis(logits, idx, axis=1)  # logits predicting completion token m
    out = {"logp": jnp.where(mask_bm, token_logprobs(lg, completion_bm, temperature), 0.0)}
    if values:
        out["values"] = jnp.where(mask_bm, jnp.take_along_axis(v, cpos - 1, axis=1), 0.0)
    if entropy:
        out["entropy"] = token_entropy(lg, temperature)
    return out


def sample_rollout(policy, ref, prompt_bp, prompt_len_b, rng, *, cfg: RLConfig,
                   eos_id: int | None, pad_id: int = 0) -> Rollout:
    """G completions per prompt with their behaviour/reference log-probs (rewards still 0).

    Args:
      policy: the model being trained (a ``ValueLM`` when cfg.algorithm == "ppo").
      ref: the frozen reference model, or None (then ref_logp = old_logp: no KL).
      prompt_bp: [B0,P] right-padded prompts; prompt_len_b: [B0].
      rng: PRNG key.
    Returns:
      Rollout with B = B0 * G rows.
    """
    G = cfg.group_size
    prompts = jnp.repeat(prompt_bp, G, axis=0)
    lens = jnp.repeat(prompt_len_b, G, axis=0)
    out = generate(policy, prompts, lens, rng, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   eos_id=eos_id, pad_id=pad_id)
    ppo = cfg.algorithm == "ppo"
    po = policy_outputs(policy, prompts, lens, out.tokens, out.mask,
                        temperature=cfg.temperature, values=ppo)
    old = jax.lax.stop_gradient(po["logp"])
    if ref is None:
        ref_lp = old
    else:
        ref_lp = policy_outputs(ref, prompts, lens, out.tokens, out.mask,
                                temperature=cfg.temperature)["logp"]
    zeros = jnp.zeros(out.mask.shape, jnp.float32)
    vals = jax.lax.stop_gradient(po["values"]) if ppo else zeros
    return Rollout(prompt=prompts, prompt_len=lens, completion=out.tokens, mask=out.mask,
                   old_logp=old, ref_logp=jax.lax.stop_gradient(ref_lp), values=vals,
                   rewards=jnp.zeros(prompts.shape[0], jnp.float32), advantages=zeros,
                   returns=zeros)


def with_rewards(rollout: Rollout, rewards_b, cfg: RLConfig) -> Rollout:
    """Attach rewards [B] and compute advantages/returns over whole groups (before any
    mini-batching). PPO's kl_penalty adds -kl_penalty * (old - ref) to the token rewards."""
    from sleep_jax.rl.advantages import compute_advantages

    rewards = jnp.asarray(rewards_b, jnp.float32)
    opts = dict(group_size=cfg.group_size, eps=cfg.adv_eps, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.kl_penalty:
        kl = jnp.where(rollout.mask, rollout.old_logp - rollout.ref_logp, 0.0)
        opts["token_rewards_bm"] = -cfg.kl_penalty * kl
    adv, ret = compute_advantages(cfg.estimator, rewards, rollout.mask, rollout.values, **opts)
    return rollout.replace(rewards=rewards, advantages=adv, returns=ret)


def make_rollout(cfg: RLConfig, *, eos_id: int | None, pad_id: int = 0, mesh=None):
    """``rollout(state, ref_graphdef, ref_state, prompt_bp, prompt_len_b, rng) -> Rollout``,
    jitted once per prompt shape (the reference travels as ``nnx.split(ref)``; pass
    ref_graphdef=None for no reference)."""

    def fn(state, ref_graphdef, ref_state, prompt_bp, prompt_len_b, rng):
        ref = None if ref_graphdef is None else nnx.merge(ref_graphdef, ref_state)
        return sample_rollout(state.model(), ref, prompt_bp, prompt_len_b, rng, cfg=cfg,
                              eos_id=eos_id, pad_id=pad_id)

    jitted = jax.jit(fn, static_argnums=(1,))

    def run(state, ref_graphdef, ref_state, prompt_bp, prompt_len_b, rng):
        if mesh is None:
            return jitted(state, ref_graphdef, ref_state, prompt_bp, prompt_len_b, rng)
        with jax.set_mesh(mesh):
            return jitted(state, ref_graphdef, ref_state, prompt_bp, prompt_len_b, rng)

    run.jitted = jitted
    return run
