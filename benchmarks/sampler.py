"""Decode throughput of the jitted KV-cache sampler vs HF ``generate`` (same config and shapes).

  python benchmarks/sampler.py [--preset smollm2_135m] [--batches 1,16,128] [--new-tokens 256]

Random weights of the preset's shape. For each batch size: compile time (first call) and the
steady-state decode tokens/s (second call, greedy, every row forced to run all new tokens: no
EOS). With torch + transformers importable, HF ``LlamaForCausalLM`` of the same config runs
``generate`` with a static KV cache, greedy, ``min_new_tokens = max_new_tokens``, same dtype.
Roofline: each decode step reads all parameters and the KV cache once, so
tokens/s <= batch * bandwidth / (param bytes + KV bytes). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sleep_jax.models import create_model, get_preset, param_count  # noqa: E402
from sleep_jax.sampling import generate  # noqa: E402


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def time_ours(model, batch: int, prompt_len: int, new: int) -> tuple[float, float]:
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t, n: generate(nnx.merge(graphdef, s), t, n, jax.random.key(0),
                                          max_new_tokens=new, temperature=0.0).tokens)
    toks = jnp.ones((batch, prompt_len), jnp.int32)
    lens = jnp.full((batch,), prompt_len, jnp.int32)
    t0 = time.perf_counter()
    fn(state, toks, lens).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn(state, toks, lens).block_until_ready()
    return compile_s, batch * new / (time.perf_counter() - t0)


def time_hf(cfg, batch: int, prompt_len: int, new: int, dtype: str) -> float | None:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.embed, intermediate_size=cfg.mlp,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                     num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                     rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                     max_position_embeddings=prompt_len + new)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = LlamaForCausalLM(hf).to(dev, tdt).eval()
    ids = torch.ones((batch, prompt_len), dtype=torch.long, device=dev)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
              cache_implementation="static", pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **kw)  # warm-up (and static cache allocation)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        if dev == "cuda":
            torch.cuda.synchronize()
    return batch * new / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smollm2_135m")
    p.add_argument("--batches", default="1,16,128")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--dtype", default=None, help="compute dtype (default: bf16 on GPU)")
    p.add_argument("--hbm-gbps", type=float, default=3350.0,
                   help="memory bandwidth for the roofline (H100 SXM: 3350 GB/s)")
    p.add_argument("--no-hf", action="store_true")
    a = p.parse_args(argv)
    platform = jax.devices()[0].platform
    dtype = a.dtype or ("bfloat16" if platform == "gpu" else "float32")
    cfg = get_preset(a.preset, dtype=dtype, param_dtype=dtype)
    model = create_model(cfg, seed=0)
    bytes_per = jnp.dtype(dtype).itemsize
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        compile_s, ours = time_ours(model, batch, a.prompt_len, a.new_tokens)
        hf = None if a.no_hf else time_hf(cfg, batch, a.prompt_len, a.new_tokens, dtype)
        kv = 2 * cfg.layers * batch * (a.prompt_len + a.new_tokens) * cfg.kv_heads * \
            cfg.head_dim * bytes_per
        roof = batch * a.hbm_gbps * 1e9 / (param_count(cfg) * bytes_per + kv)
        rows.append({"batch": batch, "compile_s": round(compile_s, 2),
                     "tokens_per_s": round(ours, 1),
                     "hf_tokens_per_s": None if hf is None else round(hf, 1),
                     "ratio_vs_hf": None if hf is None else round(ours / hf, 2),
                     "roofline_tokens_per_s": round(roof, 1),
                     "fraction_of_roofline": round(ours / roof, 4)})
    print(f"{'batch':>6} {'compile s':>10} {'tok/s':>10} {'HF tok/s':>10} {'ratio':>7} "
          f"{'roofline':>10}")
    for r in rows:
        print(f"{r['batch']:>6} {r['compile_s']:>10} {r['tokens_per_s']:>10} "
              f"{str(r['hf_tokens_per_s']):>10} {str(r['ratio_vs_hf']):>7} "
              f"{r['roofline_tokens_per_s']:>10}")
    print(json.dumps({"benchmark": "sampler", "device": jax.devices()[0].device_kind,
                      "platform": platform, "preset": a.preset, "dtype": dtype,
                      "commit": _commit(), "prompt_len": a.prompt_len,
                      "new_tokens": a.new_tokens, "hbm_gbps": a.hbm_gbps, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
