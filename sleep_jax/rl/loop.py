"""The RL loop: rollout -> host rewards -> group advantages -> update, on the run loop.

``train_rl`` runs on ``sleep_jax.train.loop.run_loop`` (progress bar, records, optional
checkpoints and exact resume) and drives GRPO, PPO or ReST-EM (``cfg.algorithm``) over a list
of prompts with a reward function ``reward_fn(completions, references) -> [B]`` (completions
decoded by ``decode`` when given, else token-id lists). Each step records the rollout's reward
mean/std, KL to the reference, clip fraction, entropy, response length, the rollout's generated
tokens/s and the update's wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from sleep_jax.data.tokenizers import pad_rows
from sleep_jax.rl.config import RLConfig
from sleep_jax.rl.rest_em import rest_em_step
from sleep_jax.rl.rollout import make_rollout, with_rewards
from sleep_jax.rl.update import make_update


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None):
    """Right-pad token-id lists: ([N,P] int32, lengths [N]); every prompt needs a token."""
    return pad_rows(prompts, pad_id=pad_id, width=width, min_len=1, where="prompt")


class RolloutSource:
    """The RL batch source: each ``next(state, step)`` samples ``prompts_per_step`` prompts
    (a fresh permutation per pass), rolls them out with the current policy under
    ``split(fold_in(rng, step))[0]``, decodes and scores the completions on the host and
    returns ``(rollout with rewards, host metrics)``. Its position (permutation, offset, the
    numpy generator) is JSON state, so a checkpointed RL run resumes exactly."""

    def __init__(self, prompts, references, reward_fn, *, cfg: RLConfig, rollout_fn, ref_split,
                 prompts_per_step: int, rng, decode=None, pad_id: int = 0,
                 reward_transform=None):
        self.P, self.lens = pad_prompts(prompts, pad_id)
        self.refs = list(references)
        self.reward_fn, self.cfg, self.rollout_fn = reward_fn, cfg, rollout_fn
        self.rgd, self.rst = ref_split
        self.k, self.rng, self.decode = prompts_per_step, rng, decode
        self.reward_transform = reward_transform
        self.order = np.random.default_rng(int(jax.random.randint(rng, (), 0, 2**30)))
        self.perm, self.pos = self.order.permutation(len(self.P)), 0

    def next(self, state, step: int):
        if self.pos + self.k > len(self.perm):
            self.perm, self.pos = self.order.permutation(len(self.P)), 0
        idx = self.perm[self.pos:self.pos + self.k]
        self.pos += self.k
        k_roll, _ = jax.random.split(jax.random.fold_in(self.rng, step))
        t0 = time.perf_counter()
        roll = self.rollout_fn(state, self.rgd, self.rst, self.P[idx], self.lens[idx], k_roll)
        comp, cmask = np.asarray(roll.completion), np.asarray(roll.mask)
        t_roll = time.perf_counter() - t0
        rows = [c[m].tolist() for c, m in zip(comp, cmask)]
        texts = [self.decode(r) for r in rows] if self.decode else rows
        rewards = np.asarray(self.reward_fn(texts, [self.refs[i] for i in idx for _ in
                                                    range(self.cfg.group_size)]), np.float32)
        used = self.reward_transform(rewards, step) if self.reward_transform else rewards
        host = dict(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                    response_len=float(cmask.sum(1).mean()),
                    rollout_tokens_per_s=float(cmask.sum()) / t_roll, rollout_s=t_roll)
        return with_rewards(roll, used, self.cfg), host

    def get_state(self):
        return {"order": self.order.bit_generator.state, "perm": self.perm.tolist(),
                "pos": self.pos}

    def set_state(self, s) -> None:
        self.order.bit_generator.state = s["order"]
        self.perm, self.pos = np.asarray(s["perm"], self.perm.dtype), int(s["pos"])


def train_rl(state, prompts: Sequence[Sequence[int]], references: Sequence, reward_fn: Callable,
             *, cfg: RLConfig, mesh, steps: int, prompts_per_step: int, rng,
             ref: nnx.Module | None = None, decode: Callable | None = None,
             eos_id: int | None = None, pad_id: int = 0, mask=None, progress: bool = True,
             reward_transform: Callable | None = None, workdir: str | None = None,
             checkpoint_every: int = 0):
    """Run ``steps`` RL iterations on the run loop; returns (state, history: one record per
    step).

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
      workdir: run folder (metrics.jsonl, tb/, checkpoints every ``checkpoint_every`` steps and
        at the end); a re-run resumes exactly. None: nothing written.
    """
    from sleep_jax.train.loop import LoopConfig, run_loop

    rollout_fn = make_rollout(cfg, eos_id=eos_id, pad_id=pad_id, mesh=mesh)
    if cfg.algorithm == "rest_em":
        from sleep_jax.train.step import make_train_step

        sft_step = make_train_step(state, mesh, mask=mask)
    else:
        update = make_update(state, mesh, cfg, mask=mask)
    source = RolloutSource(prompts, references, reward_fn, cfg=cfg, rollout_fn=rollout_fn,
                           ref_split=nnx.split(ref) if ref is not None else (None, None),
                           prompts_per_step=prompts_per_step, rng=rng, decode=decode,
                           pad_id=pad_id, reward_transform=reward_transform)

    def step(st, batch, key):
        roll, host = batch
        _, k_upd = jax.random.split(key)
        t1 = time.perf_counter()
        if cfg.algorithm == "rest_em":
            st, m = rest_em_step(st, roll, k_upd, train_step=sft_step,
                                 threshold=cfg.rest_threshold, sft_steps=cfg.rest_sft_steps,
                                 pad_id=pad_id)
        else:
            st, m = update(st, roll, k_upd)
        # the next rollout waits for this update anyway: waiting here times it (no read)
        jax.block_until_ready([x for x in jax.tree.leaves(m) if isinstance(x, jax.Array)])
        return st, {**m, **host, "update_s": time.perf_counter() - t1}

    r = run_loop(step, state, source, cfg=LoopConfig(steps=steps, progress_bar=progress,
                                                     checkpoint_every=checkpoint_every),
                 rng=rng, workdir=workdir, desc=f"rl: {cfg.algorithm}")
    return r.state, r.history
