"""A wake/sleep cycle subprocess for the kill/resume test (tests/test_cycle.py).

usage: python tests/cycle_worker.py WORKDIR [--kill seeding|wake|events|checkpoint] [--cache DIR]
Saves a tiny random checkpoint (WORKDIR/base, once), then runs ``cycle.run_cycle`` over 4
memories, a sleep every 2 (2 cycles; 1 slot, so cycle 2 grows one more: when_full="grow"), and
prints {"matrix", "events"} as one JSON line. ``--kill`` SIGKILLs the process once, at one
point: "events" while cycle 1's event record is being written (temp file written, not yet
renamed), "wake" right after cycle 2's wake answers (before its sleep), "seeding" right after
step 3 of cycle 2's sleep is logged, "checkpoint" while cycle 2's model checkpoint is being
written (its parameters saved in the temp folder, not yet complete or renamed).
"""

import argparse
import json
import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--kill", choices=("seeding", "wake", "events", "checkpoint"),
                   default=None)
    p.add_argument("--cache", default="")
    a = p.parse_args()
    if a.cache:
        jax.config.update("jax_compilation_cache_dir", a.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from sleep_worker import TOKENS, tokenizer

    from sleep_jax import atomic, cycle
    from sleep_jax.data.jsonl import Memory, Probe
    from sleep_jax.distill.seeding import SeedingConfig
    from sleep_jax.models import create_model, get_preset
    from sleep_jax.models.checkpoint_dir import save_checkpoint
    from sleep_jax.sleep import ReplayConfig, SleepConfig

    base_dir = os.path.join(a.workdir, "base")
    if not os.path.exists(os.path.join(base_dir, "config.json")):
        cfg = get_preset("tiny", vocab=32, embed=32, mlp=64, layers=1, heads=2, kv_heads=2,
                         head_dim=16)
        save_checkpoint(base_dir, create_model(cfg, seed=0), tokenizer(), tokens=TOKENS)
    memories = [Memory(f"m{i}", f"n{i} lives in c{i % 4} .") for i in range(4)]
    probes = [Probe(f"m{i}", f"where does n{i} live ?", (f"c{i % 4}",)) for i in range(4)]
    scfg = SleepConfig(steps=4, batch_size=4, slots=1, rank=4, when_full="grow",
                       checkpoint_every=2, progress_bar=False, eval_tokens=2,
                       prompt_format="{question}")
    state = {"cycle": 0}
    log_fn = None
    if a.kill == "seeding":
        def log_fn(rec):
            if state["cycle"] == 2 and rec["step"] == 3:
                kill()
    real_sleep, real_wake, real_write = cycle.sleep_cycle, cycle.wake_accuracy, \
        atomic.write_text

    def sleep_cycle(*args, **kw):
        state["cycle"] = int(os.path.basename(kw["workdir"]).split("_")[1])
        return real_sleep(*args, **kw)

    def wake_accuracy(model, tok, store, *args, **kw):
        out = real_wake(model, tok, store, *args, **kw)
        if a.kill == "wake" and store[0].id == "m2":  # cycle 2's wake
            kill()
        return out

    def write_text(path, text):
        if a.kill == "events" and path.endswith(cycle.EVENTS) and text.count("\n") == 2:
            with atomic.atomic_open(path) as f:  # the real write, killed half way
                f.write(text[: len(text) // 2])
                f.flush()
                kill()
        return real_write(path, text)

    from sleep_jax.models import checkpoint_dir

    real_ckpt_text = checkpoint_dir.write_text

    def ckpt_write_text(path, text):
        # cycle 2's model checkpoint, killed half written: its parameters are on disk in the
        # temp folder, its tokenizer and config.json (the completeness mark) are not
        if (a.kill == "checkpoint" and os.sep + "cycle_002" + os.sep in path
                and ".model.tmp" in path):
            kill()
        return real_ckpt_text(path, text)

    cycle.sleep_cycle, cycle.wake_accuracy, atomic.write_text = \
        sleep_cycle, wake_accuracy, write_text
    checkpoint_dir.write_text = ckpt_write_text
    out = cycle.run_cycle(base_dir, memories, probes, workdir=os.path.join(a.workdir, "run"),
                          cfg=cycle.CycleConfig(sleep_every=2, store_size=2),
                          method=cycle.CycleMethod(
                              "sleep", scfg, SeedingConfig(max_new_tokens=2),
                              ReplayConfig(fraction=0.5, source="samples", samples=8,
                                           sample_tokens=4, prefix_tokens=2)),
                          inputs=cycle.CycleInputs(
                              texts=["n1 lives in c1 .", "where does n2 live ?"]),
                          log_fn=log_fn)
    keep = ("cycle", "memories", "slot", "slots", "steps", "row", "wake_in_context",
            "kl_to_base")
    print(json.dumps({"matrix": out["matrix"],
                      "events": [{k: e.get(k) for k in keep} for e in out["events"]]}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
