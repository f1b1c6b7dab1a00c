"""One dream iteration as one jitted pure function: generate, select, inner fine-tunes, reward,
generator update (PureJaxRL style).

The generator is the frozen model plus a generator adapter of its own: expert slot ``slot``
trained as an ``train.adapters.AdapterState`` (only the adapter and its optimizer state
change; the base model never does). The inner adapters live in another slot (``inner_slot``)
of the same frozen parameters. Both slots must be on, and the generator slot's frozen values
must contribute nothing (B = 0, as ``grow.activate_slot`` leaves it), so that the model the
dreams are applied to is the base model: ``check_generator`` verifies it on the host.

For Nc contexts (``DreamBatch``):
1. m = ``DreamConfig.dreams`` dreams per context sampled from the generator
   (``rl.sample_rollout``, sampling options from ``RLConfig``; ``group_size`` and
   ``max_new_tokens`` are taken from the DreamConfig);
2. each dream framed as [BOS] + dream tokens, scored by ``select.gradient_scores`` against C,
   the top-k plus b random kept (``select.keep_indices``), the verbatim-copy share counted;
3. ``reward.dream_rewards``: an adapter per dream plus the null adapter on C, vmapped, tau
   scored on each, rewards relative to the null dream;
4. the generator adapter updated by GRPO (``rl.grpo_update``, group = the dreams of one
   context), or with ``RLConfig(algorithm="rest_em")`` by ReST-EM (``rest_em_update``: SFT of
   the generator adapter on the dreams whose reward passes ``rest_threshold``).
   ``pg_over="all"`` (default) fine-tunes and rewards every drawn dream and takes the
   policy gradient over all of them: an unbiased estimate for the generator's sampling
   distribution, the k + b kept dreams being only what rehearsal receives. ``pg_over="kept"``
   fine-tunes only the kept dreams and takes the gradient over them (groups of k + b): cheaper,
   but biased: it optimises the reward of dreams conditioned on passing the importance filter
   (the top-k are not a sample of the generator), so the generator is pushed towards dreams
   that are both kept and rewarded, and the b random ones alone would be unbiased.

Routing noise (the paper's random extra expert while dreaming) is ``noise.RoutingNoise``,
passed to ``generate_and_select`` as the sampling policy (rehearsal at sleep uses it).

Data discipline: in training every input (the dream prompts around C, C, tau) comes from TASK
entities and the "task" wording (``tau.world_tau``); no evaluation or validation wording enters
generation, selection, reward or the update.

Shapes: Nc contexts, P prompt width, m dreams per context, Mx = max_dream_tokens, Tc context
width, Q questions, K candidates, k + b kept.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from sleep_jax.dream import select
from sleep_jax.dream.config import DreamConfig
from sleep_jax.dream.inner import DreamBase
from sleep_jax.dream.reward import dream_rewards
from sleep_jax.dream.tau import Tau
from sleep_jax.grow.experts import used_slots
from sleep_jax.rl.config import RLConfig
from sleep_jax.rl.rollout import Rollout, policy_outputs, sample_rollout, with_rewards
from sleep_jax.rl.update import grpo_update
from sleep_jax.train.adapters import AdapterState, create_adapter_state, extract_adapter
from sleep_jax.train.finite import skip_if_nonfinite
from sleep_jax.train.state import apply_gradients


@struct.dataclass
class DreamBatch:
    """Nc contexts: prompt [Nc,P] int32 right-padded (a dream prompt around C, e.g.
    ``world.dream_prompt``, BOS first if the model expects one), prompt_len [Nc]; ctx [Nc,Tc]
    int32 and ctx_mask [Nc,Tc] bool: C framed as the dreams are ([BOS] + C's tokens,
    left-aligned); tau: a ``Tau`` whose every field has a leading [Nc] axis (None when only
    dreaming, as at sleep)."""

    prompt: jax.Array
    prompt_len: jax.Array
    ctx: jax.Array
    ctx_mask: jax.Array
    tau: Tau | None = None


def check_generator(gen: AdapterState, inner_slot: int) -> None:
    """Host check: the generator and inner slots differ and are on, and the generator slot's
    frozen values contribute nothing (every B entry 0), so the dreams' base is the base model."""
    gslot = int(gen.slot)
    model = nnx.merge(gen.graphdef, gen.frozen, gen.other)
    on = used_slots(model)
    if gslot == inner_slot or gslot not in on or inner_slot not in on:
        raise ValueError(f"generator slot {gslot} and inner slot {inner_slot} must be two "
                         f"different slots that are on (slots on: {on})")
    frozen = extract_adapter(gen.frozen, jnp.asarray(gslot, jnp.int32))
    bs = [k for k in frozen if k.endswith("expert_b")]
    from sleep_jax.runtime import host_read  # the slot may span processes

    if not bs or any(np.any(host_read(frozen[k][...])) for k in bs):
        raise ValueError(f"the frozen values of generator slot {gslot} must have B = 0 (as "
                         f"activate_slot leaves them): the dreams' base model would otherwise "
                         f"include an old generator")


def prepare(model: nnx.Module, *, gen_slot: int, inner_slot: int, tx
            ) -> tuple[AdapterState, nnx.State]:
    """(generator state, adapter0) for dreaming with ``model`` (host side, checked).

    Both slots must be on (``grow.activate_slot``) and the generator slot's B zero; the
    generator state trains slot ``gen_slot`` with optimizer ``tx`` (``train.adapters``), and
    adapter0 is the inner slot's values, the start of every inner adapter.
    """
    from sleep_jax.dream.inner import make_base

    gen = create_adapter_state(model, gen_slot, tx)
    check_generator(gen, inner_slot)
    return gen, make_base(model, inner_slot)[1]


def _rl_config(rl: RLConfig, cfg: DreamConfig, group: int) -> RLConfig:
    if rl.algorithm not in ("grpo", "rest_em"):
        raise ValueError(f"dream_iteration updates the generator with 'grpo' or 'rest_em'; "
                         f"got RLConfig.algorithm={rl.algorithm!r}")
    return dataclasses.replace(rl, group_size=group, max_new_tokens=cfg.max_dream_tokens)


def rest_em_update(gen: AdapterState, rollout: Rollout, *, rl: RLConfig
                   ) -> tuple[AdapterState, dict]:
    """ReST-EM's M-step inside the jit (``rl.rest_em`` is its host-side form): keep the dreams
    whose reward is >= ``rl.rest_threshold`` (with the contrastive reward, 0 keeps the dreams
    that beat the null dream), then ``rl.rest_sft_steps`` optimizer steps of the generator
    adapter on their mean token NLL given the dream prompt. No dream kept: no step (the state
    is returned unchanged but for ``step``)."""
    keep = rollout.rewards >= rl.rest_threshold
    w = (rollout.mask & keep[:, None]).astype(jnp.float32)
    n = jnp.sum(w)

    def loss(p, g):
        model = nnx.merge(g.graphdef, g.full_params(p), g.other)
        lp = policy_outputs(model, rollout.prompt, rollout.prompt_len, rollout.completion,
                            rollout.mask, temperature=1.0)["logp"]
        return -jnp.sum(lp * w) / jnp.maximum(n, 1.0)

    def step(g, _):
        value, grads = jax.value_and_grad(loss)(g.params, g)
        new, skipped = skip_if_nonfinite(apply_gradients(g, grads), g, value, grads)
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(n > 0, x, y), a, b)
        new = new.replace(params=pick(new.params, g.params),
                          opt_state=pick(new.opt_state, g.opt_state))
        return new, (value, skipped)

    gen, (losses, skipped) = jax.lax.scan(step, gen, None, length=rl.rest_sft_steps)
    return gen, {"loss": losses[-1], "kept": jnp.sum(keep), "keep_frac": jnp.mean(keep),
                 "skipped": jnp.sum(skipped)}


def frame(tokens_bm, mask_bm, bos_id: int | None):
    """Dream rows as trained: [BOS] + tokens (mask True at BOS) when bos_id is given."""
    if bos_id is None:
        return tokens_bm, mask_bm
    B = tokens_bm.shape[0]
    return (jnp.concatenate([jnp.full((B, 1), bos_id, tokens_bm.dtype), tokens_bm], 1),
            jnp.concatenate([jnp.ones((B, 1), bool), mask_bm], 1))


def generate_and_select(gen: AdapterState, inner_slot, adapter0, batch: DreamBatch, rng, *,
                        cfg: DreamConfig, rl: RLConfig, bos_id: int | None,
                        eos_id: int | None, pad_id: int = 0, policy=None
                        ) -> tuple[Rollout, dict]:
    """Steps 1-2 (pure): m dreams per context, scored and the k + b kept.

    ``policy`` is the model that samples the dreams (default ``gen.model()``; e.g.
    ``noise.RoutingNoise`` around it); selection always uses the generator's frozen model.

    Returns (rollout of Nc*m rows, out) with out: "tokens" [Nc,m,Mx], "mask" [Nc,m,Mx] (the
    dreams, unframed), "scores" [Nc,m], "keep" [Nc,k+b] (indices into the m dreams), "copies"
    [Nc,m] bool (the dream copies C verbatim, ``select.copies_context``), "base"
    (``inner.DreamBase`` of the inner slot).
    """
    m = cfg.dreams
    rl_g = _rl_config(rl, cfg, m)
    k_gen, k_sel = jax.random.split(rng)
    rollout = sample_rollout(gen.model() if policy is None else policy, None, batch.prompt,
                             batch.prompt_len, k_gen, cfg=rl_g, eos_id=eos_id, pad_id=pad_id)
    Nc = batch.prompt.shape[0]
    toks = rollout.completion.reshape(Nc, m, -1)
    mask = rollout.mask.reshape(Nc, m, -1)
    base = DreamBase(gen.graphdef, gen.frozen, gen.other, jnp.asarray(inner_slot, jnp.int32))

    def per_context(t, mk, c, cm, key):
        ft, fm = frame(t, mk, bos_id)
        scores = select.gradient_scores(base, adapter0, ft, fm, c, cm)[cfg.score]
        keep = select.keep_indices(scores, key, top=cfg.keep_top, random=cfg.keep_random)
        off = 0 if bos_id is None else 1  # compare the dream with C's tokens after the BOS
        cc, ccm = c[off:], cm[off:]
        copies = jax.vmap(lambda a, b: select.copies_context(a, b, cc, ccm))(t, mk)
        return scores, keep, copies

    keys = jax.random.split(k_sel, Nc)
    scores, keep, copies = jax.vmap(per_context)(toks, mask, batch.ctx, batch.ctx_mask, keys)
    return rollout, {"tokens": toks, "mask": mask, "scores": scores, "keep": keep,
                     "copies": copies, "base": base}


def _take(x, keep):  # x [Nc,m,...], keep [Nc,k] -> [Nc,k,...]
    return jax.vmap(lambda a, i: a[i])(x, keep)


def dream_contexts(gen: AdapterState, inner_slot, adapter0, batch: DreamBatch, rng, *,
                   cfg: DreamConfig, rl: RLConfig, bos_id: int | None, eos_id: int | None,
                   pad_id: int = 0) -> dict:
    """Dreams for rehearsal (pure; no questions needed, ``batch.tau`` unused): the kept dreams
    of every context and the selection metrics.

    Returns {"tokens" [Nc,k+b,Mx], "mask", "scores" [Nc,k+b], "copy_share" (kept dreams that
    copy C verbatim), "score_mean"}. This is what the sleep pipeline calls with its trained
    generator on the new memories.
    """
    _, out = generate_and_select(gen, inner_slot, adapter0, batch, rng, cfg=cfg, rl=rl,
                                 bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    keep = out["keep"]
    return {"tokens": _take(out["tokens"], keep), "mask": _take(out["mask"], keep),
            "scores": _take(out["scores"], keep),
            "copy_share": jnp.mean(_take(out["copies"], keep).astype(jnp.float32)),
            "score_mean": jnp.mean(out["scores"])}


def dream_iteration(gen: AdapterState, inner_slot, adapter0, batch: DreamBatch, rng, *,
                    cfg: DreamConfig, rl: RLConfig, bos_id: int | None, eos_id: int | None,
                    pad_id: int = 0, shuffle_rewards=False, noise_slots=(),
                    noise_scale: float = 0.0) -> tuple[AdapterState, dict]:
    """One dream iteration (module docstring), pure: jit it whole.

    Args:
      gen: the generator's ``AdapterState`` (its ``tx`` is the generator's optimizer).
      inner_slot: the slot the inner adapters stand in for (int or int32 array).
      adapter0: the inner adapters' shared start (``inner.make_base(model, inner_slot)[1]``).
      batch: a ``DreamBatch`` with tau.
      rng: PRNG key.
      cfg, rl: the dreaming settings and the generator's RL settings (GRPO).
      shuffle_rewards: a control, never for training: when true (a Python bool, or a traced
        bool scalar so that the control and the real run share one compiled program), the
        rewards are permuted at random across all dreams of the batch (every context's group)
        before the update, so the update sees rewards with their marginal distribution but
        unrelated to the dreams. The metrics report the true rewards.
      noise_slots, noise_scale: routing noise while the dreams are sampled (``noise``; the
        trained slots of earlier sleeps, static): the rollout's behaviour log-probs are the
        noisy sampler's, the update's the generator's without noise, so GRPO's clipped ratio
        is the off-policy correction (with rl.kl_coef > 0, default 0, the KL's reference is
        those noisy log-probs too: no reference model is passed). Off with no slot or scale 0.
    Returns:
      (gen after the update, out) with out: "rewards" [Nc,m] (pg_over="all") or [Nc,k+b]
      ("kept"), "tokens"/"mask" [Nc,k+b,Mx] (the kept dreams), "keep", "scores" [Nc,m] and
      metrics: reward_mean, reward_std, zero_var_share (groups whose rewards are all equal:
      they give GRPO no signal), copy_share (kept dreams copying C verbatim), null_mean and
      base_mean (mean c_q of the null adapter and of the base), inner_loss_first/last, and the
      update's metrics under "update/".
    """
    if batch.tau is None:
        raise ValueError("dream_iteration needs batch.tau (the contexts' questions)")
    rng_dream, rng_upd = jax.random.split(rng)
    policy = None
    if noise_slots and noise_scale > 0:
        from sleep_jax.dream.noise import RoutingNoise

        rng_dream, k_noise = jax.random.split(rng_dream)
        policy = RoutingNoise(gen.model(), noise_slots, scale=noise_scale, key=k_noise,
                              max_len=batch.prompt.shape[1] + cfg.max_dream_tokens + 1)
    rollout, sel = generate_and_select(gen, inner_slot, adapter0, batch, rng_dream, cfg=cfg,
                                       rl=rl, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                                       policy=policy)
    keep, base = sel["keep"], sel["base"]
    Nc, m = sel["scores"].shape
    if cfg.pg_over == "all":
        toks, mask, group = sel["tokens"], sel["mask"], m
        rows = jnp.arange(Nc * m)
    else:
        toks, mask, group = _take(sel["tokens"], keep), _take(sel["mask"], keep), cfg.kept
        rows = (jnp.arange(Nc)[:, None] * m + keep).reshape(-1)

    def per_context(t, mk, c, cm, tau):
        ft, fm = frame(t, mk, bos_id)
        r = dream_rewards(base, adapter0, ft, fm, c, cm, tau, cfg=cfg)
        return {k: r[k] for k in ("rewards", "null", "base", "losses")}

    res = jax.vmap(per_context)(toks, mask, batch.ctx, batch.ctx_mask, batch.tau)
    rewards = res["rewards"]  # [Nc, group]
    rl_u = _rl_config(rl, cfg, group)
    ro = jax.tree.map(lambda x: x[rows], rollout)
    used = rewards.reshape(-1)
    if shuffle_rewards is not False:  # the control (docstring); False: not even traced
        rng_upd, k_perm = jax.random.split(rng_upd)
        used = jnp.where(shuffle_rewards, jax.random.permutation(k_perm, used), used)
    if rl_u.algorithm == "grpo":
        gen, upd = grpo_update(gen, with_rewards(ro, used, rl_u), rng_upd, cfg=rl_u)
    else:
        gen, upd = rest_em_update(gen, ro.replace(rewards=used), rl=rl_u)
    copies = _take(sel["copies"], keep).astype(jnp.float32)
    metrics = {"reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards),
               "zero_var_share": jnp.mean((jnp.max(rewards, 1) == jnp.min(rewards, 1)
                                           ).astype(jnp.float32)),
               "copy_share": jnp.mean(copies), "null_mean": jnp.mean(res["null"]),
               "base_mean": jnp.mean(res["base"]),
               "inner_loss_first": jnp.mean(res["losses"][..., 0]),
               "inner_loss_last": jnp.mean(res["losses"][..., -1])}
    metrics.update({f"update/{k}": v for k, v in upd.items()})
    out = {"rewards": rewards, "scores": sel["scores"], "keep": keep,
           "tokens": _take(sel["tokens"], keep), "mask": _take(sel["mask"], keep),
           "all_tokens": sel["tokens"], "all_mask": sel["mask"], **metrics}
    return gen, out
