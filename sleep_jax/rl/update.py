"""GRPO and PPO updates: one jitted pure function of (state, rollout, rng) each.

PureJaxRL style: epochs and mini-batches are nested ``lax.scan``s inside one jit (an optimizer
step per mini-batch), micro-batches a third scan that accumulates exact gradients:

  loss(mb) = pg_sum / N_pg + kl_coef * kl_sum / N_tok - entropy_coef * H_sum / N_tok
             + vf_coef * value_sum / N_tok,

with the normalisers N taken over the whole mini-batch before the micro-batch scan (they do
not depend on the parameters), so the sum of micro-batch gradients is the mini-batch gradient.
N_tok is the mini-batch's completion-token count (loss_norm="tokens") or the constant
rows x M (loss_norm="constant", Dr. GRPO); N_pg = N_tok, or the sequence count for the
sequence-level loss.
GRPO (Shao et al. 2024) uses group advantages and no critic; PPO (Schulman et al. 2017) adds a
value head (``ValueLM``) trained on GAE returns. An optional trainable mask restricts the update
(``apply_gradients``); a non-finite loss or gradient skips that optimizer step
(``train.finite.skip_if_nonfinite``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sleep_jax.mesh import RULES, batch_sharding
from sleep_jax.rl import losses
from sleep_jax.rl.config import RLConfig
from sleep_jax.rl.rollout import Rollout, policy_outputs
from sleep_jax.train.finite import skip_if_nonfinite
from sleep_jax.train.state import TrainState, apply_gradients, train_state_shardings

_AUX = ("pg", "kl", "entropy", "clip", "value")


def loss_norms(mb: Rollout, cfg: RLConfig) -> dict:
    """What divides the loss sums of a mini-batch ``mb`` (none depends on the parameters).

    ``count``: its completion tokens (the metrics' denominator); ``tok``: the divisor of the
    token terms (KL, entropy, value): ``count`` under loss_norm="tokens", the constant
    rows x M (M = completion width, the rollout's max_new_tokens) under "constant" (Dr. GRPO);
    ``pg``: the policy term's, the same as ``tok`` or, for clipped_sequence, the number of
    non-empty sequences.
    """
    m = mb.mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1.0)
    tok = (jnp.asarray(float(m.shape[0] * m.shape[1]), jnp.float32)
           if cfg.loss_norm == "constant" else count)
    seq = jnp.maximum(jnp.sum(jnp.any(mb.mask, 1).astype(jnp.float32)), 1.0)
    return {"count": count, "tok": tok,
            "pg": seq if cfg.policy_loss == "clipped_sequence" else tok}


def grpo_loss(params, batch: Rollout, *, graphdef, other, cfg: RLConfig, norms: dict,
              compose=None):
    """The RL loss of ``batch`` (a mini- or micro-batch) normalised by mini-batch ``norms``.

    ``compose``: params -> the full parameters (an ``AdapterState``'s ``full_params``: the
    trained adapter written into its slot), or None when ``params`` are the full parameters.
    Returns (loss, aux) with aux the un-normalised sums of pg, kl, entropy, clip and value
    terms (PPO's value term only when cfg.algorithm == "ppo").
    """
    model = nnx.merge(graphdef, params if compose is None else compose(params), other)
    ppo = cfg.algorithm == "ppo"
    po = policy_outputs(model, batch.prompt, batch.prompt_len, batch.completion, batch.mask,
                        temperature=cfg.temperature, values=ppo, entropy=True)
    logp = po["logp"]
    clip_kw = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high)
    pg, _ = losses.LOSSES[cfg.policy_loss](logp, batch.old_logp, batch.advantages, batch.mask,
                                           **clip_kw)
    kl, _ = losses.LOSSES[cfg.kl_estimator](logp, batch.ref_logp, batch.mask)
    ent = po["entropy"] if cfg.entropy_coef else jax.lax.stop_gradient(po["entropy"])
    ent, _ = losses.entropy(ent, batch.mask)
    clip, _ = losses.clip_fraction(jax.lax.stop_gradient(logp), batch.old_logp,
                                   batch.advantages, batch.mask, **clip_kw)
    loss = pg / norms["pg"] + (cfg.kl_coef * kl - cfg.entropy_coef * ent) / norms["tok"]
    value = jnp.zeros((), jnp.float32)
    if ppo:
        value, _ = losses.value_loss(po["values"], batch.values, batch.returns, batch.mask,
                                     clip=cfg.value_clip)
        loss = loss + cfg.vf_coef * value / norms["tok"]
    if not cfg.kl_coef:
        kl = jax.lax.stop_gradient(kl)
    return loss, dict(zip(_AUX, (pg, kl, ent, clip, value)))


def _split_micro(x, k: int):
    """[B,...] -> [k, B/k, ...], micro-batch j = rows j, j+k, ... (no cross-shard movement)."""
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def _minibatch_step(state: TrainState, mb: Rollout, mask, cfg: RLConfig):
    norms = loss_norms(mb, cfg)
    grad_fn = jax.value_and_grad(grpo_loss, has_aux=True)
    kw = dict(graphdef=state.graphdef, other=state.other, cfg=cfg, norms=norms,
              compose=getattr(state, "full_params", None))  # an AdapterState trains its slot
    k = cfg.micro_batches
    if k == 1:
        (loss, aux), grads = grad_fn(state.params, mb, **kw)
    else:
        micro = jax.tree.map(lambda x: _split_micro(x, k), mb)

        def body(carry, m):
            (l, a), g = grad_fn(state.params, m, **kw)
            cl, ca, cg = carry
            return (cl + l, jax.tree.map(jnp.add, ca, a), jax.tree.map(jnp.add, cg, g)), None

        zero = (jnp.zeros(()), {n: jnp.zeros(()) for n in _AUX},
                jax.tree.map(jnp.zeros_like, state.params))
        (loss, aux, grads), _ = jax.lax.scan(body, zero, micro)
    gnorm = optax.tree.norm(grads)
    new, skipped = skip_if_nonfinite(apply_gradients(state, grads, mask), state, loss, grads)
    n = norms["count"]  # metrics are per-token means whatever the loss normaliser
    metrics = {"loss": loss, "pg_loss": aux["pg"] / norms["pg"], "kl": aux["kl"] / n,
               "entropy": aux["entropy"] / n, "clip_frac": aux["clip"] / n,
               "value_loss": aux["value"] / n, "grad_norm": gnorm,
               "skipped": skipped}
    return new, metrics


def _check_shapes(rollout: Rollout, cfg: RLConfig) -> None:
    B = rollout.mask.shape[0]
    mb = B // cfg.mini_batches
    if B % cfg.mini_batches or mb % cfg.micro_batches:
        raise ValueError(f"rollout of {B} rows must split into mini_batches={cfg.mini_batches} "
                         f"of micro_batches={cfg.micro_batches} equal parts")


def rl_update(state: TrainState, rollout: Rollout, rng, mask=None, *, cfg: RLConfig
              ) -> tuple[TrainState, dict]:
    """epochs x mini_batches optimizer steps on ``rollout`` (pure; jit it or ``make_update``).

    Returns (state, metrics) with metrics averaged over the optimizer steps plus the rollout's
    reward_mean, reward_std and response_len (mean completion tokens).
    """
    _check_shapes(rollout, cfg)
    B = rollout.mask.shape[0]
    n = cfg.mini_batches

    def epoch(state, key):
        batch = rollout
        if n > 1:  # shuffle whole rows: advantages were computed over whole groups already
            perm = jax.random.permutation(key, B)
            batch = jax.tree.map(lambda x: x[perm], rollout)
        mbs = jax.tree.map(lambda x: x.reshape((n, B // n) + x.shape[1:]), batch)
        return jax.lax.scan(lambda s, mb: _minibatch_step(s, mb, mask, cfg), state, mbs)

    state, ms = jax.lax.scan(epoch, state, jax.random.split(rng, cfg.epochs))
    metrics = jax.tree.map(jnp.mean, ms)
    metrics["skipped"] = jnp.sum(ms["skipped"])
    metrics["reward_mean"] = jnp.mean(rollout.rewards)
    metrics["reward_std"] = jnp.std(rollout.rewards)
    metrics["response_len"] = jnp.mean(jnp.sum(rollout.mask, 1).astype(jnp.float32))
    return state, metrics


def grpo_update(state: TrainState, rollout: Rollout, rng, mask=None, *, cfg: RLConfig):
    """GRPO update (no critic): ``rl_update`` with cfg.algorithm == "grpo"."""
    if cfg.algorithm != "grpo":
        raise ValueError(f"grpo_update needs cfg.algorithm='grpo', got {cfg.algorithm!r}")
    return rl_update(state, rollout, rng, mask, cfg=cfg)


def ppo_update(state: TrainState, rollout: Rollout, rng, mask=None, *, cfg: RLConfig):
    """PPO update: policy surrogate + clipped value loss; the state's model is a ``ValueLM``."""
    if cfg.algorithm != "ppo":
        raise ValueError(f"ppo_update needs cfg.algorithm='ppo', got {cfg.algorithm!r}")
    return rl_update(state, rollout, rng, mask, cfg=cfg)


def make_update(state: TrainState, mesh: Mesh, cfg: RLConfig, *, mask=None, rules=RULES,
                donate: bool = True):
    """``update(state, rollout, rng) -> (state, metrics)`` jitted on ``mesh``.

    The state keeps its logical-axis shardings in and out (donated), rollout rows are split
    over the mesh's batch axes, metrics are replicated. ``update.jitted`` is the jitted core.
    """
    fn = {"grpo": grpo_update, "ppo": ppo_update}.get(cfg.algorithm)
    if fn is None:
        raise ValueError(f"make_update handles 'grpo' and 'ppo', not {cfg.algorithm!r} "
                         f"(ReST-EM: rest_em_step)")
    state_sh = train_state_shardings(state, mesh, rules)
    repl = NamedSharding(mesh, PartitionSpec())
    if mask is not None:
        mask = jax.device_put(jax.tree.map(lambda m: jnp.asarray(m, bool), mask),
                              jax.tree.map(lambda _: repl, mask))

    def core(st, rollout, rng, m):
        return fn(st, rollout, rng, m, cfg=cfg)

    jitted = jax.jit(core, out_shardings=(state_sh, repl),
                     donate_argnums=(0,) if donate else ())

    def update(st: TrainState, rollout: Rollout, rng):
        _check_shapes(rollout, cfg)
        rsh = jax.tree.map(lambda x: batch_sharding(mesh, x.ndim, x.shape[0], rules), rollout)
        with jax.set_mesh(mesh):
            return jitted(jax.device_put(st, state_sh), jax.device_put(rollout, rsh), rng, mask)

    update.jitted = jitted
    return update
