"""ReST-EM (Singh et al. 2024): keep the samples whose reward passes a threshold, then SFT.

E-step: sample G completions per prompt (``sample_rollout``) and score them; M-step: maximise
the log-likelihood of the kept completions given their prompts with B's train step. The paper
("Language Models Need Sleep") names ReST-EM as its optimiser; here it is the baseline that
GRPO/PPO are compared with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.rl.rollout import Rollout
from sleep_jax.sampling import join


def rest_em_batch(rollout: Rollout, threshold: float, pad_id: int = 0) -> tuple[dict, int]:
    """The SFT batch of kept samples: (B's batch dict [B,T], number of kept rows).

    Every row keeps its place (fixed shapes, no recompilation); a rejected row has an all-False
    loss mask. The loss covers only completion tokens, never the prompt.
    """
    keep = np.asarray(rollout.rewards) >= threshold
    toks, pos, valid, cpos = join(rollout.prompt, rollout.prompt_len, rollout.completion,
                                  rollout.mask, pad_id)
    B, T = toks.shape
    loss = jnp.zeros((B, T), bool).at[jnp.arange(B)[:, None], cpos - 1].set(
        rollout.mask & jnp.asarray(keep)[:, None])
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "positions": pos[:, :-1],
             "segment_ids": valid[:, :-1].astype(jnp.int32), "mask": valid[:, :-1],
             "loss_mask": loss[:, :-1]}
    return batch, int(keep.sum())


def rest_em_step(state, rollout: Rollout, rng, *, train_step, threshold: float = 1.0,
                 sft_steps: int = 1, pad_id: int = 0):
    """M-step: ``sft_steps`` steps of ``train_step`` (``make_train_step``) on the kept samples.

    Returns (state, metrics) with kept (rows), keep_frac and the last SFT loss; when no sample
    passes the threshold the state is returned unchanged (no optimizer step on an empty batch).
    """
    batch, kept = rest_em_batch(rollout, threshold, pad_id)
    metrics = {"kept": kept, "keep_frac": kept / rollout.mask.shape[0], "loss": float("nan")}
    for s in range(sft_steps if kept else 0):
        state, m = train_step(state, batch, jax.random.fold_in(rng, s))
        metrics["loss"] = float(m["loss"])
    return state, metrics
