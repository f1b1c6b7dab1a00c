"""``grow``: the whole growth as one jitted function written straight onto the target mesh.

The operators compose in a fixed order, each changing only its own config fields: expert slots,
heads, FFN width, residual width (which derives the new ``norm_eps``), depth. Every operator is a
list of ``AxisPlan``s applied to all parameters, non-trainable state, optimizer moments and the
trainable mask by logical axis name. The function is traced once per (source config, target
config, options, mesh, input structure) and compiled with ``out_shardings`` computed from the
target model's logical names on the target mesh, so the grown arrays are produced on their
shards (no host round-trip); the source may live on another mesh layout over the same devices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sleep_jax.grow.axismap import (
    AxisPlan,
    needs_std,
    resize_mask,
    resize_moment,
    resize_value,
    stds,
)
from sleep_jax.grow.depth import depth_plans
from sleep_jax.grow.experts import expert_plans
from sleep_jax.grow.ffn import ffn_plans
from sleep_jax.grow.flat import axes_of, flatten, rebuild
from sleep_jax.grow.heads import head_plans
from sleep_jax.grow.noise import Normals
from sleep_jax.grow.optimizer import (
    attach_clocks,
    check_tx,
    collect_moments,
    rebuild_opt_state,
    resize_clock,
    resize_flag,
    split_clocks,
    tx_for,
)
from sleep_jax.grow.spec import GrowOptions, check_growth
from sleep_jax.grow.stack import stack_plans
from sleep_jax.grow.width import width_plans
from sleep_jax.mesh import RULES, tree_shardings  # tree_shardings: also imported from here
from sleep_jax.models.config import ModelConfig

Factory = Callable[[ModelConfig], nnx.Module]


def default_factory(cfg: ModelConfig) -> nnx.Module:
    from sleep_jax.models.llama import Decoder

    return Decoder(cfg, rngs=nnx.Rngs(0))


@dataclasses.dataclass
class Step:
    """One operator: its name, the config after it, and its axis plans."""

    name: str
    cfg: ModelConfig
    plans: list[AxisPlan]


def plan_growth(src: ModelConfig, dst: ModelConfig, options: GrowOptions | None = None
                ) -> tuple[list[Step], ModelConfig]:
    """The composed operators for ``src -> dst`` and the grown config (with derived eps)."""
    options = options or GrowOptions()
    check_growth(src, dst)
    steps, cfg = [], src

    def add(name, after, plans):
        nonlocal cfg
        if plans:
            steps.append(Step(name, after, plans))
        cfg = after

    # the rank too: the first slots may take any rank (check_growth), later ones keep it
    after = cfg.replace(expert_slots=dst.expert_slots, expert_rank=dst.expert_rank,
                        expert_router=dst.expert_router)
    add("experts", after, expert_plans(cfg, after))
    after = cfg.replace(heads=dst.heads, kv_heads=dst.kv_heads)
    add("heads", after, head_plans(cfg, after, options.heads))
    after = cfg.replace(mlp=dst.mlp)
    add("ffn", after, ffn_plans(cfg, after, options.mlp))
    after = cfg.replace(embed=dst.embed)
    plans, eps = width_plans(cfg, after, options.width)
    add("width", after.replace(norm_eps=eps), plans)
    after = cfg.replace(layers=dst.layers)
    if options.depth == "stack":
        add("stack", after, stack_plans(cfg, after))
    else:
        add("depth", after, depth_plans(cfg, after, options.insert_at))
    return steps, cfg


def grown_config(src: ModelConfig, dst: ModelConfig, options: GrowOptions | None = None
                 ) -> ModelConfig:
    """The config of the grown model: ``dst`` with the ``norm_eps`` the width operator derives."""
    return plan_growth(src, dst, options)[1]


@functools.lru_cache(maxsize=64)
def _abstract(factory: Factory, cfg: ModelConfig):
    """(graphdef, params, other) of the model for ``cfg``, shapes only.

    Cached: abstract construction traces the model's initialisers (~0.1 s per config), and one
    growth asks for every intermediate config in each of its passes. Callers only read the
    result (``rebuild`` makes new trees)."""
    return nnx.split(nnx.eval_shape(lambda: factory(cfg)), nnx.Param, ...)


def _pre_size(plan: AxisPlan) -> int:
    """Length of ``plan.axis`` before the plan: every source index is copied at least once."""
    return int(plan.src.max()) + 1 if (plan.src >= 0).any() else 0


def _sizes_before(steps: list[Step], sizes: dict, t: int, axes, final_shape) -> tuple:
    """Shape, before step ``t``, of an array with logical ``axes`` and target ``final_shape``:
    each axis at its current length (``sizes``), else the length before the next plan that grows
    it, else its target length."""
    out = []
    for a, d in zip(axes, final_shape):
        if a not in sizes:
            later = [p for s in steps[t:] for p in s.plans if p.axis == a]
            d = _pre_size(later[0]) if later else d
        out.append(sizes.get(a, d))
    return tuple(out)


def grow_arrays(params, other, opt_state, rng, *, steps: list[Step], options: GrowOptions,
                factory: Factory = default_factory):
    """The growth on arrays (traceable; ``grow`` jits it with target shardings).

    Args:
      params, other: nnx.States of the source (trainable params; other variables).
      opt_state: optax state of the source or None.
      rng: key for new random weights and noise (``noise.Normals``).
      steps: from ``plan_growth``.
    Returns:
      (params, other, opt_state, mask) of the grown model; mask is a params-like state of bool
      arrays (scalar False where nothing is new) marking new entries and second copies.
    """
    return _grow_arrays(params, other, opt_state, Normals(rng), steps=steps, options=options,
                        factory=factory)


def _grow_arrays(params, other, opt_state, normals: Normals, *, steps: list[Step],
                 options: GrowOptions, factory: Factory):
    """``grow_arrays`` with its source of normals."""
    flat_p, flat_o = flatten(params), flatten(other)
    P = {k: v[...] for k, v in flat_p.items()}
    O = {k: v[...] for k, v in flat_o.items()}
    C = dict(P)  # the params without the copies' noise: what the stds are taken from
    AX = {k: axes_of(v) for k, v in {**flat_p, **flat_o}.items()}
    inner, clock_src, start = split_clocks(opt_state)
    moments = collect_moments(inner, params)
    clocks = None if clock_src is None else {k: v[...] for k, v in flatten(clock_src).items()}
    mask: dict[str, jax.Array | None] = dict.fromkeys(P)
    fresh: dict[str, jax.Array | None] = dict.fromkeys(P)  # moments started at zero here
    if not steps:  # nothing grows: an identity copy onto the target mesh
        return params, other, opt_state, rebuild(params, lambda k, v: jnp.zeros((), bool))
    # Only the target model is built (shapes only): intermediate shapes follow from the plans,
    # each logical axis having one length per model (what a plan's src map assumes).
    _, abs_p, abs_o = _abstract(factory, steps[-1].cfg)
    targets = ((P, flatten(abs_p)), (O, flatten(abs_o)))
    sizes: dict[str, int] = {}  # current length of each logical axis
    for k, x in {**P, **O}.items():
        for a, d in zip(AX[k] or (), x.shape):
            sizes.setdefault(a, d)
    for t, step in enumerate(steps):
        grown = {p.axis for p in step.plans}
        for store, target in targets:
            for k, v in target.items():
                axes = axes_of(v)
                if k in store or not axes:
                    continue
                shape = _sizes_before(steps, sizes, t, axes, v.shape)
                if not any(a in grown and d == 0 for a, d in zip(axes, shape)):
                    continue  # created by the step that grows one of its axes from length 0
                AX[k], store[k] = axes, jnp.zeros(shape, v.dtype)  # the plans fill it
                for a, d in zip(axes, shape):
                    sizes.setdefault(a, d)
                if store is P:
                    C[k] = store[k]
                    mask[k], fresh[k] = None, jnp.ones(shape, bool)
                    if clocks is not None:
                        clocks[k] = jnp.zeros(shape, jnp.int8)
                    for _, flat in moments.values():
                        flat[k] = store[k]
        for plan in step.plans:
            has = lambda k, axis=plan.axis: AX[k] is not None and axis in AX[k]
            # the stds that scale this plan's random values, batched (see axismap.stds)
            # (from the arrays without noise: C, see resize_value)
            std = stds({k: C[k] for k in P if has(k) and needs_std(
                AX[k], plan, is_param=True, noise=options.noise)}, options.init_std)
            for k in P:
                if not has(k):
                    continue
                P[k], C[k] = resize_value(P[k], AX[k], plan, is_param=True, normals=normals,
                                          noise=options.noise, init_std=options.init_std,
                                          std=std.get(k), clean=C[k])
                mask[k] = resize_mask(mask[k], P[k].shape, AX[k], plan)
                fresh[k] = resize_flag(fresh[k], P[k].shape, AX[k], plan)
                if clocks is not None:
                    clocks[k] = resize_clock(clocks[k], AX[k], plan)
                for second, flat in moments.values():
                    flat[k] = resize_moment(flat[k], AX[k], plan, second=second)
            for k in O:
                if has(k):
                    O[k] = resize_value(O[k], AX[k], plan, is_param=False, normals=normals,
                                        noise=0.0, init_std=options.init_std)
            sizes[plan.axis] = plan.size
    for store, target in targets:
        for k, v in target.items():
            got = store[k].shape if k in store else None
            if got != v.shape:
                raise AssertionError(f"growth {[s.name for s in steps]}: {k} has shape {got}, "
                                     f"the target model expects {v.shape}")
    new_params = rebuild(abs_p, lambda k, v: P[k])
    new_other = rebuild(abs_o, lambda k, v: O[k])
    new_inner = rebuild_opt_state(inner, params, moments, abs_p)
    new_opt = attach_clocks(new_inner, abs_p, fresh, clocks, start)
    new_mask = rebuild(abs_p, lambda k, v: jnp.zeros((), bool) if mask[k] is None else mask[k])
    return new_params, new_other, new_opt, new_mask


_CACHE: dict = {}


def _quiet_shardings(tree, mesh: Mesh, rules):
    """``tree_shardings`` without its not-divisible warnings: for the source's sizes on the
    target mesh, an intermediate layout (the grown arrays' own shardings are reported)."""
    logger = logging.getLogger("sleep_jax.mesh")
    disabled, logger.disabled = logger.disabled, True
    try:
        return tree_shardings(tree, mesh, rules)
    finally:
        logger.disabled = disabled


def compile_growth(src: ModelConfig, dst: ModelConfig, mesh: Mesh, example_args,
                   options: GrowOptions | None = None, factory: Factory = default_factory,
                   rules=RULES):
    """(jitted fn, target graphdef, grown config) for inputs shaped like ``example_args``
    = (params, other, opt_state, step, rng); cached."""
    options = options or GrowOptions()
    leaves, treedef = jax.tree.flatten(example_args)
    sig = tuple((tuple(x.shape), str(x.dtype)) for x in leaves)
    key = (src, dst, options, mesh, treedef, sig, factory, rules)
    if key in _CACHE:
        return _CACHE[key]
    steps, final_cfg = plan_growth(src, dst, options)
    graphdef, abs_p, abs_o = _abstract(factory, final_cfg)

    def fn(params, other, opt_state, step, rng):
        # Reshard the source once onto the target mesh (by its logical names), then grow there:
        # the partitioner otherwise resharded at each use, in more and larger kernels (tiny
        # fsdp=8 -> data=2,tensor=4: 195 -> 135 kernels); a no-op on the same mesh.
        src = (params, other, opt_state)
        params, other, opt_state = jax.lax.with_sharding_constraint(
            src, _quiet_shardings(src, mesh, rules))
        out = _grow_arrays(params, other, opt_state, Normals(rng), steps=steps,
                           options=options, factory=factory)
        return (*out, step)

    # a shapes-only pass gives the output structure (opt_state, mask) for out_shardings
    out_abs = jax.eval_shape(fn, *example_args)
    for got, want in zip(jax.tree.leaves(out_abs[0]), jax.tree.leaves(abs_p)):
        if (got.shape, got.dtype) != (want.shape, want.dtype):
            raise AssertionError(f"grown params {got} differ from the target model's {want}")
    shardings = (tree_shardings(abs_p, mesh, rules, strict=True),
                 tree_shardings(abs_o, mesh, rules, strict=True),
                 tree_shardings(out_abs[2], mesh, rules), tree_shardings(out_abs[3], mesh, rules),
                 NamedSharding(mesh, PartitionSpec()))
    if out_abs[4] is None:
        shardings = shardings[:4] + (None,)
    jitted = jax.jit(fn, out_shardings=shardings)
    _CACHE[key] = (jitted, graphdef, final_cfg)
    return _CACHE[key]


def grow(state, src_cfg: ModelConfig, dst_cfg: ModelConfig, *, mesh: Mesh, rng: jax.Array,
         options: GrowOptions | None = None, factory: Factory = default_factory):
    """Grow a train state from ``src_cfg`` to ``dst_cfg`` onto ``mesh`` (function preserving).

    Args:
      state: ``sleep_jax.train.state.TrainState`` of the source model (any mesh over the same
        devices, or unsharded).
      src_cfg: the source config; dst_cfg: the target (from ``spec.target_config``); its
        ``norm_eps`` is replaced by the derived one (see ``grown_config``).
      mesh: the target mesh; every output is laid out by the target's logical names on it.
      rng: key for new random weights and symmetry-breaking noise.
      options: ``GrowOptions`` (operator variants, noise, depth insert positions).
      factory: builds the model for a config (shapes only); default the Llama ``Decoder``.
    Returns:
      (state, trainable_mask): the grown state (graphdef of the grown config, optimizer moments
      mapped by the operators' gradient rules, new entries with zero moments, step kept) and a
      params-like pytree of bool arrays marking the new entries (new units, layers, slots and
      second copies), usable as ``apply_gradients(..., mask=)``.

      When the optimizer keeps a step count for bias correction (Adam) and the growth adds
      entries, those entries get their own count: the state's optimizer becomes
      ``EntryClockState`` and its ``tx`` ``entry_clocks(tx, G)`` (``sleep_jax.grow.optimizer``),
      so new entries' updates equal a fresh optimizer's on them and old entries continue their
      own moments and count. Restore such a state with ``entry_clocks(tx, G)`` as its ``tx``.
    """
    check_tx(state.tx, state.opt_state)
    args = (state.params, state.other, state.opt_state, state.step, rng)
    fn, graphdef, _ = compile_growth(src_cfg, dst_cfg, mesh, args, options, factory)
    params, other, opt_state, mask, step = fn(*args)
    tx = tx_for(state.tx, opt_state)
    return state.replace(graphdef=graphdef, params=params, other=other, opt_state=opt_state,
                         step=step, tx=tx), mask


def grow_model(model: nnx.Module, src_cfg: ModelConfig, dst_cfg: ModelConfig, *, mesh: Mesh,
               rng: jax.Array, options: GrowOptions | None = None,
               factory: Factory = default_factory):
    """Params-only ``grow`` for an NNX model: returns (grown model on ``mesh``, trainable mask)."""
    _, params, other = nnx.split(model, nnx.Param, ...)
    args = (params, other, None, None, rng)
    fn, graphdef, _ = compile_growth(src_cfg, dst_cfg, mesh, args, options, factory)
    params, other, _, mask, _ = fn(*args)
    return nnx.merge(graphdef, params, other), mask
