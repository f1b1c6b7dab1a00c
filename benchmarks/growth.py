"""Time of ``grow`` onto a target mesh versus a plain resharded copy of a same-size tree.

  python benchmarks/growth.py [--sizes tiny,mid] [--pairs "fsdp=8>fsdp=8;fsdp=8>data=2,tensor=4"]
      [--repeats 5]

For each size (a source config and its composed growth: experts, heads, FFN, width, depth) and
each (source mesh > target mesh) pair: compile time and median run time of ``grow`` on a full
train state (params + AdamW moments + trainable mask), and of the baseline: ``jax.jit`` identity
with the same out_shardings applied to a tree of the grown state's shapes (params, moments,
mask) living on the source mesh, i.e. the cost of just writing that much data onto the target
layout. ratio = grow / copy (target: <= 2). grow_compile_s is tracing + lowering + XLA
compile wall time (target: <= 5 s for tiny), grow_compile_cpu_s the same in this process's CPU
time (steadier on a loaded host), grow_fusions the fusion count of the compiled program (the
XLA CPU compile time scales with it). Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from sleep_jax.grow import GrowOptions, grow  # noqa: E402
from sleep_jax.grow.api import compile_growth, tree_shardings  # noqa: E402
from sleep_jax.mesh import make_mesh, mesh_name  # noqa: E402
from sleep_jax.models import ModelConfig, create_model, param_count  # noqa: E402
from sleep_jax.train.state import create_train_state  # noqa: E402

SIZES = {
    "tiny": (ModelConfig(vocab=64, embed=16, mlp=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                         expert_rank=4),
             dict(layers=3, embed=32, mlp=48, heads=8, kv_heads=4, expert_slots=2)),
    "mid": (ModelConfig(vocab=4096, embed=128, mlp=512, layers=4, heads=4, kv_heads=2,
                        head_dim=32, expert_rank=16),
            dict(layers=6, embed=256, mlp=1024, heads=8, kv_heads=4, expert_slots=2)),
}
PAIRS = "fsdp=8>fsdp=8;fsdp=8>data=2,tensor=4;data=2,fsdp=2,tensor=2>fsdp=4,tensor=2"


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _on_mesh(state, mesh):
    """Put the state's scalars (step, Adam count) on the mesh, as a restored state has them."""
    rep = NamedSharding(mesh, PartitionSpec())
    put = lambda x: jax.device_put(x, rep) if x.ndim == 0 else x
    return state.replace(step=put(state.step), opt_state=jax.tree.map(put, state.opt_state))


def bench(size: str, src_spec: str, dst_spec: str, repeats: int, options: GrowOptions) -> dict:
    src_cfg, over = SIZES[size]
    dst_cfg = src_cfg.replace(**over)
    src_mesh, dst_mesh = make_mesh(src_spec), make_mesh(dst_spec)
    state = _on_mesh(create_train_state(create_model(src_cfg, mesh=src_mesh, seed=0),
                                        optax.adamw(1e-3)), src_mesh)
    rng = jax.device_put(jax.random.key(0), NamedSharding(src_mesh, PartitionSpec()))
    args = (state.params, state.other, state.opt_state, state.step, rng)
    t, c = time.perf_counter(), time.process_time()
    fn, _, _ = compile_growth(src_cfg, dst_cfg, dst_mesh, args, options)
    grow_hlo = fn.lower(*args).compile().as_text()
    grow_compile, grow_compile_cpu = time.perf_counter() - t, time.process_time() - c
    run = lambda: grow(state, src_cfg, dst_cfg, mesh=dst_mesh, rng=rng, options=options)
    jax.block_until_ready(run())
    grow_s = _timed(run, repeats)

    # baseline: a tree shaped like the grown outputs, on the source mesh, copied onto the target
    out_abs = jax.eval_shape(fn, *args)[:4]
    src_sh = tree_shardings(out_abs, src_mesh)
    dst_sh = tree_shardings(out_abs, dst_mesh)
    tree = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out_abs),
                   out_shardings=src_sh)()
    copy = jax.jit(lambda t: t, out_shardings=dst_sh)
    t = time.perf_counter()
    copy.lower(tree).compile()
    copy_compile = time.perf_counter() - t
    jax.block_until_ready(copy(tree))
    copy_s = _timed(lambda: copy(tree), repeats)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(out_abs))
    return dict(size=size, src=mesh_name(src_mesh), dst=mesh_name(dst_mesh),
                params_src=param_count(src_cfg), params_dst=param_count(dst_cfg),
                mbytes_out=round(nbytes / 2**20, 2), grow_ms=round(grow_s * 1e3, 3),
                copy_ms=round(copy_s * 1e3, 3), ratio=round(grow_s / copy_s, 2),
                grow_compile_s=round(grow_compile, 2), copy_compile_s=round(copy_compile, 2),
                grow_compile_cpu_s=round(grow_compile_cpu, 2),
                grow_fusions=grow_hlo.count(" fusion("))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,mid")
    p.add_argument("--pairs", default=PAIRS, help="'SRC>DST;...' mesh specs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--noise", type=float, default=None, help="GrowOptions.noise")
    a = p.parse_args(argv)
    logging.getLogger("sleep_jax.mesh").setLevel(logging.ERROR)
    options = GrowOptions() if a.noise is None else GrowOptions(noise=a.noise)
    rows = []
    for size in a.sizes.split(","):
        for pair in a.pairs.split(";"):
            src, dst = pair.split(">")
            rows.append(bench(size, src.strip(), dst.strip(), a.repeats, options))
    cols = ["size", "src", "dst", "params_dst", "mbytes_out", "grow_ms", "copy_ms", "ratio",
            "grow_compile_s", "grow_compile_cpu_s", "copy_compile_s", "grow_fusions"]
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} "
          f"({jax.default_backend()})")
    print(" | ".join(f"{c:>24}" if c in ("src", "dst") else f"{c:>10}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>24}" if c in ("src", "dst") else f"{r[c]!s:>10}"
                         for c in cols))
    ratios = [r["ratio"] for r in rows]
    print(json.dumps({"benchmark": "growth", "backend": jax.default_backend(),
                      "devices": jax.device_count(), "noise": options.noise,
                      "max_ratio": max(ratios),
                      "max_grow_compile_s": max(r["grow_compile_s"] for r in rows),
                      "median_ratio": round(statistics.median(ratios), 2), "rows": rows},
                     separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
