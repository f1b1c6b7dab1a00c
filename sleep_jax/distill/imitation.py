"""Learning to Imitate (arXiv 2606.03979, Stage 1b): RL imitation of the teacher's own texts.

1. The teacher (pre-growth model, memory in context) writes a continuation y of each seeding
   prompt (``generate``, Y = ``text_tokens`` tokens at most, no gradient).
2. y is cut at a random point c in [0, |y| - 1]: the student sees prompt + y[:c] (no memory)
   and samples G continuations (``rl.sample_rollout``), each as long as the teacher's own
   continuation y[c:] (|y| - c tokens; shorter only if the student emits EOS first). Matched
   lengths matter: a student continuation shorter than y[c:] is charged the missing
   characters as edits (4 perfect tokens against an 8-token remainder of similar words give
   z ~ 0.5, hence r_lev ~ 0 under z0 = 0.5).
3. Each continuation a is scored against the teacher's continuation b = y[c:] of the same
   length by the paper's reward gamma * r_sem + (1 - gamma) * r_lev, on decoded text, on the
   host (``rl.rewards``). r_sem in {0, 1} is a frozen judge's verdict. r_lev: with d the
   character Levenshtein distance between a and b and z = d / max(|a|, |b|) (characters),
   r_lev = 1 - z if z <= z0 else 0 (two empty texts: 1). The paper's r_lev uses the raw edit
   distance d; ours divides it by the longer text's length, so z0 is a fraction of the
   characters (z0 = 0.5: at most half of them edited earns 1 - z in [0.5, 1], more earns 0),
   not a number of edits, and one z0 fits continuations of any length.
4. Group advantages (GRPO by default; PPO selectable through the RLConfig) and the clipped
   surrogate (``rl.update.grpo_loss``) give the imitation loss that ``seeding_step`` mixes as
   alpha * GKD + (1 - alpha) * imitation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.rl.config import RLConfig
from sleep_jax.rl.rollout import Rollout, sample_rollout, with_rewards
from sleep_jax.sampling import generate, join


def truncate_rollout(roll: Rollout, lengths_b, pad_id: int = 0) -> Rollout:
    """Keep the first ``lengths_b[b]`` completion tokens of row b (pad and zero the rest).

    Exact for the log-probs already computed: scoring is causal, so a token's log-prob does not
    depend on the tokens after it.
    """
    keep = roll.mask & (jnp.arange(roll.mask.shape[1])[None] < lengths_b[:, None])
    z = lambda x: jnp.where(keep, x, jnp.zeros((), x.dtype))
    return roll.replace(completion=jnp.where(keep, roll.completion, pad_id), mask=keep,
                        old_logp=z(roll.old_logp), ref_logp=z(roll.ref_logp),
                        values=z(roll.values), advantages=z(roll.advantages),
                        returns=z(roll.returns))


def imitation_rollout(student, teacher, teacher_prefix_bp, teacher_len_b, student_prefix_bq,
                      student_len_b, rng, *, rl_cfg: RLConfig, text_tokens: int,
                      temperature: float = 1.0, eos_id: int | None, pad_id: int = 0):
    """Teacher text, random cut, student continuations (pure; jit with the configs static).

    Args:
      student, teacher: protocol models.
      teacher_prefix_bp / teacher_len_b: [B,P] bos + memory + prompt (right-padded) / [B].
      student_prefix_bq / student_len_b: [B,Q] bos + prompt / [B].
      rl_cfg: group_size G and the sampling options of the student; its max_new_tokens is not
        used: the student writes up to Y tokens, then each row is cut to the length of the
        teacher remainder it is compared with.
      text_tokens: length Y of the teacher's text.
    Returns:
      (Rollout with B*G rows of width Y, rewards still 0, row i's completion at most as long
      as its target; target [B*G,Y] the teacher's remaining text y[c:] left-aligned;
      target_mask [B*G,Y]).
    """
    k_text, k_cut, k_roll = jax.random.split(rng, 3)
    y = generate(teacher, teacher_prefix_bp, teacher_len_b, k_text, max_new_tokens=text_tokens,
                 temperature=temperature, eos_id=eos_id, pad_id=pad_id)
    n = jnp.maximum(y.lengths, 1)
    cut = jnp.floor(jax.random.uniform(k_cut, n.shape) * n).astype(jnp.int32)  # 0..n-1
    Y = text_tokens
    head = (jnp.arange(Y)[None] < cut[:, None]) & y.mask
    toks, _, _, _ = join(student_prefix_bq, student_len_b, y.tokens, head, pad_id)
    prompt_len = student_len_b + jnp.sum(head, 1)
    idx = jnp.minimum(cut[:, None] + jnp.arange(Y)[None], Y - 1)
    target = jnp.take_along_axis(y.tokens, idx, 1)
    target_mask = jnp.take_along_axis(y.mask, idx, 1) & (cut[:, None] + jnp.arange(Y)[None] < Y)
    G = rl_cfg.group_size
    roll = sample_rollout(student, None, toks, prompt_len, k_roll,
                          cfg=dataclasses.replace(rl_cfg, max_new_tokens=Y), eos_id=eos_id,
                          pad_id=pad_id)
    roll = truncate_rollout(roll, jnp.repeat(jnp.sum(target_mask, 1), G, 0), pad_id)
    return roll, jnp.repeat(target, G, 0), jnp.repeat(target_mask, G, 0)


def score_imitation(roll: Rollout, target, target_mask, *, decode: Callable, reward_fn,
                    rl_cfg: RLConfig) -> tuple[Rollout, np.ndarray]:
    """Decode completions and targets, reward them on the host, attach group advantages."""
    comp, cmask = np.asarray(roll.completion), np.asarray(roll.mask)
    tgt, tmask = np.asarray(target), np.asarray(target_mask)
    comps = [decode(c[m].tolist()) for c, m in zip(comp, cmask)]
    refs = [decode(t[m].tolist()) for t, m in zip(tgt, tmask)]
    rewards = np.asarray(reward_fn(comps, refs), np.float32)
    return with_rewards(roll, rewards, rl_cfg), rewards


def make_imitation_rollout(rl_cfg: RLConfig, *, text_tokens: int, temperature: float,
                           eos_id: int | None, pad_id: int = 0):
    """The jitted ``imitation_rollout``: fn(state, teacher_graphdef, teacher_state, batch, rng)
    with ``batch`` a ``seeding.SeedingBatch``."""
    from flax import nnx

    def fn(state, tg, ts, batch, rng):
        return imitation_rollout(state.model(), nnx.merge(tg, ts), batch.teacher_prefix,
                                 batch.teacher_len, batch.student_prefix, batch.student_len,
                                 rng, rl_cfg=rl_cfg, text_tokens=text_tokens,
                                 temperature=temperature, eos_id=eos_id, pad_id=pad_id)

    return jax.jit(fn, static_argnums=(1,))


def make_imitation(cfg, *, decode: Callable, judge=None, eos_id: int | None, pad_id: int = 0):
    """``collect(state, teacher_graphdef, teacher_state, batch, rng) -> Rollout`` for a
    ``SeedingConfig`` (alpha < 1): teacher text, cut, student rollout, reward
    gamma * r_sem + (1 - gamma) * r_lev, group advantages. ``decode(ids) -> str``."""
    from sleep_jax.rl.rewards import get_reward

    rl = cfg.rl_config()
    roll_fn = make_imitation_rollout(rl, text_tokens=cfg.imitation_text_tokens,
                                     temperature=cfg.sample_temperature, eos_id=eos_id,
                                     pad_id=pad_id)
    reward_fn = get_reward("imitation", gamma=cfg.gamma, z0=cfg.z0, judge=judge)

    def collect(state, tg, ts, batch, rng):
        roll, target, tmask = roll_fn(state, tg, ts, batch, rng)
        return score_imitation(roll, target, tmask, decode=decode, reward_fn=reward_fn,
                               rl_cfg=rl)[0]

    return collect
