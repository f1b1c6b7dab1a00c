"""The reward of a dream: does an adapter fine-tuned on it answer tau better than copying C?

Default, ``DreamConfig.reward="contrastive"``: with c_q(adapter) the contrastive log-prob of
tau's question q (``tau.contrastive_from``: the correct answer against the other entities'
answers for the same attribute, no context in the prompt),

    r_m = mean_q [ c_q(adapter fine-tuned on dream m) - c_q(adapter fine-tuned on C) ],

the null dream being C itself, fine-tuned the same way (same adapter0, steps, lr, clipping),
in the same vmapped pass as the dreams. A dream must beat copying the passage; raising every
answer word alike earns nothing (the contrast cancels it).

Option ``reward="binary"`` (SEAL): r_m = 1 when the adapted model's multiple-choice accuracy
on tau (argmax over the candidates) is above the base model's (adapter0: the base function),
else 0. SEAL's own binary reward compares exact match of generated answers, a host-side step:
``seal_binary`` takes those EM figures (e.g. from ``eval.probes``) and gives the same 0/1.

Data discipline: tau is built from TASK entities in the task wording in training
(``tau.world_tau``); no evaluation or validation wording enters the reward.

Shapes: M dreams, T width (dreams and C padded to one width), Q questions, K candidates.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sleep_jax.dream.config import DreamConfig
from sleep_jax.dream.inner import DreamBase, adapted_model, finetune_and_score
from sleep_jax.dream.tau import Tau, accuracy_from, candidate_logprobs, contrastive_from


def pad_to(x, width: int, value=0):
    """[..., T] -> [..., width] padded at the end with ``value`` (width >= T)."""
    extra = width - x.shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad width {x.shape[-1]} to {width}")
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=value)


def contrastive_reward(c_dreams_mq, c_null_q) -> jnp.ndarray:
    """r_m = mean_q (c_dreams[m, q] - c_null[q]): [M]."""
    return jnp.mean(c_dreams_mq - c_null_q[None], -1)


def binary_reward(acc_dreams_mq, acc_base_q) -> jnp.ndarray:
    """1.0 where a dream's mean accuracy is strictly above the base's: [M]."""
    return (jnp.mean(acc_dreams_mq, -1) > jnp.mean(acc_base_q)).astype(jnp.float32)


def seal_binary(em_after, em_before) -> np.ndarray:
    """Host side, SEAL's reward: 1.0 where the exact match after the dream's fine-tune (one
    figure per dream, [M]) beats the exact match before it (a scalar)."""
    return (np.asarray(em_after, np.float64) > float(em_before)).astype(np.float32)


def dream_rewards(base: DreamBase, adapter0, tokens_mt, mask_mt, ctx_t, ctx_mask_t, tau: Tau,
                  *, cfg: DreamConfig) -> dict:
    """Fine-tune M dream adapters and the null adapter (on C) in one vmapped pass; reward each.

    Args:
      base, adapter0: ``inner.make_base``.
      tokens_mt, mask_mt: [M,T] dreams (left-aligned; a BOS first if the model expects one).
      ctx_t, ctx_mask_t: [Tc] the context C as the dreams are framed.
      tau: the context's questions (``tau.Tau``).
    Returns:
      {"rewards": [M], "contrastive": [M] (mean_q c_q of each dream's adapter), "null": mean_q
      c_q of the null adapter, "base": mean_q c_q of the base, "losses": [M,n] inner SFT
      losses, "null_losses": [n], "adapters": [M+1, ...] (the last is the null adapter),
      "logprobs": [M+1,Q,K]}.
    """
    M = tokens_mt.shape[0]
    T = max(tokens_mt.shape[1], ctx_t.shape[0])
    rows = jnp.concatenate([pad_to(tokens_mt, T), pad_to(ctx_t[None], T)])
    masks = jnp.concatenate([pad_to(mask_mt, T, False), pad_to(ctx_mask_t[None], T, False)])
    out = finetune_and_score(base, adapter0, rows, masks, tau, cfg=cfg,
                             measure=candidate_logprobs)
    lp = out["tau"]  # [M+1,Q,K]
    c = contrastive_from(lp, tau.correct)  # [M+1,Q]
    lp0 = candidate_logprobs(adapted_model(base, adapter0), tau)
    if cfg.reward == "contrastive":
        r = contrastive_reward(c[:M], c[M])
    else:
        r = binary_reward(accuracy_from(lp[:M], tau.correct), accuracy_from(lp0, tau.correct))
    return {"rewards": r, "contrastive": jnp.mean(c[:M], -1), "null": jnp.mean(c[M]),
            "base": jnp.mean(contrastive_from(lp0, tau.correct)), "losses": out["losses"][:M],
            "null_losses": out["losses"][M], "adapters": out["adapters"], "logprobs": lp}
