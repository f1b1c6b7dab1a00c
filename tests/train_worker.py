"""A training subprocess for the kill/resume and SIGTERM tests (tests/test_checkpoint.py).

usage: python tests/train_worker.py WORKDIR STEPS [--kill-at N] [--sleep S] [--cache DIR]
Trains the tiny model (small T) on a shuffled grain pipeline of fixed random token rows, with
checkpoints every 3 steps; prints one JSON line {"status", "step", "losses"} at the end.
``--kill-at N`` SIGKILLs itself right after step N is logged; ``--sleep S`` slows each step
(for SIGTERM timing).
"""

import argparse
import json
import os
import signal
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def make_data(seed: int, rows: int, seq_len: int, batch: int, vocab: int):
    """A grain iterator over shuffled fixed random rows (epochs reshuffle)."""
    import grain
    import numpy as np

    toks = np.random.default_rng(1234).integers(0, vocab, (rows, seq_len + 1)).astype(np.int32)

    def example(i):
        x = toks[i]
        T = seq_len
        return {"inputs": x[:-1], "targets": x[1:], "positions": np.arange(T, dtype=np.int32),
                "segment_ids": np.ones(T, np.int32), "mask": np.ones(T, bool),
                "loss_mask": np.ones(T, bool)}

    ds = (grain.MapDataset.range(rows).shuffle(seed=seed).repeat(None).map(example)
          .batch(batch, drop_remainder=True))
    return iter(ds)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("steps", type=int)
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--cache", default="")
    p.add_argument("--mesh", default="data=2,fsdp=4")
    a = p.parse_args()
    if a.cache:
        jax.config.update("jax_compilation_cache_dir", a.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    from flax import nnx

    from sleep_jax.mesh import make_mesh
    from sleep_jax.models import Decoder, get_preset
    from sleep_jax.train.optim import OptimConfig, make_optimizer
    from sleep_jax.train.state import create_sharded_train_state
    from sleep_jax.train.trainer import TrainConfig, fit

    cfg = get_preset("tiny", layers=1, vocab=64)
    tcfg = TrainConfig(steps=a.steps, batch_size=8, seq_len=16, checkpoint_every=3,
                       progress_bar=False)
    ocfg = OptimConfig(lr=1e-2, warmup_steps=2)
    mesh = make_mesh(a.mesh)
    state = create_sharded_train_state(lambda: Decoder(cfg, rngs=nnx.Rngs(0)),
                                       make_optimizer(ocfg, tcfg.steps), mesh)
    data = make_data(0, rows=20, seq_len=tcfg.seq_len, batch=tcfg.batch_size, vocab=cfg.vocab)

    def on_step(rec):
        if rec["step"] == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if a.sleep:
            time.sleep(a.sleep)

    r = fit(state, data, train_cfg=tcfg, optim_cfg=ocfg, mesh=mesh, workdir=a.workdir,
            on_step=on_step, tensorboard=False)
    print(json.dumps({"status": r.status, "step": r.step,
                      "losses": [h["loss"] for h in r.history]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
