"""Pure-functional RL for language models: GRPO, PPO (GAE, value head), ReST-EM.

rewards (registry, judge), advantages (registry), losses (registry, (sum, count)), rollout
(sampling + re-scoring into a ``Rollout`` pytree), update (``grpo_update`` / ``ppo_update``:
one jit each), rest_em (ReST-EM M-step), loop (``train_rl``).
"""

from sleep_jax.rl.advantages import ADVANTAGES, compute_advantages, register_advantage
from sleep_jax.rl.config import RLConfig
from sleep_jax.rl.loop import train_rl
from sleep_jax.rl.losses import LOSSES, register_loss
from sleep_jax.rl.rest_em import rest_em_batch, rest_em_step
from sleep_jax.rl.rewards import REWARDS, JudgeReward, get_reward, register_reward
from sleep_jax.rl.rollout import Rollout, ValueLM, make_rollout, sample_rollout, with_rewards
from sleep_jax.rl.update import grpo_loss, grpo_update, make_update, ppo_update, rl_update

__all__ = [
    "ADVANTAGES", "LOSSES", "REWARDS", "JudgeReward", "RLConfig", "Rollout", "ValueLM",
    "compute_advantages", "get_reward", "grpo_loss", "grpo_update", "make_rollout",
    "make_update", "ppo_update", "register_advantage", "register_loss", "register_reward",
    "rest_em_batch", "rest_em_step", "rl_update", "sample_rollout", "train_rl", "with_rewards",
]
