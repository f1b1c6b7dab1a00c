"""RLConfig: one frozen dataclass for rollouts and the GRPO / PPO / ReST-EM updates."""

from __future__ import annotations

import dataclasses

ALGORITHMS = ("grpo", "ppo", "rest_em")
LOSS_NORMS = ("tokens", "constant")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Options of the RL core (defaults: GRPO as DeepSeekMath without KL, token-level loss).

    Rollout: group_size G completions per prompt of at most max_new_tokens, sampled at
      temperature (top_k/top_p truncation allowed: log-probs are recomputed untruncated).
    Advantage: ``advantage`` names an estimator in ``advantages.ADVANTAGES`` (PPO: "gae" with
      gamma, lam; the sequence reward sits on the last token).
    Loss: ``policy_loss`` in ("clipped_token", "clipped_sequence"), clip eps_low/eps_high;
      kl_coef * KL(pi || ref) with ``kl_estimator`` in ("kl_k1", "kl_k3"); entropy_coef bonus;
      PPO value loss vf_coef with value_clip. kl_penalty (PPO): -kl_penalty * k1 added to the
      token rewards instead of (or besides) the KL loss.
      ``loss_norm`` divides the token sums of a mini-batch: "tokens" (default, DAPO-style
      token-level mean: by the number of completion tokens in the mini-batch) or "constant"
      (Dr. GRPO, Liu et al. 2025: by rows x M, M the rollout's completion width =
      max_new_tokens, so a long completion's tokens weigh no less than a short one's and no
      length-dependent normaliser biases the gradient). Full Dr. GRPO is
      ``RLConfig(advantage="grpo_no_std", loss_norm="constant")``. clipped_sequence (GSPO)
      always divides by sequences and takes "tokens" only.
    Update: epochs over the rollout, mini_batches per epoch (an optimizer step each),
      micro_batches per mini-batch (exact gradient accumulation).
    ReST-EM: keep samples with reward >= rest_threshold, take rest_sft_steps SFT steps on them.
    """

    algorithm: str = "grpo"
    group_size: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    advantage: str = ""  # "" -> "grpo" for GRPO, "gae" for PPO
    adv_eps: float = 1e-6
    gamma: float = 1.0
    lam: float = 0.95
    policy_loss: str = "clipped_token"
    loss_norm: str = "tokens"
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "kl_k3"
    kl_penalty: float = 0.0
    entropy_coef: float = 0.0
    vf_coef: float = 0.5
    value_clip: float = 0.2
    epochs: int = 1
    mini_batches: int = 1
    micro_batches: int = 1
    rest_threshold: float = 1.0
    rest_sft_steps: int = 1

    def __post_init__(self):
        from sleep_jax.rl.advantages import ADVANTAGES

        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r}; allowed: {ALGORITHMS}")
        if self.advantage and self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage={self.advantage!r}; allowed: {sorted(ADVANTAGES)}")
        if self.policy_loss not in ("clipped_token", "clipped_sequence"):
            raise ValueError(f"policy_loss={self.policy_loss!r}; allowed: "
                             f"('clipped_token', 'clipped_sequence')")
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss_norm={self.loss_norm!r}; allowed: {LOSS_NORMS}")
        if self.loss_norm == "constant" and self.policy_loss == "clipped_sequence":
            raise ValueError("loss_norm='constant' (Dr. GRPO) normalises token sums; "
                             "policy_loss='clipped_sequence' is a per-sequence loss: use "
                             "loss_norm='tokens' with it")
        if self.kl_estimator not in ("kl_k1", "kl_k3"):
            raise ValueError(f"kl_estimator={self.kl_estimator!r}; allowed: ('kl_k1', 'kl_k3')")
        for name in ("group_size", "max_new_tokens", "epochs", "mini_batches", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name}={getattr(self, name)} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 for RL sampling "
                             f"(log-probs of a greedy sampler are not a policy's)")

    @property
    def estimator(self) -> str:
        return self.advantage or ("gae" if self.algorithm == "ppo" else "grpo")
