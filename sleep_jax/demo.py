"""``sleep-jax demo``: train a tiny model on a synthetic world, let it sleep, show what it learned.

1. WAKE. A tiny Llama learns OLD facts (passages + closed-book questions in TRAIN wordings) and
   reading comprehension on fresh entities, so it answers from context.
2. SLEEP. NEW memories (passages it has only seen in context) are consolidated by Knowledge
   Seeding into a grown copy of the model (an activated low-rank expert slot), with replay by
   self-distillation on prompts about OLD entities.
3. EVALUATE on HELD-OUT wordings only (near / far): closed-book NEW (what was learned),
   closed-book OLD (what was kept), open-book NEW (the teacher's level), KL to the base model on
   general text. Each method's checkpoint is chosen on VALIDATION wordings only (best NEW with
   OLD drop <= 5 points; ``eval.select``); its end-of-budget figures stand beside. Baselines get
   the same steps and batch rows (``METHODS``); in-context only (a store of the last N
   memories) needs no training.

Settings: configs/demo.py (presets default and quick). Writes ``<workdir>/seed<k>/report.json``,
``report.md`` and PNG plots, and a summary over seeds.

Many processes (``sleep-jax launch --nproc N -- sleep-jax demo``, the launch/ scripts, or the
runtime flags): every stage runs on one mesh over all devices (``demo.mesh``), each process
feeding its rows of every batch; process 0 alone writes the reports, logs and data files, and
every process saves its shards of the base checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

import jax

from sleep_jax.config import (
    RUNTIME_FLAGS,
    ConfigError,
    Flag,
    check_run_config,
    default_config_path,
    from_section,
    parse_command,
    runtime_config,
    write_run_config,
)

log = logging.getLogger("sleep_jax.demo")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of the demo (defaults fit 10 minutes on 2 CPU cores for one seed)."""

    seed: int = 0
    n_old: int = 200
    n_new: int = 40
    # TASK entities: dreaming-format examples in the wake mixture only; 200 (not 40) with 1,500
    # dream items teaches the base to read a passage about a name it never saw (open book on
    # validation 0.34 -> 1.00, seed 3; docs/LOG.md 2026-12-02, ninth session)
    n_task: int = 200
    # tiny base model (about 0.45M parameters; 2 layers: twice the wake steps of 4 in the same time)
    embed: int = 128
    layers: int = 2
    heads: int = 4
    mlp: int = 384
    # wake (base training)
    base_steps: int = 1000  # the budget (1,200 left the default rows 31 s over 10 minutes)
    base_batch: int = 16  # packed rows of seq_len tokens (2,048 tokens a step)
    seq_len: int = 128  # fits a store of 3 memories + question (world.max_open_book_words(3))
    qa_repeat: int = 2  # OLD closed-book QA repeated so it is not swamped by reading comp.
    base_lr: float = 3e-3
    base_warmup: int = 50
    rc_items: int = 3000
    rc_max_passages: int = 3  # reading comprehension over 1..3 passages (distractors)
    general_items: int = 100
    dream_items: int = 1500  # dreaming-format examples on TASK entities
    # sleep
    sleep_steps: int = 500
    sleep_batch: int = 32
    # the slot's width: 384 = the MLP's (the paper adds an expert of an MLP's size); chosen on
    # seed 3's validation wordings (sleep's validation NEW at step 500, rank 16 / 32 / 64 / 128
    # / 256 / 384 / 512: 0.32 / 0.38 / 0.48 / 0.53 / 0.59 / 0.64 / 0.65; docs/LOG.md 2026-12-03;
    # 64 before, what every run got while growth ignored the setting)
    expert_rank: int = 384
    expert_lr: float = 2e-2
    full_lr: float = 1e-3
    sleep_warmup: int = 10  # linear warmup steps of every sleep-phase optimizer (then cosine)
    replay_fraction: float = 0.5
    low_replay_fraction: float = 0.125  # the *_low methods: does a gate need less replay?
    # a row's own settings, chosen on validation (seed 3) like every default:
    # "METHOD:KEY=VALUE,...;..." over demo_run.ROW_KEYS; sleep_dream, sleep_dream_untrained
    # and sleep_long take sleep's (docs/LOG.md 2026-12-02, tenth and eleventh sessions; sft
    # and opsd forget OLD within 100 steps at every lr tried, so they are also evaluated every
    # 20 steps: an early checkpoint can qualify; sft_slot_replay's slot lr re-chosen at rank
    # 384 on 2026-12-03: 2e-3 / 5e-3 / 1e-2 / 2e-2 / 3e-2 -> 0.23 / 0.28 / 0.43 / 0.37 / 0.37)
    row_settings: str = ("sleep:expert_lr=1e-2,replay_fraction=0.625;"
                         "seed_full:replay_fraction=0.75;sft_replay:full_lr=5e-3;"
                         "sft:full_lr=1e-4,eval_every=20;opsd:full_lr=2e-5,eval_every=20;"
                         "sft_slot_replay:expert_lr=1e-2")
    gate_l1: float = 0.02  # gated methods: cost of the router's mean gate
    expert_l1: float = 0.1  # sparse methods: cost of the expert output's RMS per token
    imitation_alpha: float = 0.5  # sleep_imitate: alpha * GKD + (1 - alpha) * imitation
    l2_pull: float = 1.0  # sft_l2_replay: L2-SP strength toward the pre-sleep weights
    sft_seq_len: int = 40  # SFT rows: one passage each (<= 35 tokens); replayed wake rows are
    # packed to this length (longer reading-comprehension items are cut)
    # evaluation and checkpoint selection (validation wordings only)
    eval_every: int = 100
    # OLD entities on the validation curve, 0 = all of them (the default; was a subsample of
    # 30, 240 questions, too few for a 5-point rule: one point is 2 questions; docs/LOG.md
    # 2026-12-03). Cost: about 1 s more per evaluation on 2 cores
    val_old_entities: int = 0
    max_old_drop: float = 0.05  # selection: best validation NEW with OLD drop <= this
    store_size: int = 3  # the in-context baseline's store: the last N memories
    # dreaming rows (sleep_dream, sleep_dream_untrained, sleep_long; sleep_jax.demo_dream): the
    # generator's training on the TASK entities, then rehearsal after consolidation
    dream_updates: int = 100  # generator updates (GRPO on the contrastive reward)
    dream_contexts: int = 4  # TASK contexts per update
    dream_lr: float = 1e-2  # the generator adapter's learning rate
    # the generator's slot rank (64: what its runs got while growth ignored the setting),
    # capped at expert_rank: rehearsal sets the generator into a slot of the consolidated model
    dream_rank: int = 64
    dreams: int = 8  # dreams drawn per context (the GRPO group)
    dream_keep_top: int = 2  # kept per context: the top-k by importance ...
    dream_keep_random: int = 1  # ... plus b at random
    dream_inner_steps: int = 4  # the reward's inner fine-tune of one adapter per dream
    dream_tokens: int = 32  # dream length
    dream_temperature: float = 1.0  # the generator's sampling, in training and at rehearsal
    rehearse_steps: int = 100  # extra steps after consolidation (sleep_long: as consolidation)
    rehearse_rounds: int = 2  # generate-and-select draws per NEW memory
    rehearse_lr: float = 1e-3  # chosen on validation, seed 3 (docs/LOG.md 2026-12-02, ninth)
    rehearse_replay: float = 0.5  # share of replay rows in a rehearsal batch
    # the default rows fit the 10-minute budget on 2 cores; --config.rows=full runs FULL_ROWS
    methods: tuple[str, ...] = ("seed_full", "sleep")
    # the mesh of every stage ("fsdp=-1": every device of every process; the CPU demo has one)
    # and how many devices it spans (0: all; N: the first N in device order, one process only)
    mesh: str = "fsdp=-1"
    devices: int = 0


METHODS = {
    "sft": "fine-tune on the NEW passages (LM loss), full model",
    "sft_replay": "SFT on the NEW passages + replay of the wake training mixture, full model",
    "sft_l2_replay": "as sft_replay with an L2-SP pull toward the pre-sleep weights (the "
                     "classic regularisation baseline; l2_pull)",
    "sft_slot_replay": "SFT into a new expert slot of the grown model + replay of the wake "
                       "mixture (growth without distillation)",
    "opsd": "on-policy self-distillation (OPSD): the live weights reading the memory teach "
            "themselves without it, on their own samples; full model, no growth, no replay",
    "opsd_frozen": "as opsd with the frozen pre-sleep model as teacher",
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
    "sleep_dream": "as sleep, then dreaming: a generator trained on the TASK entities dreams "
                   "about the NEW memories; the kept dreams + replay train the slot "
                   "rehearse_steps more steps",
    "sleep_dream_untrained": "as sleep_dream with the generator before training (control)",
    "sleep_long": "as sleep with rehearse_steps more consolidation steps (control: the same "
                  "extra steps without dreams)",
    "dream_only": "dreaming alone (SEAL-like): no consolidation and no replay; the trained "
                  "generator's kept dreams train a new slot for sleep_steps + "
                  "rehearse_steps steps at expert_lr",
}


# The comparison's rows (``--config.rows=full``): every baseline of the README's table.
FULL_ROWS = ("sft", "sft_replay", "opsd", "seed_full", "seed_noreplay", "sft_slot_replay",
             "sleep")
# Dreaming's rows (``--config.rows=dream``): sleep, sleep + dreaming, its two controls and
# dreaming alone.
DREAM_ROWS = ("sleep", "sleep_dream", "sleep_dream_untrained", "sleep_long", "dream_only")
ROWS = ("default", "full", "dream")


def _setup_logging():
    from sleep_jax import runtime

    # many processes: process 0 logs the progress, the others only warnings
    logging.basicConfig(level=logging.INFO if runtime.is_writer() else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


FLAGS = (Flag("workdir", default="runs/demo", help="output folder"),
         Flag("allow_config_change", bool, False,
              help="run even though the workdir's config.json differs"), *RUNTIME_FLAGS)


def parse(argv: list[str]) -> tuple[list[DemoConfig] | None, str]:
    """The per-seed DemoConfigs and the workdir from the command line; (None, "") after --help.

    The resolved config is written to ``workdir/config.json`` (by process 0); a different
    saved one is refused. Joins the other processes first (``runtime.initialize``).

    Raises:
      ConfigError: a bad config key or value, an unknown method, seeds < 1, a bad mesh.
    """
    config, args = parse_command(argv, default=default_config_path("demo.py"), flags=FLAGS,
                                 prog="sleep-jax demo", doc=__doc__)
    if config is None:
        return None, ""
    cfg = from_section(DemoConfig, config.demo, "demo")
    problems = [f"demo.{k}={v} {why}" for k, v, ok, why in (
        ("store_size", cfg.store_size, 1 <= cfg.store_size <= cfg.n_new,
         f"must be in [1, n_new={cfg.n_new}]"),
        ("val_old_entities", cfg.val_old_entities, 0 <= cfg.val_old_entities <= cfg.n_old,
         f"must be in [0, n_old={cfg.n_old}] (0 = all)"),
        ("max_old_drop", cfg.max_old_drop, 0 <= cfg.max_old_drop <= 1, "must be in [0, 1]"),
        ("eval_every", cfg.eval_every, cfg.eval_every >= 0, "must be >= 0"),
    ) if not ok]
    from sleep_jax.data.world import max_context_words, max_open_book_words

    if cfg.sft_seq_len < max_context_words(1) + 2:
        problems.append(f"demo.sft_seq_len={cfg.sft_seq_len} must be >= "
                        f"{max_context_words(1) + 2} (the longest passage with bos and eos)")
    rc = max_open_book_words(cfg.rc_max_passages) + 2  # bos, eos
    if cfg.seq_len < rc:
        problems.append(f"demo.seq_len={cfg.seq_len} cannot hold a reading-comprehension item "
                        f"over rc_max_passages={cfg.rc_max_passages} passages ({rc} tokens)")
    if problems:
        raise ConfigError("; ".join(problems))
    if config.rows not in ROWS:
        raise ConfigError(f"rows={config.rows!r}; allowed: {', '.join(ROWS)}")
    if config.rows != "default":
        rows = FULL_ROWS if config.rows == "full" else DREAM_ROWS
        if tuple(cfg.methods) != DemoConfig().methods:
            raise ConfigError(f"rows={config.rows!r} runs {', '.join(rows)} and would ignore "
                              f"demo.methods={tuple(cfg.methods)!r}: set one of the two")
        cfg = dataclasses.replace(cfg, methods=rows)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not cfg.methods:
        raise ConfigError(f"demo.methods={cfg.methods!r}: unknown method(s) {unknown}; "
                          f"allowed: {', '.join(METHODS)}")
    if config.seeds < 1:
        raise ConfigError(f"seeds={config.seeds} must be >= 1")
    from sleep_jax.demo_dream import generator_configs, needs_generator
    from sleep_jax.demo_run import method_plan

    try:  # every row's settings (and the dream generator's) are checked before any work
        from sleep_jax.demo_run import parse_row_settings

        parse_row_settings(cfg.row_settings)
        for m in cfg.methods:
            method_plan(cfg, m, {"trained": "-", "untrained": "-"})
        if needs_generator(cfg.methods):
            generator_configs(cfg)
    except ValueError as e:
        raise ConfigError(f"demo: {e}") from None
    seeds = [dataclasses.replace(cfg, seed=cfg.seed + k) for k in range(config.seeds)]
    from sleep_jax import runtime

    try:  # many processes: before anything touches a device
        runtime.initialize(runtime_config(args))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from sleep_jax.demo_run import demo_mesh

    demo_mesh(cfg)  # a bad mesh or device count fails here, before any work
    if runtime.is_writer():
        write_run_config(args["workdir"], config, args["allow_config_change"])
    else:
        check_run_config(args["workdir"], config, args["allow_config_change"])
    return seeds, args["workdir"]


def main(argv: list[str] | None = None) -> int:
    try:
        seeds, workdir = parse(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"sleep-jax demo: error: {e}", file=sys.stderr)
        return 2
    if seeds is None:
        return 0  # --help
    _setup_logging()
    from sleep_jax.demo_run import run_seed, summarize

    t0 = time.time()
    reports = [run_seed(cfg, os.path.join(workdir, f"seed{cfg.seed}")) for cfg in seeds]
    summary = summarize(reports, workdir)
    from sleep_jax import runtime

    if not runtime.is_writer():
        return 0
    print(summary)
    log.info("demo finished in %.0f s; reports under %s (devices: %s)", time.time() - t0,
             workdir, jax.devices()[0].platform)
    return 0


if __name__ == "__main__":
    sys.exit(main())
