"""Dreams scored per second: the vmapped inner loop against the same compiled per-dream function
called in a Python loop, and the cost of dreaming one context as a multiple of one SFT step.

  python benchmarks/dream.py [--preset tiny] [--dreams 8] [--tokens 64] [--steps 4]
      [--rank 8] [--questions 4] [--candidates 8] [--repeats 3]

Random weights of the preset's shape with 2 expert slots (generator, inner), both on. Steady
state (after compilation, median of ``repeats``):
- vmapped: ``inner.finetune_and_score`` on M dreams of T tokens at once (n Adam steps per
  adapter, then tau: Q questions x K one-token candidates scored on every adapter), one jit;
- loop: the same per-dream function (``inner.finetune_one`` + tau scoring) jitted once and
  called M times from Python;
- SFT step: one step of the slot adapter (``AdapterState``, ``train.step.train_step_fn``) on a
  batch of M rows of T tokens, what one consolidation step costs;
- dreaming one context: ``iteration.dream_iteration`` with one context (generate M dreams of
  ``--tokens`` // 2 tokens, select, M + 1 inner fine-tunes, reward, GRPO update), one jit.
Target (issue 12): vmapped >= 5x the loop on an accelerator; the CPU figure is as measured.
Prints a table, then one JSON line.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sleep_jax.dream import inner, iteration  # noqa: E402
from sleep_jax.dream.config import DreamConfig  # noqa: E402
from sleep_jax.dream.tau import Tau, candidate_logprobs  # noqa: E402
from sleep_jax.grow import activate_slot  # noqa: E402
from sleep_jax.models import create_model, get_preset, param_count  # noqa: E402
from sleep_jax.rl import RLConfig  # noqa: E402
from sleep_jax.train.adapters import create_adapter_state  # noqa: E402
from sleep_jax.train.optim import OptimConfig, make_optimizer  # noqa: E402
from sleep_jax.train.step import train_step_fn  # noqa: E402


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
    p.add_argument("--dreams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def run(argv=None) -> dict:
    a = parse_args(argv)
    cfg = get_preset(a.preset, expert_slots=2, expert_rank=a.rank)
    model = create_model(cfg, seed=0)
    model, _ = activate_slot(model, None, 0, jax.random.key(1))
    model, _ = activate_slot(model, None, 1, jax.random.key(2))
    base, a0 = inner.make_base(model, 1)
    M, T, Q, K = a.dreams, a.tokens, a.questions, a.candidates
    dcfg = DreamConfig(dreams=M, keep_top=max(1, M // 4), keep_random=max(0, M // 8),
                       steps=a.steps, max_dream_tokens=T // 2)
    rng = np.random.default_rng(0)
    V = cfg.vocab
    toks = jnp.asarray(rng.integers(4, V, (M, T)), jnp.int32)
    mask = jnp.ones((M, T), bool)
    tau = Tau(jnp.asarray(rng.integers(4, V, (Q, 8)), jnp.int32), jnp.full((Q,), 8, jnp.int32),
              jnp.asarray(rng.integers(4, V, (Q, K, 1)), jnp.int32), jnp.ones((Q, K, 1), bool),
              jnp.zeros((Q,), jnp.int32))

    vm = jax.jit(lambda b, a0, t, m, tu: inner.finetune_and_score(
        b, a0, t, m, tu, cfg=dcfg, measure=candidate_logprobs)["tau"])

    @jax.jit
    def one(b, a0, t, m, tu):
        ad, _ = inner.finetune_one(b, a0, t, m, cfg=dcfg)
        return candidate_logprobs(inner.adapted_model(b, ad), tu)

    vm_first, vm_s = _median_time(lambda: vm(base, a0, toks, mask, tau), a.repeats)
    loop_first, loop_s = _median_time(
        lambda: [one(base, a0, toks[i], mask[i], tau) for i in range(M)], a.repeats)
    ref = np.stack([np.asarray(one(base, a0, toks[i], mask[i], tau)) for i in range(M)])
    max_diff = float(np.abs(np.asarray(vm(base, a0, toks, mask, tau)) - ref).max())

    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 100)
    st = create_adapter_state(model, 1, tx)
    pos = jnp.broadcast_to(jnp.arange(T - 1, dtype=jnp.int32), (M, T - 1))
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "positions": pos,
             "segment_ids": jnp.ones((M, T - 1), jnp.int32), "mask": mask[:, :-1],
             "loss_mask": mask[:, 1:]}
    sft = jax.jit(lambda s, b, r: train_step_fn(s, b, r)[1]["loss"])
    sft_first, sft_s = _median_time(lambda: sft(st, batch, jax.random.key(0)), a.repeats)

    gen = create_adapter_state(model, 0, tx)
    rl = RLConfig(group_size=M, max_new_tokens=T // 2)
    db = iteration.DreamBatch(prompt=toks[:1, :T // 2], prompt_len=jnp.full((1,), T // 2),
                              ctx=toks[:1], ctx_mask=mask[:1],
                              tau=jax.tree.map(lambda x: x[None], tau))
    it = jax.jit(lambda g, b, r: iteration.dream_iteration(
        g, 1, a0, b, r, cfg=dcfg, rl=rl, bos_id=1, eos_id=None)[1]["reward_mean"])
    it_first, it_s = _median_time(lambda: it(gen, db, jax.random.key(0)), a.repeats)

    speedup = loop_s / vm_s
    print(f"{a.preset} ({param_count(cfg):,} params), M={M} dreams x {T} tokens, n={a.steps} "
          f"steps, rank {a.rank}, tau {Q}x{K}, {jax.devices()[0].device_kind}")
    print(f"{'':34s} {'first call s':>13s} {'steady s':>10s}")
    for name, f, s in (("vmapped inner loop + tau", vm_first, vm_s),
                       ("per-dream function x M (loop)", loop_first, loop_s),
                       ("SFT step (slot, M rows)", sft_first, sft_s),
                       ("dream iteration, one context", it_first, it_s)):
        print(f"{name:34s} {f:13.3f} {s:10.4f}")
    print(f"dreams/s vmapped {M / vm_s:,.1f}, loop {M / loop_s:,.1f}: {speedup:.2f}x "
          f"(target >= 5x on an accelerator); one context = {it_s / sft_s:.1f} SFT steps; "
          f"max |vmapped - loop| {max_diff:.2e}")
    record = {
        "benchmark": "dream", "device": jax.devices()[0].device_kind,
        "devices": len(jax.devices()), "preset": a.preset, "commit": _commit(),
        "dreams": M, "tokens": T, "steps": a.steps, "rank": a.rank, "questions": Q,
        "candidates": K, "vmapped_s": round(vm_s, 5), "loop_s": round(loop_s, 5),
        "dreams_per_s_vmapped": round(M / vm_s, 2), "dreams_per_s_loop": round(M / loop_s, 2),
        "vmapped_over_loop": round(speedup, 3), "sft_step_s": round(sft_s, 5),
        "context_s": round(it_s, 5), "context_over_sft_step": round(it_s / sft_s, 2),
        "max_abs_diff": max_diff,
        "compile_s": {"vmapped": round(vm_first, 2), "loop": round(loop_first, 2),
                      "sft": round(sft_first, 2), "iteration": round(it_first, 2)}}
    print(json.dumps(record))
    return record


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
