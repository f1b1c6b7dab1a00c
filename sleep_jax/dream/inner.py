"""The inner loop: one isolated adapter per dream, all fine-tuned at once, then scored on tau.

Every dream gets its own copy of an expert slot's parameters (``train.adapters``: slot ``e`` of
every slot leaf, the expert axis removed: A [L,D,R], B [L,R,D], with a router [L,D,1], [L,1]),
all starting from the same values ``adapter0`` (after ``grow.activate_slot``: A random, B = 0,
so every adapter starts as the base model). Each adapter takes n Adam steps on its own dream's
tokens (``DreamConfig.steps``, ``lr``, ``clip_norm``: global-norm clipping per dream), the n
steps a ``lax.scan``. All M dreams run at once: ``finetune`` is ``jax.vmap`` of the per-dream
``finetune_one`` over a leading dream axis (adapters [M, ...], dream tokens [M,T]); the base
weights are one argument, not mapped (``in_axes=None``), so they are never copied per dream:
only the stacked slot leaves ([L,E,...], the slot written in) become per-dream values inside
the forward pass. ``finetune_and_score`` evaluates tau for every adapter in the same jitted,
vmapped pass.

Data discipline: the dreams and tau given here are built from TASK-split inputs in training;
no evaluation or validation wording enters them.

Shapes: M dreams, T dream width (tokens, left-aligned with a valid mask; row 0 is usually BOS),
L layers, D embed, R expert rank, E slots, Q tau questions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from sleep_jax.dream.config import DreamConfig
from sleep_jax.dream.tau import Tau, contrastive_logprob
from sleep_jax.grow.experts import used_slots
from sleep_jax.train.adapters import extract_adapter, insert_adapter
from sleep_jax.train.finite import is_finite
from sleep_jax.train.loss import cross_entropy


@struct.dataclass
class DreamBase:
    """The frozen model dreams are applied to: graphdef (static), the full parameters, the
    other variables (SlotMask) and the slot (int32 scalar, traced) each inner adapter stands
    in for."""

    graphdef: Any = struct.field(pytree_node=False)
    params: nnx.State
    other: nnx.State
    slot: jax.Array


def make_base(model: nnx.Module, slot: int) -> tuple[DreamBase, nnx.State]:
    """(DreamBase, adapter0) for inner adapters in expert slot ``slot`` of ``model``.

    The slot must be on (``grow.activate_slot``), else its output is masked to
    zero and no adapter could learn; adapter0 is the slot's current values.
    """
    E = model.config.expert_slots
    if not 0 <= slot < E:
        raise ValueError(f"inner slot {slot} out of range for {E} expert slots")
    if slot not in used_slots(model):
        raise ValueError(f"inner slot {slot} is off: activate it (grow.activate_slot) before "
                         f"dreaming (slots on: {used_slots(model)})")
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    s = jnp.asarray(slot, jnp.int32)
    return DreamBase(graphdef, params, other, s), extract_adapter(params, s)


def adapted_model(base: DreamBase, adapter: nnx.State) -> nnx.Module:
    """The base model with ``adapter`` written into its slot (differentiable in adapter)."""
    return nnx.merge(base.graphdef, insert_adapter(base.params, adapter, base.slot), base.other)


def sft_loss(base: DreamBase, adapter: nnx.State, tokens_t: jax.Array, mask_t: jax.Array
             ) -> jax.Array:
    """Mean next-token NLL of one text row under the adapted model (fp32 scalar).

    tokens_t [T] int32, mask_t [T] bool (valid tokens, a left-aligned prefix): every valid token
    after the first is predicted from the ones before it; 0 for a row of under two tokens.
    """
    model = adapted_model(base, adapter)
    T = tokens_t.shape[0]
    valid = mask_t[None, :-1]
    pos = jnp.arange(T - 1, dtype=jnp.int32)[None]
    logits, _ = model(tokens_t[None, :-1], pos, mask=valid)
    s, c = cross_entropy(logits, tokens_t[None, 1:], valid & mask_t[None, 1:])
    return s / jnp.maximum(c, 1.0)


def make_tx(cfg: DreamConfig) -> optax.GradientTransformation:
    """Global-norm clipping (``cfg.clip_norm`` > 0) then Adam at the constant ``cfg.lr``."""
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*chain, optax.adam(cfg.lr))


def finetune_one(base: DreamBase, adapter0: nnx.State, tokens_t: jax.Array, mask_t: jax.Array,
                 *, cfg: DreamConfig) -> tuple[nnx.State, jax.Array]:
    """One adapter fine-tuned ``cfg.steps`` Adam steps on one dream (pure).

    Returns (adapter, losses [n]) with losses[i] the SFT loss before step i. A step whose loss
    or gradient is not finite is skipped (adapter and optimizer state unchanged).
    """
    tx = make_tx(cfg)
    grad_fn = jax.value_and_grad(lambda a: sft_loss(base, a, tokens_t, mask_t))

    def step(carry, _):
        a, opt = carry
        loss, g = grad_fn(a)
        upd, new_opt = tx.update(g, opt, a)
        ok = is_finite(loss, g)
        keep = lambda n, o: jax.tree.map(lambda x, y: jnp.where(ok, x, y), n, o)
        return (keep(optax.apply_updates(a, upd), a), keep(new_opt, opt)), loss

    (a, _), losses = jax.lax.scan(step, (adapter0, tx.init(adapter0)), None, length=cfg.steps)
    return a, losses


def finetune(base: DreamBase, adapter0: nnx.State, tokens_mt: jax.Array, mask_mt: jax.Array, *,
             cfg: DreamConfig) -> tuple[nnx.State, jax.Array]:
    """``finetune_one`` on M dreams at once: (adapters with a leading [M] axis, losses [M,n]).

    vmapped over the dreams only: ``base`` and ``adapter0`` are shared (in_axes None)."""
    fn = lambda t, m: finetune_one(base, adapter0, t, m, cfg=cfg)
    return jax.vmap(fn)(tokens_mt, mask_mt)


def score_adapters(base: DreamBase, adapters: nnx.State, tau: Tau, measure=contrastive_logprob
                   ) -> jax.Array:
    """``measure(model, tau)`` [Q] for every adapter of a stacked [M, ...] tree: [M,Q]."""
    return jax.vmap(lambda a: measure(adapted_model(base, a), tau))(adapters)


def finetune_and_score(base: DreamBase, adapter0: nnx.State, tokens_mt, mask_mt, tau: Tau, *,
                       cfg: DreamConfig, measure=contrastive_logprob) -> dict:
    """The inner loop of one context in one pass: fine-tune M adapters, score tau on each.

    Returns {"adapters": [M, ...] tree, "losses": [M,n], "tau": [M,Q] (``measure`` after the
    fine-tune)}.
    """
    adapters, losses = finetune(base, adapter0, tokens_mt, mask_mt, cfg=cfg)
    return {"adapters": adapters, "losses": losses,
            "tau": score_adapters(base, adapters, tau, measure)}
