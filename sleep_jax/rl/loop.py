"""The RL loop: rollout -> host rewards -> group advantages -> update, with a progress bar.

``train_rl`` drives GRPO, PPO or ReST-EM (``cfg.algorithm``) over a list of prompts with a
reward function ``reward_fn(completions, references) -> [B]`` (completions decoded by ``decode``
when given, else token-id lists). Each step records the rollout's reward mean/std, KL to the
reference, clip fraction, entropy, response length, the rollout's generated tokens/s and the
update's wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from sleep_jax.rl.config import RLConfig
from sleep_jax.rl.rest_em import rest_em_step
from sleep_jax.rl.rollout import make_rollout, with_rewards
from sleep_jax.rl.update import make_update


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None):
    """Right-pad token-id lists: ([N,P] int32, lengths [N])."""
    width = width or max(len(p) for p in prompts)
    out = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        if not 1 <= len(p) <= width:
            raise ValueError(f"prompt {i} has {len(p)} tokens; allowed 1..{width}")
        out[i, :len(p)] = p
    return out, np.array([len(p) for p in prompts], np.int32)


def train_rl(state, prompts: Sequence[Sequence[int]], references: Sequence, reward_fn: Callable,
             *, cfg: RLConfig, mesh, steps: int, prompts_per_step: int, rng,
             ref: nnx.Module | None = None, decode: Callable | None = None,
             eos_id: int | None = None, pad_id: int = 0, mask=None, progress: bool = True,
             reward_transform: Callable | None = None):
    """Run ``steps`` RL iterations; returns (state, history: one metrics dict per step).

    Args:
      state: TrainState of the policy (its model a ``ValueLM`` for PPO).
      prompts: N token-id lists; references: N items handed to ``reward_fn`` (one per prompt,
        repeated for its G completions).
      reward_fn: (completions, references) -> [B] rewards.
      cfg: RLConfig; mesh: device mesh; prompts_per_step: prompts per rollout (B = that x G).
      ref: frozen reference model for the KL terms (None: no KL).
      mask: trainable mask (only those entries move).
      reward_transform: optional f(rewards, step) applied before the update (tests use it for
        a shuffled-reward control).
    """
    P, lens = pad_prompts(prompts, pad_id)
    refs = list(references)
    rollout_fn = make_rollout(cfg, eos_id=eos_id, pad_id=pad_id, mesh=mesh)
    if cfg.algorithm == "rest_em":
        from sleep_jax.train.step import make_train_step

        sft_step = make_train_step(state, mesh, mask=mask)
    else:
        update = make_update(state, mesh, cfg, mask=mask)
    rgd, rst = nnx.split(ref) if ref is not None else (None, None)
    order = np.random.default_rng(int(jax.random.randint(rng, (), 0, 2**30))).permutation
    perm, pos = order(len(P)), 0
    history = []
    bar = tqdm(range(steps), desc=f"rl: {cfg.algorithm}", disable=not progress, leave=False,
               mininterval=2)
    for step in bar:
        if pos + prompts_per_step > len(perm):
            perm, pos = order(len(P)), 0
        idx = perm[pos:pos + prompts_per_step]
        pos += prompts_per_step
        k_roll, k_upd = jax.random.split(jax.random.fold_in(rng, step))
        t0 = time.perf_counter()
        roll = rollout_fn(state, rgd, rst, P[idx], lens[idx], k_roll)
        comp, cmask = np.asarray(roll.completion), np.asarray(roll.mask)
        t_roll = time.perf_counter() - t0
        rows = [c[m].tolist() for c, m in zip(comp, cmask)]
        texts = [decode(r) for r in rows] if decode else rows
        rewards = np.asarray(reward_fn(texts, [refs[i] for i in idx for _ in
                                               range(cfg.group_size)]), np.float32)
        used = reward_transform(rewards, step) if reward_transform else rewards
        roll = with_rewards(roll, used, cfg)
        t1 = time.perf_counter()
        if cfg.algorithm == "rest_em":
            state, m = rest_em_step(state, roll, k_upd, train_step=sft_step,
                                    threshold=cfg.rest_threshold, sft_steps=cfg.rest_sft_steps,
                                    pad_id=pad_id)
        else:
            state, m = update(state, roll, k_upd)
        m = {k: float(v) for k, v in m.items()}
        t_upd = time.perf_counter() - t1
        m.update(step=step + 1, reward_mean=float(rewards.mean()),
                 reward_std=float(rewards.std()), response_len=float(cmask.sum(1).mean()),
                 rollout_tokens_per_s=float(cmask.sum()) / t_roll, rollout_s=t_roll,
                 update_s=t_upd)
        history.append(m)
        bar.set_postfix(reward=f"{m['reward_mean']:.2f}")
    return state, history
