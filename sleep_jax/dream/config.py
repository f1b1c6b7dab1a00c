"""DreamConfig: the settings of one dreaming stage (generation, selection, inner loop, reward).

The inner adapter is an expert slot (``sleep_jax.train.adapters``): its rank is the model's
``ModelConfig.expert_rank``; there is no separate LoRA alpha (the slot's B starts at zero and
its output is added unscaled). Dreaming's own settings are chosen on validation wordings, like
every other setting; the defaults here are for the tiny models of the tests.
"""

from __future__ import annotations

import dataclasses

SCORES = ("cosine", "grad_norm")
REWARDS = ("contrastive", "binary")
PG_OVER = ("all", "kept")


@dataclasses.dataclass(frozen=True)
class DreamConfig:
    """One dreaming stage.

    dreams: m dreams drawn per context (the GRPO group when pg_over="all").
    keep_top, keep_random: k dreams of the highest importance plus b drawn at random from the
      rest (``select.keep_indices``); k + b <= m.
    steps, lr, clip_norm: the inner loop, n Adam steps (constant lr, no weight decay) on one
      dream's tokens per adapter, global-norm clipping per dream (0 disables it).
    score: the importance scalar (``select.importance``): "cosine" between the dream's SFT
      gradient and the context's LM-loss gradient over the adapter parameters, or "grad_norm"
      (the norm of the dream's gradient).
    reward: "contrastive" (``reward.contrastive_reward``: the gain of the correct answer's
      log-prob against the other candidates over the null dream) or "binary" (SEAL's 1 when the
      adapted model answers more of tau right than the base does; on the device by candidate
      argmax, ``reward.binary_reward``).
    pg_over: "all" fine-tunes and rewards every drawn dream, so the policy gradient is taken
      over dreams drawn from the generator, unfiltered (unbiased); "kept" fine-tunes only the
      k + b kept dreams and takes the gradient over them (cheaper; biased: see
      ``iteration.dream_iteration``).
    max_dream_tokens: the dream length sampled (the generator's ``max_new_tokens``).
    """

    dreams: int = 4
    keep_top: int = 2
    keep_random: int = 1
    steps: int = 4
    lr: float = 1e-2
    clip_norm: float = 1.0
    score: str = "cosine"
    reward: str = "contrastive"
    pg_over: str = "all"
    max_dream_tokens: int = 16

    def __post_init__(self):
        for name in ("dreams", "steps", "max_dream_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"DreamConfig.{name}={getattr(self, name)} must be >= 1")
        if self.keep_top < 0 or self.keep_random < 0 or self.keep_top + self.keep_random < 1:
            raise ValueError(f"DreamConfig keep_top={self.keep_top}, keep_random="
                             f"{self.keep_random}: both >= 0 and at least one dream kept")
        if self.keep_top + self.keep_random > self.dreams:
            raise ValueError(f"DreamConfig keeps keep_top + keep_random = "
                             f"{self.keep_top + self.keep_random} of dreams={self.dreams}: "
                             f"at most dreams")
        if self.lr <= 0 or self.clip_norm < 0:
            raise ValueError(f"DreamConfig lr={self.lr} must be > 0 and clip_norm="
                             f"{self.clip_norm} >= 0")
        for name, allowed in (("score", SCORES), ("reward", REWARDS), ("pg_over", PG_OVER)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DreamConfig.{name}={getattr(self, name)!r}; allowed: "
                                 f"{allowed}")

    @property
    def kept(self) -> int:
        """k + b, the dreams kept per context."""
        return self.keep_top + self.keep_random
