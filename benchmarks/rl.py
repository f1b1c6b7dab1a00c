"""Cost of one GRPO update against one SFT step on the same tokens, and rollout tokens/s.

  python benchmarks/rl.py [--preset tiny] [--mesh fsdp=-1] [--prompts 8] [--group 8]
      [--prompt-len 32] [--new-tokens 32] [--repeats 5]

Random weights of the preset's shape. A rollout of prompts x group rows (prompt_len + new
tokens each) is sampled once; then, steady state (after compilation, median of ``repeats``):
- SFT step: B's train step (cross-entropy, AdamW) on the same rows (prompt + completion);
- GRPO update: one epoch, one mini-batch (one optimizer step), token-level clipped loss,
  KL (k3) to the frozen reference and the entropy term on: ``make_update``;
- rollout: sampling (KV cache) + policy and reference re-scoring, generated tokens/s.
Target (issue D): GRPO update <= 2x the SFT step. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sleep_jax.mesh import make_mesh  # noqa: E402
from sleep_jax.models import create_model, get_preset, param_count  # noqa: E402
from sleep_jax.rl import RLConfig, make_rollout, rest_em_batch, with_rewards  # noqa: E402
from sleep_jax.rl.update import make_update  # noqa: E402
from sleep_jax.train.optim import OptimConfig, make_optimizer  # noqa: E402
from sleep_jax.train.state import create_train_state, fresh_copy  # noqa: E402
from sleep_jax.train.step import make_train_step  # noqa: E402


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of the next ``repeats`` calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--mesh", default="fsdp=-1")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def run(argv=None) -> dict:
    """Sample, time and print; returns the JSON record (``argv`` as on the command line).

    Every step puts its inputs onto the mesh itself (``make_update``, ``make_train_step``):
    the rollout and the SFT batch built from it may arrive replicated (the SFT loss mask
    does), not split by rows as the jitted steps expect.
    """
    a = parse_args(argv)
    cfg = get_preset(a.preset)
    mesh = make_mesh(a.mesh)
    model = create_model(cfg, mesh=mesh, seed=0)
    ref = fresh_copy(model)
    tx = make_optimizer(OptimConfig(lr=1e-5), 1000)
    rl = RLConfig(group_size=a.group, max_new_tokens=a.new_tokens, kl_coef=0.04,
                  entropy_coef=0.001)
    B = a.prompts * a.group
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab, (a.prompts, a.prompt_len)).astype(np.int32)
    lens = np.full(a.prompts, a.prompt_len, np.int32)

    state = create_train_state(fresh_copy(model), tx)
    rollout_fn = make_rollout(rl, eos_id=None, mesh=mesh)
    rgd, rst = nnx.split(ref)
    roll_first, roll_s = _median_time(
        lambda: rollout_fn(state, rgd, rst, prompts, lens, jax.random.key(0)), a.repeats)
    roll = rollout_fn(state, rgd, rst, prompts, lens, jax.random.key(0))
    gen_tokens = int(np.asarray(roll.mask).sum())
    roll = with_rewards(roll, rng.normal(size=B).astype(np.float32), rl)

    # SFT on exactly the rollout's rows: every completion token in the loss
    sft_batch, _ = rest_em_batch(roll.replace(rewards=np.ones(B, np.float32)), 0.0)
    sft_state = create_train_state(fresh_copy(model), tx)
    sft = make_train_step(sft_state, mesh, donate=False)
    sft_first, sft_s = _median_time(lambda: sft(sft_state, sft_batch, jax.random.key(0))[1],
                                    a.repeats)

    upd = make_update(state, mesh, rl, donate=False)
    upd_first, upd_s = _median_time(lambda: upd(state, roll, jax.random.key(0))[1], a.repeats)

    rows = [("SFT step", sft_first, sft_s), ("GRPO update", upd_first, upd_s),
            ("rollout (sample + 2 scores)", roll_first, roll_s)]
    print(f"{a.preset} ({param_count(cfg):,} params) on {dict(mesh.shape)}, B={B} rows x "
          f"{a.prompt_len}+{a.new_tokens} tokens, {jax.devices()[0].device_kind}")
    print(f"{'':30s} {'first call s':>13s} {'steady s':>10s}")
    for name, f, s in rows:
        print(f"{name:30s} {f:13.3f} {s:10.4f}")
    ratio = upd_s / sft_s
    print(f"GRPO update / SFT step = {ratio:.2f}x (target <= 2x); rollout "
          f"{gen_tokens / roll_s:,.0f} generated tokens/s")
    record = {
        "benchmark": "rl", "device": jax.devices()[0].device_kind,
        "devices": len(jax.devices()), "mesh": dict(mesh.shape), "preset": a.preset,
        "commit": _commit(), "rows": B, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "sft_step_s": round(sft_s, 5), "grpo_update_s": round(upd_s, 5),
        "grpo_over_sft": round(ratio, 3), "rollout_s": round(roll_s, 5),
        "rollout_tokens_per_s": round(gen_tokens / roll_s, 1), "generated_tokens": gen_tokens,
        "compile_s": {"sft": round(sft_first, 2), "grpo": round(upd_first, 2),
                      "rollout": round(roll_first, 2)}}
    print(json.dumps(record))
    return record


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
