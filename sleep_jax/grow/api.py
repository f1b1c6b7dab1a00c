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
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sleep_jax.grow.axismap import AxisPlan, Normals, resize_mask, resize_moment, resize_value
from sleep_jax.grow.depth import depth_plans
from sleep_jax.grow.experts import expert_plans
from sleep_jax.grow.ffn import ffn_plans
from sleep_jax.grow.flat import axes_of, flatten, rebuild
from sleep_jax.grow.heads import head_plans
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

    after = cfg.replace(expert_slots=dst.expert_slots, expert_router=dst.expert_router)
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


def _abstract(factory: Factory, cfg: ModelConfig):
    """(graphdef, params, other) of the model for ``cfg``, shapes only."""
    return nnx.split(nnx.eval_shape(lambda: factory(cfg)), nnx.Param, ...)


def _zeros_missing(v, step: Step):
    """A source stand-in for a variable the step creates: size 0 along the step's axes."""
    axes = axes_of(v)
    grown = {p.axis for p in step.plans}
    shape = tuple(0 if a in grown else d for a, d in zip(axes, v.shape))
    return jnp.zeros(shape, v.dtype)


def grow_arrays(params, other, opt_state, rng, *, steps: list[Step], options: GrowOptions,
                factory: Factory = default_factory):
    """The growth on arrays (traceable; ``grow`` jits it with target shardings).

    Args:
      params, other: nnx.States of the source (trainable params; other variables).
      opt_state: optax state of the source or None.
      rng: key for new random weights and noise (one ``jax.random.normal`` draw serves all).
      steps: from ``plan_growth``.
    Returns:
      (params, other, opt_state, mask) of the grown model; mask is a params-like state of bool
      arrays (scalar False where nothing is new) marking new entries and second copies.
    """
    sizes = normal_sizes(params, other, opt_state, rng, steps=steps, options=options,
                         factory=factory)
    return _grow_arrays(params, other, opt_state, Normals(rng, sizes), steps=steps,
                        options=options, factory=factory)


def normal_sizes(params, other, opt_state, rng, *, steps, options, factory=default_factory
                 ) -> tuple[int, ...]:
    """The sizes of the normal draws the growth asks for, in order (a shapes-only pass)."""
    asked: list[int] = []
    jax.eval_shape(lambda p, o, s, r: _grow_arrays(p, o, s, Normals(r), steps=steps,
                                                   options=options, factory=factory,
                                                   record=asked),
                   params, other, opt_state, rng)
    return tuple(asked)


def _grow_arrays(params, other, opt_state, normals: Normals, *, steps: list[Step],
                 options: GrowOptions, factory: Factory, record: list | None = None):
    """``grow_arrays`` with its normals pool; ``record`` receives the sizes asked for."""
    flat_p, flat_o = flatten(params), flatten(other)
    P = {k: v[...] for k, v in flat_p.items()}
    O = {k: v[...] for k, v in flat_o.items()}
    AX = {k: axes_of(v) for k, v in {**flat_p, **flat_o}.items()}
    inner, clock_src, start = split_clocks(opt_state)
    moments = collect_moments(inner, params)
    clocks = None if clock_src is None else {k: v[...] for k, v in flatten(clock_src).items()}
    mask: dict[str, jax.Array | None] = dict.fromkeys(P)
    fresh: dict[str, jax.Array | None] = dict.fromkeys(P)  # moments started at zero here
    final = None
    for step in steps:
        _, abs_p, abs_o = final = _abstract(factory, step.cfg)
        for store, abs_tree in ((P, abs_p), (O, abs_o)):
            for k, v in flatten(abs_tree).items():
                if k not in store:
                    AX[k] = axes_of(v)
                    store[k] = _zeros_missing(v, step)
                    if store is P:
                        mask[k] = None
                        fresh[k] = jnp.ones(store[k].shape, bool)
                        if clocks is not None:
                            clocks[k] = jnp.zeros(store[k].shape, jnp.int8)
                        for _, flat in moments.values():
                            flat[k] = store[k]
        for plan in step.plans:
            for k in P:
                if AX[k] is None or plan.axis not in AX[k]:
                    continue
                P[k] = resize_value(P[k], AX[k], plan, is_param=True, normals=normals,
                                    noise=options.noise, init_std=options.init_std)
                mask[k] = resize_mask(mask[k], P[k].shape, AX[k], plan)
                fresh[k] = resize_flag(fresh[k], P[k].shape, AX[k], plan)
                if clocks is not None:
                    clocks[k] = resize_clock(clocks[k], AX[k], plan)
                for second, flat in moments.values():
                    flat[k] = resize_moment(flat[k], AX[k], plan, second=second)
            for k in O:
                if AX[k] is not None and plan.axis in AX[k]:
                    O[k] = resize_value(O[k], AX[k], plan, is_param=False, normals=normals,
                                        noise=0.0, init_std=options.init_std)
        for store, abs_tree in ((P, abs_p), (O, abs_o)):
            for k, v in flatten(abs_tree).items():
                if store[k].shape != v.shape:
                    raise AssertionError(f"growth step {step.name!r}: {k} has shape "
                                         f"{store[k].shape}, the target model expects {v.shape}")
    if record is not None:
        record.extend(normals.asked)
    if final is None:  # nothing grows: an identity copy onto the target mesh
        return params, other, opt_state, rebuild(params, lambda k, v: jnp.zeros((), bool))
    _, abs_p, abs_o = final
    new_params = rebuild(abs_p, lambda k, v: P[k])
    new_other = rebuild(abs_o, lambda k, v: O[k])
    new_inner = rebuild_opt_state(inner, params, moments, abs_p)
    new_opt = attach_clocks(new_inner, abs_p, fresh, clocks, start)
    new_mask = rebuild(abs_p, lambda k, v: jnp.zeros((), bool) if mask[k] is None else mask[k])
    return new_params, new_other, new_opt, new_mask


_CACHE: dict = {}


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

    asked: list[int] = []

    def fn(params, other, opt_state, step, rng, record=None):
        sizes = None if record is not None else tuple(asked)
        out = _grow_arrays(params, other, opt_state, Normals(rng, sizes), steps=steps,
                           options=options, factory=factory, record=record)
        return (*out, step)

    # one shapes-only pass gives the output shapes and the sizes of the normal draws
    out_abs = jax.eval_shape(lambda *a: fn(*a, record=asked), *example_args)
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
