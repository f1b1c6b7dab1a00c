"""Every step of the method compiled for a mesh on abstract inputs: nothing is allocated.

Each builder returns a ``Built``: the jitted function the framework itself runs (the same
``make_train_step``, ``make_seeding_step``, ``compile_growth``, decode step of the sampler,
``make_update``) and its arguments as ``jax.ShapeDtypeStruct``s carrying NamedShardings on the
mesh (models and states from ``nnx.eval_shape`` / ``jax.eval_shape``). ``compile_built`` lowers
and compiles it and reads what XLA reports: per-chip memory (``memory_analysis``), FLOPs and
bytes accessed (``cost_analysis``), and collectives and loops from the HLO text (``hlo``).

Loops: ``cost_analysis`` counts a while-loop body once, and the decoder scans its layers.
The plan therefore builds the model with ``ModelConfig.unroll_layers=True`` (the scan lowered
unrolled: the same math, every layer in the program), so the train, grow, decode and GRPO
steps have no loop left (``loops`` in the report lists any that remain with their trip counts).
The seeding step keeps one: the sampler's decode ``while_loop`` (its trip count is dynamic: it
stops at EOS), whose body (one token for every row) is counted once; its figures are those of
the prefill, one decode token, the teacher's and student's scoring passes and the update.

Shapes (``PlanShapes``): B global rows; the train step reads [B, T] tokens; the seeding step
[B, memory + prompt] teacher and [B, prompt] student prefixes and samples ``new_tokens``; the
decode step is one token for B rows against a KV cache of T slots; the GRPO update [B, prompt]
prompts with [B, new_tokens] completions.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sleep_jax.mesh import batch_sharding, logical_to_spec, tree_shardings
from sleep_jax.models.config import ModelConfig
from sleep_jax.plan import hlo

STEPS = ("train", "seeding", "grow", "decode", "grpo")


@dataclasses.dataclass(frozen=True)
class PlanShapes:
    """batch: global rows B; seq_len T (train rows, decode cache); prompt_len, new_tokens and
    memory_len for the seeding step, the sampler and the GRPO rollout."""

    batch: int
    seq_len: int
    prompt_len: int
    new_tokens: int
    memory_len: int

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"PlanShapes.{f.name}={getattr(self, f.name)} must be >= 1")


@dataclasses.dataclass
class Built:
    """A step ready to lower: ``fn.lower(*args)`` under ``jax.set_mesh(mesh)``; ``static`` are
    the positions of static (non-array) arguments; ``tokens`` the tokens it processes."""

    name: str
    fn: Any
    args: tuple
    mesh: Mesh
    tokens: int
    static: tuple[int, ...] = ()


def _factory(cfg: ModelConfig) -> Callable[[], nnx.Module]:
    from sleep_jax.models.llama import Decoder

    return lambda: Decoder(cfg, rngs=nnx.Rngs(0))


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def _rows(mesh: Mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    """A [B, ...] input split over the mesh's batch axes."""
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=batch_sharding(mesh, len(shape), shape[0]))


def _key(mesh: Mesh) -> jax.ShapeDtypeStruct:
    k = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _tx():
    from sleep_jax.train.optim import OptimConfig, make_optimizer

    return make_optimizer(OptimConfig(), 1000)


def build_train(cfg: ModelConfig, mesh: Mesh, shapes: PlanShapes) -> Built:
    """``train.step.make_train_step`` on [B, T] rows (AdamW, full model)."""
    from sleep_jax.train.state import abstract_train_state
    from sleep_jax.train.step import BATCH_KEYS, make_train_step

    state = abstract_train_state(_factory(cfg), _tx(), mesh)
    step = make_train_step(state, mesh)
    B, T = shapes.batch, shapes.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, T), bool if "mask" in k else jnp.int32,
                                     sharding=step.batch_sharding) for k in BATCH_KEYS}
    return Built("train", step.jitted, (state, batch, _key(mesh), None), mesh, B * T)


def build_seeding(teacher_cfg: ModelConfig, student_cfg: ModelConfig, mesh: Mesh,
                  teacher_mesh: Mesh, shapes: PlanShapes, seeding=None) -> Built:
    """``distill.seeding.make_seeding_step``: the student an ``AdapterState`` of the grown model
    on ``mesh`` (the slot trains, as in a sleep), the frozen teacher on ``teacher_mesh``;
    ``seeding`` a SeedingConfig (default: the defaults with ``max_new_tokens=new_tokens``)."""
    from sleep_jax.distill.seeding import SeedingBatch, SeedingConfig, make_seeding_step
    from sleep_jax.train.adapters import create_adapter_state

    tx = _tx()
    abs_state = jax.eval_shape(lambda: create_adapter_state(_factory(student_cfg)(), 0, tx))
    state = _with_shardings(abs_state, abs_state.shardings(mesh))
    tg, ts = nnx.split(nnx.eval_shape(_factory(teacher_cfg)))
    ts = _with_shardings(ts, tree_shardings(ts, teacher_mesh, strict=True))
    B, P, M = shapes.batch, shapes.prompt_len, shapes.new_tokens
    batch = SeedingBatch(_rows(mesh, (B, P + shapes.memory_len), jnp.int32),
                         _rows(mesh, (B,), jnp.int32), _rows(mesh, (B, P), jnp.int32),
                         _rows(mesh, (B,), jnp.int32))
    seeding = seeding or SeedingConfig(max_new_tokens=M)
    step = make_seeding_step(seeding, state, mesh, eos_id=None)
    return Built("seeding", step.jitted, (state, tg, ts, batch, _key(mesh), None, None), mesh,
                 B * (2 * P + shapes.memory_len + 3 * M), static=(1,))


def build_grow(src_cfg: ModelConfig, dst_cfg: ModelConfig, mesh: Mesh,
               shapes: PlanShapes) -> Built:
    """``grow.api.compile_growth`` of the source train state (AdamW moments) onto ``mesh``."""
    from sleep_jax.grow.api import compile_growth
    from sleep_jax.train.state import abstract_train_state

    st = abstract_train_state(_factory(src_cfg), _tx(), mesh)
    args = (st.params, st.other, st.opt_state, st.step, _key(mesh))
    fn, _, _ = compile_growth(src_cfg, dst_cfg, mesh, args)
    return Built("grow", fn, args, mesh, 0)


def build_decode(cfg: ModelConfig, mesh: Mesh, shapes: PlanShapes) -> Built:
    """One sampler decode step (``sampling.generate``'s loop body: a token for each of B rows
    against a KV cache of T slots), the cache donated and kept on its sharding."""
    graphdef, state = nnx.split(nnx.eval_shape(_factory(cfg)))
    state = _with_shardings(state, tree_shardings(state, mesh, strict=True))
    B, S = shapes.batch, shapes.seq_len
    kv = (cfg.layers, B, S, cfg.kv_heads, cfg.head_dim)
    kv_sh = NamedSharding(mesh, logical_to_spec(("layers", "batch", "length", "kv_heads",
                                                 "head_dim"), kv, mesh))
    cache = {"k": jax.ShapeDtypeStruct(kv, jnp.dtype(cfg.dtype), sharding=kv_sh),
             "v": jax.ShapeDtypeStruct(kv, jnp.dtype(cfg.dtype), sharding=kv_sh),
             "valid": _rows(mesh, (B, S), bool),
             "index": jax.ShapeDtypeStruct((), jnp.int32,
                                           sharding=NamedSharding(mesh, PartitionSpec()))}
    cache_sh = jax.tree.map(lambda a: a.sharding, cache)

    def decode(state, tok, pos, cache, mask):
        logits, cache = nnx.merge(graphdef, state)(tok, pos, cache=cache, mask=mask)
        return logits, cache

    fn = jax.jit(decode, donate_argnums=(3,),
                 out_shardings=(batch_sharding(mesh, 3, B), cache_sh))
    args = (state, _rows(mesh, (B, 1), jnp.int32), _rows(mesh, (B, 1), jnp.int32), cache,
            _rows(mesh, (B, 1), bool))
    return Built("decode", fn, args, mesh, B)


def build_grpo(cfg: ModelConfig, mesh: Mesh, shapes: PlanShapes) -> Built:
    """``rl.update.make_update`` (GRPO, one epoch, one mini-batch) on a [B] rollout."""
    from sleep_jax.rl.config import RLConfig
    from sleep_jax.rl.rollout import Rollout
    from sleep_jax.rl.update import make_update
    from sleep_jax.train.state import abstract_train_state

    state = abstract_train_state(_factory(cfg), _tx(), mesh)
    B, P, M = shapes.batch, shapes.prompt_len, shapes.new_tokens
    update = make_update(state, mesh, RLConfig(max_new_tokens=M))
    f32 = lambda: _rows(mesh, (B, M), jnp.float32)
    rollout = Rollout(_rows(mesh, (B, P), jnp.int32), _rows(mesh, (B,), jnp.int32),
                      _rows(mesh, (B, M), jnp.int32), _rows(mesh, (B, M), bool), f32(), f32(),
                      f32(), _rows(mesh, (B,), jnp.float32), f32(), f32())
    return Built("grpo", update.jitted, (state, rollout, _key(mesh), None), mesh, B * (P + M))


def build(step: str, *, base: ModelConfig, grown: ModelConfig, target: ModelConfig, mesh: Mesh,
          teacher_mesh: Mesh, shapes: PlanShapes) -> Built:
    """The named step; ``target`` is the model of the train, decode and GRPO steps."""
    if step == "train":
        return build_train(target, mesh, shapes)
    if step == "seeding":
        return build_seeding(base, grown, mesh, teacher_mesh, shapes)
    if step == "grow":
        return build_grow(base, grown, mesh, shapes)
    if step == "decode":
        return build_decode(target, mesh, shapes)
    if step == "grpo":
        return build_grpo(target, mesh, shapes)
    raise ValueError(f"unknown plan step {step!r}; allowed: {', '.join(STEPS)}")


def _cost(compiled) -> dict:
    c = compiled.cost_analysis()
    if isinstance(c, (list, tuple)):  # older jax: one dict per program
        c = c[0] if c else {}
    return dict(c or {})


def compile_built(b: Built) -> tuple[Any, dict]:
    """(compiled, report) of a built step: per-chip memory, cost, collectives, loops."""
    t0 = time.perf_counter()
    with jax.set_mesh(b.mesh):
        lowered = b.fn.lower(*b.args)
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    names = ("argument", "output", "temp", "alias", "generated_code")
    memory = {n: int(getattr(mem, f"{n}_size_in_bytes", 0) or 0) for n in names}
    # live at once: arguments + outputs + temporaries, less outputs aliasing donated arguments
    memory["total"] = (memory["argument"] + memory["output"] + memory["temp"]
                       + memory["generated_code"] - memory["alias"])
    cost = _cost(compiled)
    text = compiled.as_text()
    return compiled, {
        "compile_s": compile_s, "memory": memory,
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "collectives": hlo.collectives(text), "loops": hlo.while_loops(text),
        "tokens": b.tokens}


def concrete_args(b: Built) -> list:
    """Arrays for ``b.args`` on their shardings (zeros; ones for integers and booleans, so
    lengths are >= 1 and masks all on): for timing the step, not for its numbers."""

    def one(a):
        if not isinstance(a, jax.ShapeDtypeStruct):
            return a
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(0), a.sharding)
        fill = 0 if jnp.issubdtype(a.dtype, jnp.floating) else 1
        return jax.jit(lambda: jnp.full(a.shape, fill, a.dtype), out_shardings=a.sharding)()

    return [a if i in b.static else jax.tree.map(one, a) for i, a in enumerate(b.args)]


def time_built(b: Built, repeats: int) -> dict:
    """Wall seconds of ``repeats`` calls after a first (compiling) call; fresh inputs for each
    call (the steps donate their state), built outside the timed part."""
    with jax.set_mesh(b.mesh):
        jax.block_until_ready(b.fn(*concrete_args(b)))
        times = []
        for _ in range(repeats):
            args = concrete_args(b)
            jax.block_until_ready([a for i, a in enumerate(args) if i not in b.static])
            t0 = time.perf_counter()
            jax.block_until_ready(b.fn(*args))
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "repeats": repeats}
