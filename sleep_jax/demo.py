"""``sleep-jax demo``: train a tiny model on a synthetic world, let it sleep, show what it learned.

1. WAKE. A tiny Llama learns OLD facts (passages + closed-book questions in TRAIN wordings) and
   reading comprehension on fresh entities, so it answers from context.
2. SLEEP. NEW memories (passages it has only seen in context) are consolidated by Knowledge
   Seeding into a grown copy of the model (an activated low-rank expert slot), with replay by
   self-distillation on prompts about OLD entities.
3. EVALUATE on HELD-OUT wordings only (near / far): closed-book NEW (what was learned),
   closed-book OLD (what was kept), open-book NEW (the teacher's level), KL to the base model on
   general text. Baselines get the same steps and batch rows: SFT on the passages, seeding
   without growth (full fine-tune), seeding without replay, in-context only.

Writes ``<workdir>/seed<k>/report.json``, ``report.md`` and PNG plots, and a summary over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

import jax

log = logging.getLogger("sleep_jax.demo")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of the demo (defaults fit 10 minutes on 2 CPU cores for one seed)."""

    seed: int = 0
    n_old: int = 200
    n_new: int = 40
    # tiny base model (about 0.45M parameters; 2 layers: twice the wake steps of 4 in the same time)
    embed: int = 128
    layers: int = 2
    heads: int = 4
    mlp: int = 384
    # wake (base training)
    base_steps: int = 1400  # the reading-comprehension skill appears only after ~600-800
    base_batch: int = 32  # packed rows of seq_len tokens
    seq_len: int = 64
    qa_repeat: int = 2  # OLD closed-book QA repeated so it is not swamped by reading comp.
    base_lr: float = 3e-3
    base_warmup: int = 50
    rc_items: int = 3000
    general_items: int = 100
    # sleep
    sleep_steps: int = 600
    sleep_batch: int = 32
    expert_rank: int = 32
    expert_lr: float = 2e-2
    full_lr: float = 1e-3
    replay_fraction: float = 0.5
    low_replay_fraction: float = 0.125  # the *_low methods: does a gate need less replay?
    gate_l1: float = 0.02  # gated methods: cost of the router's mean gate
    expert_l1: float = 0.1  # sparse methods: cost of the expert output's RMS per token
    imitation_alpha: float = 0.5  # sleep_imitate: alpha * GKD + (1 - alpha) * imitation
    eval_every: int = 50
    methods: tuple[str, ...] = ("sft", "seed_full", "seed_noreplay", "sleep")


METHODS = {
    "sft": "fine-tune on the NEW passages (LM loss), full model",
    "seed_full": "seeding without growth: full fine-tune, GKD + replay",
    "seed_noreplay": "seeding into a new expert slot, no replay",
    "sleep": "seeding into a new expert slot + replay (the method)",
    "sleep_gated": "as sleep, the slot behind a learned per-token gate with an L1 cost",
    "sleep_low": "as sleep with less replay (low_replay_fraction)",
    "sleep_gated_low": "as sleep_gated with less replay (low_replay_fraction)",
    "sleep_sparse": "as sleep, with a cost on the expert's output RMS per token",
    "sleep_sparse_low": "as sleep_sparse with less replay (low_replay_fraction)",
    "sleep_routed_sparse_low": "router (no gate cost) + output-RMS cost, less replay",
    "sleep_imitate": "as sleep, loss alpha * GKD + (1 - alpha) * Learning to Imitate (GRPO)",
}


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sleep-jax demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...)")
    p.add_argument("--base-steps", type=int, default=DemoConfig.base_steps)
    p.add_argument("--sleep-steps", type=int, default=DemoConfig.sleep_steps)
    p.add_argument("--methods", default=",".join(DemoConfig.methods),
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--quick", action="store_true", help="a 1-minute smoke run (tiny budgets)")
    args = p.parse_args(argv)
    _setup_logging()
    from sleep_jax.demo_run import run_seed, summarize

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; allowed: {', '.join(METHODS)}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    kw = dict(base_steps=args.base_steps, sleep_steps=args.sleep_steps, methods=methods)
    if args.quick:
        kw.update(base_steps=60, sleep_steps=20, n_old=40, n_new=8, rc_items=400,
                  eval_every=10)
    t0 = time.time()
    reports = []
    for seed in range(args.seeds):
        cfg = DemoConfig(seed=seed, **kw)
        reports.append(run_seed(cfg, os.path.join(args.workdir, f"seed{seed}")))
    summary = summarize(reports, args.workdir)
    print(summary)
    log.info("demo finished in %.0f s; reports under %s (devices: %s)", time.time() - t0,
             args.workdir, jax.devices()[0].platform)
    return 0


if __name__ == "__main__":
    sys.exit(main())

