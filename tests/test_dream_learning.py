"""Dreaming learns (issue 12, item 9): on the real reward (generate, select, inner fine-tunes,
the contrastive reward over the null dream, GRPO: ``iteration.dream_iteration``), the
generator's mean reward rises over updates, while a shuffled-reward control (the same rewards
permuted across the batch's dreams before each update, ``shuffle_rewards``) does not.

Cheap: one tiny random model (1 layer, vocab 32), 2 contexts of random tokens with one
question of 4 one-token candidates each, 8 dreams of 6 tokens per context, one compiled
iteration shared by both arms (the control flag is a traced argument), 30 updates per arm
from the same generator with the same keys, 4 runs of other keys (GRPO on one run is noisy:
measured, one run in four ends below its start; the test asserts over the 4 runs). The random
model's final norm is scaled up x20: at init its logits are nearly constant (entropy ~ log V),
and no slot adapter could make the generator's or the inner adapters' outputs peaked (the
final RMSNorm bounds the hidden state).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax.dream import iteration
from sleep_jax.dream.config import DreamConfig
from sleep_jax.dream.tau import Tau
from sleep_jax.grow import activate_slot, grow_model
from sleep_jax.mesh import make_mesh
from sleep_jax.models import create_model, get_preset
from sleep_jax.rl import RLConfig
from sleep_jax.train.optim import OptimConfig, make_optimizer

V, NC, M, MX, K, BOS, UPDATES, GEN_LR = 32, 2, 8, 6, 4, 1, 30, 2e-2
KEYS = (100, 1000, 2000, 3000)  # update i of run r uses key(KEYS[r] + i)


def _setup(lr=GEN_LR):
    cfg = get_preset("tiny", vocab=V, embed=32, mlp=64, layers=1, heads=4, kv_heads=2,
                     head_dim=8)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    model, _ = grow_model(create_model(cfg, seed=0), cfg,
                          cfg.replace(expert_slots=2, expert_rank=4), mesh=mesh,
                          rng=jax.random.key(1))
    params = nnx.state(model, nnx.Param)
    params["final_norm"][...] = params["final_norm"][...] * 20.0
    nnx.update(model, params)
    model, _ = activate_slot(model, None, 0, jax.random.key(2), std=0.5)  # the generator
    model, _ = activate_slot(model, None, 1, jax.random.key(3))  # the inner adapters
    rng = np.random.default_rng(0)
    q_prompt = np.c_[np.full((NC, 1), BOS), rng.integers(4, V, (NC, 3))][:, None]  # [NC,1,4]
    tau = Tau(jnp.asarray(q_prompt, jnp.int32), jnp.full((NC, 1), 4, jnp.int32),
              jnp.asarray(rng.integers(4, V, (NC, 1, K, 1)), jnp.int32),
              jnp.ones((NC, 1, K, 1), bool), jnp.zeros((NC, 1), jnp.int32))
    batch = iteration.DreamBatch(
        prompt=jnp.asarray(np.c_[np.full(NC, BOS), rng.integers(4, V, (NC, 2))], jnp.int32),
        prompt_len=jnp.full((NC,), 3, jnp.int32),
        ctx=jnp.asarray(np.c_[np.full(NC, BOS), rng.integers(4, V, (NC, 7))], jnp.int32),
        ctx_mask=jnp.ones((NC, 8), bool), tau=tau)
    gen, a0 = iteration.prepare(model, gen_slot=0, inner_slot=1, tx=make_optimizer(
        OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.0), 1000))
    # one device throughout, so the updated state reuses the first step's program
    return jax.device_put((gen, a0, batch), jax.devices()[0])


# Sensitive to float rounding: with the suite's loop emitters (tests/conftest.py) the shuffled
# control misses the 0.8 margin (-1.75 vs the real arm's -1.05); with XLA's default emitters it
# holds (-2.72). Run: SLEEP_JAX_TEST_XLA_EMITTERS=1 PYTEST_ARGS="-m slow -k dream_learning".
@pytest.mark.slow
def test_generator_reward_rises_over_updates_and_a_shuffled_control_does_not():
    gen0, a0, batch = _setup()
    cfg = DreamConfig(dreams=M, keep_top=1, keep_random=1, steps=3, lr=0.1, clip_norm=1.0,
                      max_dream_tokens=MX)
    rl = RLConfig(group_size=M, max_new_tokens=MX)
    step = jax.jit(lambda g, a, b, r, s: iteration.dream_iteration(
        g, 1, a, b, r, cfg=cfg, rl=rl, bos_id=BOS, eos_id=None, shuffle_rewards=s))
    rises = {False: [], True: []}
    last = {False: [], True: []}
    for run in range(len(KEYS)):
        for shuffled in (False, True):
            gen, rewards = gen0, []
            for i in range(UPDATES):
                key = jax.random.key(KEYS[run] + i)
                gen, out = step(gen, a0, batch, key, jnp.asarray(shuffled))
                rewards.append(float(out["reward_mean"]))
                assert int(out["update/skipped"]) == 0
            c = np.asarray(rewards)
            rises[shuffled].append(c[-5:].mean() - c[:5].mean())  # last 5 over first 5
            last[shuffled].append(c[-5:].mean())
    rise = {k: float(np.mean(v)) for k, v in rises.items()}
    # measured (CPU, 2026-12-01), rise of the mean reward, last 5 updates over the first 5:
    # real 2.61, -0.49, 3.35, 3.22 (mean 2.17); shuffled 0.04, 1.88, -0.47, -1.91 (-0.12);
    # mean of the last 5: real -1.05, shuffled -2.72 (all start near -2.5)
    assert rise[False] > 1.0, rises
    assert rise[False] > rise[True] + 1.0, rises
    assert np.mean(last[False]) > np.mean(last[True]) + 0.8, last
    assert sum(a > b for a, b in zip(rises[False], rises[True])) >= len(KEYS) - 1, rises
