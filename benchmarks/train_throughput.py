"""Training throughput of a preset over named meshes, optionally against HF transformers.

  python benchmarks/train_throughput.py --preset tiny --meshes "data=8;fsdp=8;fsdp=4,tensor=2"
      [--batch 8 --seq 64 --steps 10 --peak-tflops 989 --dtype bfloat16 --remat dots --no-hf]

For each mesh: compile time of the train step, mean step time, tokens/s, tokens/s/device, peak
device memory (where the backend reports it) and MFU. Then, with torch + transformers installed,
the same shape trained by HF (LlamaForCausalLM, attn_implementation="sdpa", torch AdamW with
fused=True on CUDA, bf16 autocast on GPU) and the ratio of the best JAX tokens/s to HF's.
Prints a table, then one JSON line last.

MFU (model FLOPs utilisation, PaLM appendix B):
    MFU = tokens/s x (6 N + 12 L D T) / (peak FLOP/s per device x devices)
with N all parameters (embeddings included), L layers, D the attention width (heads x head_dim,
= embed for every preset), T the sequence length; 6N is forward + backward of the matmuls, 12LDT
the attention scores and weighted sum. Peak is the chip's dense bf16 figure (H100 SXM 989
TFLOP/s); on CPU no such figure exists, so the number used (--peak-tflops, default 0.1 TFLOP/s
for the whole host, split over its fake devices) is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # 8 fake CPU devices so the mesh list also runs on a laptop (no effect on GPU/TPU).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sleep_jax.models.config import flops_per_token  # noqa: E402  (the one MFU formula)

PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "tpu v4": 275.0, "tpu v5 lite": 197.0,
               "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v6": 918.0}
CPU_HOST_TFLOPS = 0.1


def peak_per_device(peak_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s per device, how it was chosen)."""
    dev = jax.devices()[0]
    if peak_tflops:
        return peak_tflops * 1e12, f"--peak-tflops {peak_tflops}"
    if dev.platform == "cpu":
        n = jax.device_count()
        return CPU_HOST_TFLOPS * 1e12 / n, f"CPU: nominal {CPU_HOST_TFLOPS} TFLOP/s per host / {n}"
    kind = dev.device_kind.lower()
    for k, v in PEAK_TFLOPS.items():
        if k in kind:
            return v * 1e12, f"{dev.device_kind}: {v} TFLOP/s dense bf16"
    return float("nan"), f"unknown peak for {dev.device_kind}: pass --peak-tflops"


def random_batch(B: int, T: int, vocab: int, seed: int = 0) -> dict:
    x = np.random.default_rng(seed).integers(0, vocab, (B, T + 1)).astype(np.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:],
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32), "mask": np.ones((B, T), bool),
            "loss_mask": np.ones((B, T), bool)}


def peak_memory_gb() -> float | None:
    vals = []
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            vals.append(stats["peak_bytes_in_use"])
    return max(vals) / 2**30 if vals else None


def bench_jax(cfg, mesh_spec: str, B: int, T: int, steps: int, warmup: int, micro: int) -> dict:
    from flax import nnx

    from sleep_jax.mesh import make_mesh, mesh_name
    from sleep_jax.models import Decoder
    from sleep_jax.train.optim import OptimConfig, make_optimizer
    from sleep_jax.train.state import create_sharded_train_state
    from sleep_jax.train.step import make_train_step

    mesh = make_mesh(mesh_spec)
    tx = make_optimizer(OptimConfig(), steps + warmup)
    state = create_sharded_train_state(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), tx, mesh)
    step = make_train_step(state, mesh, micro_batches=micro)
    batch = jax.device_put(random_batch(B, T, cfg.vocab), step.batch_sharding)
    key = jax.random.key_data(jax.random.key(0))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        step.jitted.lower(state, batch, key, None).compile()
    compile_s = time.perf_counter() - t0
    for i in range(warmup):  # the first call also pays dispatch-cache setup
        state, m = step(state, batch, jax.random.fold_in(key, i))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = step(state, batch, jax.random.fold_in(key, warmup + i))
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / steps
    n = mesh.devices.size
    tps = B * T / step_s
    return {"mesh": mesh_name(mesh), "devices": n, "compile_s": compile_s, "step_s": step_s,
            "tokens_per_s": tps, "tokens_per_s_per_device": tps / n,
            "peak_mem_gb": peak_memory_gb(), "loss": float(m["loss"])}


def bench_hf(cfg, B: int, T: int, steps: int, warmup: int) -> dict | None:
    """The same shape in HF transformers (None when torch/transformers are missing)."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.embed, intermediate_size=cfg.mlp,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=max(T, 128))
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    model.to(dev).train()
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=dev == "cuda")
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    x = torch.from_numpy(random_batch(B, T, cfg.vocab)["inputs"].astype(np.int64)).to(dev)

    def one():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(warmup):
        one()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one()
    sync()
    step_s = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    return {"mesh": f"hf-{dev}", "devices": 1, "compile_s": 0.0, "step_s": step_s,
            "tokens_per_s": B * T / step_s, "tokens_per_s_per_device": B * T / step_s,
            "peak_mem_gb": mem, "loss": loss.item(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__))
                              ).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (sleep_jax.models.PRESETS)")
    p.add_argument("--meshes", default="data=8;fsdp=8;fsdp=4,tensor=2",
                   help="';'-separated mesh specs")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak per device (default: by device kind; CPU nominal)")
    p.add_argument("--dtype", default=None, help="compute dtype (bfloat16 on accelerators)")
    p.add_argument("--remat", default=None, choices=["none", "full", "dots"])
    p.add_argument("--attention", default=None, choices=["xla", "cudnn", "auto"])
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers run")
    a = p.parse_args(argv)

    from sleep_jax.models import get_preset, param_count

    over = {k: v for k, v in dict(dtype=a.dtype, remat=a.remat, attention=a.attention).items()
            if v is not None}
    if "dtype" not in over and jax.devices()[0].platform != "cpu":
        over["dtype"] = "bfloat16"  # mixed precision: bf16 compute, fp32 parameters
    cfg = get_preset(a.preset, **over)
    fpt = flops_per_token(cfg, a.seq)
    peak, peak_note = peak_per_device(a.peak_tflops)
    rows = []
    for spec in [s for s in a.meshes.split(";") if s.strip()]:
        r = bench_jax(cfg, spec.strip(), a.batch, a.seq, a.steps, a.warmup, a.micro_batches)
        r["mfu"] = r["tokens_per_s"] * fpt / (peak * r["devices"])
        rows.append(r)
    hf = None if a.no_hf else bench_hf(cfg, a.batch, a.seq, a.steps, a.warmup)
    if hf is not None:
        # HF runs on one device: MFU against one device's peak (the whole host on CPU).
        dev_peak = peak * (jax.device_count() if jax.devices()[0].platform == "cpu" else 1)
        hf["mfu"] = hf["tokens_per_s"] * fpt / dev_peak
    best = max(rows, key=lambda r: r["tokens_per_s"])
    ratio = best["tokens_per_s"] / hf["tokens_per_s"] if hf else None

    dev = jax.devices()[0]
    print(f"preset {a.preset}: N={param_count(cfg):,} params, L={cfg.layers} D={cfg.embed} "
          f"T={a.seq} B={a.batch}, dtype {cfg.dtype}, remat {cfg.remat}, attention "
          f"{cfg.attention}; device {dev.device_kind} x{jax.device_count()}")
    print(f"MFU = tokens/s x (6N + 12LDT) / (peak x devices); 6N+12LDT = {fpt:.4g} FLOP/token;"
          f" peak {peak / 1e12:.4g} TFLOP/s per device ({peak_note})")
    hdr = (f"{'mesh':<24}{'compile s':>10}{'step ms':>10}{'tokens/s':>12}{'tok/s/dev':>11}"
           f"{'peak GB':>9}{'MFU %':>8}{'loss':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows + ([hf] if hf else []):
        mem = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "n/a"
        print(f"{r['mesh']:<24}{r['compile_s']:>10.2f}{r['step_s'] * 1e3:>10.2f}"
              f"{r['tokens_per_s']:>12.0f}{r['tokens_per_s_per_device']:>11.0f}{mem:>9}"
              f"{100 * r['mfu']:>8.3f}{r['loss']:>8.3f}")
    if hf:
        print(f"JAX best ({best['mesh']}) / HF tokens/s = {ratio:.2f}")
    else:
        print("HF comparison skipped (torch/transformers missing or --no-hf)")
    out = {"device": dev.device_kind, "platform": dev.platform, "devices": jax.device_count(),
           "preset": a.preset, "commit": _commit(), "batch": a.batch, "seq": a.seq,
           "dtype": cfg.dtype, "peak_tflops_per_device": peak / 1e12,
           "flops_per_token": fpt,
           "meshes": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
                      for r in rows],
           "hf": hf and {k: (round(v, 6) if isinstance(v, float) else v) for k, v in hf.items()},
           "jax_over_hf": ratio and round(ratio, 4)}
    print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
