"""A sleep subprocess for the kill/resume test (tests/test_sleep.py).

usage: python tests/sleep_worker.py WORKDIR STEPS [--kill-at N] [--cache DIR]
Saves a tiny random checkpoint (WORKDIR/base, once), then runs ``sleep_checkpoint`` on it with
checkpoints every 2 steps into WORKDIR/out and prints the report as one JSON line.
``--kill-at N`` SIGKILLs itself right after step N's metrics record is written; ``--cache DIR``
is a persistent compilation cache shared by the runs (the re-runs compile nothing).
"""

import argparse
import json
import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

WORDS = ["<pad>", "<bos>", "<eos>", "lives", "in", ".", "where", "does", "live", "?"] + \
    [f"n{i}" for i in range(8)] + [f"c{i}" for i in range(4)]
TOKENS = {"bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 0, "add_bos": True,
          "chat_template": None}


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)},
                                     unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("steps", type=int)
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--cache", default="")
    a = p.parse_args()
    if a.cache:
        jax.config.update("jax_compilation_cache_dir", a.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    from sleep_jax.data.jsonl import Memory, Probe
    from sleep_jax.distill.seeding import SeedingConfig
    from sleep_jax.models import create_model, get_preset
    from sleep_jax.models.checkpoint_dir import load_checkpoint, save_checkpoint
    from sleep_jax.sleep import ReplayConfig, SleepConfig, sleep_checkpoint

    base_dir = os.path.join(a.workdir, "base")
    if not os.path.exists(os.path.join(base_dir, "config.json")):
        cfg = get_preset("tiny", vocab=32, embed=32, mlp=64, layers=1, heads=2, kv_heads=2,
                         head_dim=16)
        save_checkpoint(base_dir, create_model(cfg, seed=0), tokenizer(), tokens=TOKENS)
    base, tok, meta = load_checkpoint(base_dir)
    memories = [Memory(f"m{i}", f"n{i} lives in c{i % 4} .") for i in range(4)]
    probes = [Probe(f"m{i}", f"where does n{i} live ?", (f"c{i % 4}",)) for i in range(4)]
    cfg = SleepConfig(steps=a.steps, batch_size=4, slots=2, rank=4, checkpoint_every=2,
                      progress_bar=False, eval_tokens=2, prompt_format="{question}")

    def log_fn(rec):
        if rec["step"] == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    report = sleep_checkpoint(base_dir, base, tok, meta, memories, probes,
                              workdir=os.path.join(a.workdir, "out"), cfg=cfg,
                              seeding_cfg=SeedingConfig(max_new_tokens=2),
                              replay=ReplayConfig(fraction=0.5, source="samples", samples=8,
                                                  sample_tokens=4, prefix_tokens=2),
                              log_fn=log_fn)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
