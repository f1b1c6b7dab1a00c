"""``sleep-jax sleep``: Knowledge Seeding on your own checkpoint, memories and probes.

  sleep-jax sleep --checkpoint CKPT --memories M.jsonl --probes P.jsonl --workdir DIR

1. Load the checkpoint (A's format) and the JSONL memories/probes (B's formats).
2. Seeding prompts come from the memories themselves, never from the probes: every sentence of
   a memory cut after its 2nd..(n-1)th word is a continuation prompt (the teacher reads the
   memory first, the student only the prefix). Any prompt that contains a probe question is
   dropped, and the count is reported. Replay prompts come from the model itself: prefixes of
   texts it samples unconditionally (no labels), answered by the pre-sleep model.
3. Grow once to pre-allocated expert slots (exact) and seed only the NEXT FREE slot, with
   replay of the model's own samples and of every earlier sleep's prompts (kept beside the
   model); the one pipeline is ``sleep_jax.sleep`` (AdamW + warmup + clipping, as the demo).
4. Evaluate closed-book before/after and open-book (memory in context) on the probes, and
   write DIR/report.json, DIR/report.md, DIR/metrics.jsonl, checkpoints DIR/train (re-running
   resumes) and the grown checkpoint DIR/model (with DIR/model/sleep_prompts.jsonl), which a
   later ``sleep-jax sleep --checkpoint DIR/model`` sleeps on into its next free slot.
"""

from __future__ import annotations

import argparse
import json
import sys

from sleep_jax.distill import seeding
from sleep_jax.sleep import drop_probe_overlap, memory_prompts  # noqa: F401 (re-exported)

DEFAULT_FORMAT = "question: {question} answer:"


def _parse(argv):
    p = argparse.ArgumentParser(prog="sleep-jax sleep", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (sleep-jax import)")
    p.add_argument("--memories", required=True, help='JSONL {"id", "text"}')
    p.add_argument("--probes", required=True, help='JSONL {"memory_id", "question", "answers"}')
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--expert-rank", type=int, default=64)
    p.add_argument("--replay-fraction", type=float, default=0.5)
    p.add_argument("--divergence", default="jsd", help="forward_kl | reverse_kl | jsd")
    p.add_argument("--lam", type=float, default=0.5, help="fraction of student-sampled rows")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--prompt-format", default=DEFAULT_FORMAT,
                   help="how a probe question is asked (default %(default)r)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    from sleep_jax.data.jsonl import JsonlError, read_memories, read_probes
    from sleep_jax.models.checkpoint_dir import CheckpointError, load_checkpoint

    try:
        memories = read_memories(a.memories)
        probes = read_probes(a.probes, memory_ids={m.id for m in memories})
        base, tok, meta = load_checkpoint(a.checkpoint)
        if tok is None:
            raise ValueError(f"checkpoint {a.checkpoint!r} has no tokenizer.json; sleep needs "
                             "one to read memories")
        scfg = seeding.SeedingConfig(divergence=a.divergence, lam=a.lam,
                                     max_new_tokens=a.max_new_tokens)
        if not 0.0 <= a.replay_fraction < 1.0:
            raise ValueError(f"--replay-fraction={a.replay_fraction} must be in [0, 1)")
    except (JsonlError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"sleep-jax sleep: {e}", file=sys.stderr)
        return 2
    report = run_sleep(a, base, tok, meta, memories, probes, scfg)
    print(json.dumps({k: report[k] for k in ("before", "after", "open_book")}, indent=2))
    return 0


def configs_from_args(a, scfg: seeding.SeedingConfig | None = None):
    """(SleepConfig, SeedingConfig, ReplayConfig) of the command-line flags of ``_parse``."""
    from sleep_jax.sleep import ReplayConfig, SleepConfig
    from sleep_jax.train.optim import OptimConfig

    sleep_cfg = SleepConfig(steps=a.steps, batch_size=a.batch_size, rank=a.expert_rank,
                            optim=OptimConfig(lr=a.lr, warmup_steps=10, weight_decay=0.0),
                            prompts="memory", prompt_format=a.prompt_format, seed=a.seed)
    if scfg is None:
        scfg = seeding.SeedingConfig(divergence=a.divergence, lam=a.lam,
                                     max_new_tokens=a.max_new_tokens)
    return sleep_cfg, scfg, ReplayConfig(fraction=a.replay_fraction, source="samples")


def run_sleep(checkpoint, base, tok, meta, memories, probes, seeding_cfg=None, *,
              workdir: str | None = None, sleep_cfg=None, replay_cfg=None) -> dict:
    """The sleep behind the CLI: ``sleep_jax.sleep.sleep_checkpoint`` (see module docstring).

    ``run_sleep(checkpoint_dir, base, tok, meta, memories, probes, seeding_cfg, workdir=...,
    sleep_cfg=SleepConfig(...), replay_cfg=ReplayConfig(...)) -> report``. The parsed flags
    (an argparse Namespace as ``checkpoint``) are also accepted and turned into the configs.
    """
    from sleep_jax.sleep import ReplayConfig, SleepConfig, sleep_checkpoint

    if isinstance(checkpoint, argparse.Namespace):
        a = checkpoint
        sleep_cfg, seeding_cfg, replay_cfg = configs_from_args(a, seeding_cfg)
        checkpoint, workdir = a.checkpoint, a.workdir
    if workdir is None:
        raise ValueError("run_sleep needs a workdir")
    return sleep_checkpoint(checkpoint, base, tok, meta, memories, probes, workdir=workdir,
                            cfg=sleep_cfg or SleepConfig(),
                            seeding_cfg=seeding_cfg or seeding.SeedingConfig(),
                            replay=replay_cfg or ReplayConfig())
