"""``sleep-jax dream``: train a dream generator on a task set of (context, questions).

  sleep-jax dream --checkpoint CKPT --tasks TASKS.jsonl --workdir DIR
      [--config configs/dream.py[:quick]] [--config.run.steps=200] [--config.dream.dreams=8]

1. Load the checkpoint directory (``models.checkpoint_dir``; it needs a tokenizer.json) and the
   task set (``dream.tasks``: {"id", "context", "questions": [{"question", "answers",
   "candidates"?}]} per line; the demo world's TASK split exports one,
   ``tasks.export_world_tasks``).
2. Two free expert slots are needed, the generator's and the inner adapters'. A model without
   slots is grown to ``run.slots`` slots of rank ``run.rank``, one with fewer than two free
   slots gets more (``grow.grow_model``: exact); the two lowest free slots are activated
   (B = 0: the model is unchanged).
3. ``run.steps`` dream iterations (``iteration.dream_iteration``: generate, select, inner
   fine-tunes, contrastive reward over the null dream, GRPO or ReST-EM update of the generator
   adapter), each on ``run.contexts`` records drawn at random, on THE run loop
   (``train.loop.run_loop``): DIR/metrics.jsonl, checkpoints in DIR/train (the generator
   adapter and its optimizer state), a progress bar, SIGTERM saves; re-running resumes.
Many processes (``sleep-jax launch --nproc N -- sleep-jax dream ...``, the launch/ scripts or
the runtime flags): the run is one program on the mesh ``run.mesh`` over every device, the
contexts of a step over its batch axes; process 0 writes the metrics and the generator file,
every process its shards of the checkpoints.

4. DIR/model: the grown checkpoint (both slots on, B = 0: it computes what the input did) with
   the trained generator adapter beside it (``GENERATOR_FILE``, ``read_generator``) and its
   slots under ``extra["dream"]`` of config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

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

# the saved generator's format lives in dream/generator.py (the sleep pipeline reads it too)
from sleep_jax.dream.generator import GENERATOR_FILE, read_generator, save_generator  # noqa: F401
from sleep_jax.train.optim import OptimConfig

FLAGS = (Flag("checkpoint", help="checkpoint directory (with tokenizer.json)", required=True),
         Flag("tasks", help='JSONL {"id", "context", "questions": [{"question", "answers", '
                            '"candidates"?}]}', required=True),
         Flag("workdir", help="run folder (re-running resumes)", required=True),
         Flag("allow_config_change", bool, False,
              help="resume even though the saved config.json differs"), *RUNTIME_FLAGS)


@dataclasses.dataclass(frozen=True)
class DreamRunConfig:
    """The generator's training run.

    steps: dream iterations (generator updates). contexts: task records per iteration (drawn
      uniformly with replacement by a numpy generator seeded with ``seed``).
    slots / rank: growth of a model without expert slots; gen_slot_std: the std of the
      generator slot's random A (its B starts at 0).
    optim: the generator adapter's optimizer (AdamW + warmup + cosine + clipping).
    dream_template: the dream prompt around the context ({context}); prompt_format: a question's
      closed-book prompt ({question}), tau's prompts.
    route_noise: routing noise while the generator samples (``dream.noise``): at every token one
      of the checkpoint's trained slots (earlier sleeps'), drawn uniformly, has its output
      scaled by 1 + route_noise; 0 (default) turns it off, and it is off when no slot is
      trained.
    log_every / checkpoint_every / keep_checkpoints / progress_bar: the run loop.
    mesh / devices: the mesh (``mesh.run_mesh``: the spec over every device of every process,
      or the first ``devices`` of one process).
    """

    steps: int = 200
    contexts: int = 4
    slots: int = 4
    rank: int = 64  # what every run before 2026-12-03 got (growth ignored 8)
    gen_slot_std: float = 0.02
    optim: OptimConfig = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0)
    dream_template: str = "{context} implications:"
    prompt_format: str = "question: {question} answer:"
    seed: int = 0
    route_noise: float = 0.0
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    progress_bar: bool = True
    mesh: str = "fsdp=-1"
    devices: int = 0

    def __post_init__(self):
        for name in ("steps", "contexts", "slots", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"DreamRunConfig.{name}={getattr(self, name)} must be >= 1")
        if self.route_noise < 0:
            raise ValueError(f"DreamRunConfig.route_noise={self.route_noise} must be >= 0 "
                             f"(0: off)")
        for name, field in (("dream_template", "context"), ("prompt_format", "question")):
            text = getattr(self, name)
            try:
                text.format(**{field: "x"})
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"DreamRunConfig.{name}={text!r}: {e!r}; the only field is "
                                 f"{{{field}}}") from None
            if "{" + field + "}" not in text:
                raise ValueError(f"DreamRunConfig.{name}={text!r} must contain {{{field}}}")


def parse(argv: list[str]):
    """(config, flags, DreamRunConfig, DreamConfig, RLConfig); (None, ...) after --help."""
    from sleep_jax.dream.config import DreamConfig
    from sleep_jax.rl.config import RLConfig

    config, args = parse_command(argv, default=default_config_path("dream.py"), flags=FLAGS,
                                 prog="sleep-jax dream", doc=__doc__)
    if config is None:
        return None, {}, None, None, None
    run = from_section(DreamRunConfig, config.run, "run")
    dream = from_section(DreamConfig, config.dream, "dream")
    rl = from_section(RLConfig, config.rl, "rl")
    if rl.algorithm not in ("grpo", "rest_em"):
        raise ConfigError(f"config.rl.algorithm={rl.algorithm!r}; dreaming updates the "
                          f"generator with 'grpo' or 'rest_em'")
    return config, args, run, dream, rl


def prepare_model(base, run: DreamRunConfig, rng, mesh=None):
    """(model with both slots on, generator slot, inner slot): growth when fewer than two slots
    are free (module docstring, step 2)."""
    import jax

    from sleep_jax.grow import activate_slot, grow_model
    from sleep_jax.grow.experts import used_slots
    from sleep_jax.mesh import make_mesh

    cfg = base.config
    k_grow, k_gen, k_inner = jax.random.split(rng, 3)
    E = cfg.expert_slots
    free = E - len(used_slots(base)) if E else 0
    model = base
    if E == 0 or free < 2:
        dst = (cfg.replace(expert_slots=run.slots, expert_rank=run.rank) if E == 0
               else cfg.replace(expert_slots=E + 2 - free))
        if dst.expert_slots < 2:
            raise ValueError(f"DreamRunConfig.slots={run.slots}: dreaming needs 2 slots")
        mesh = mesh or make_mesh("fsdp=1", devices=jax.devices()[:1])
        model, _ = grow_model(base, cfg, dst, mesh=mesh, rng=k_grow)
    on = set(used_slots(model))
    gen_slot, inner_slot = [e for e in range(model.config.expert_slots) if e not in on][:2]
    model, _ = activate_slot(model, None, gen_slot, k_gen, std=run.gen_slot_std)
    model, _ = activate_slot(model, None, inner_slot, k_inner)
    return model, gen_slot, inner_slot


def main(argv: list[str] | None = None) -> int:
    from sleep_jax import runtime
    from sleep_jax.data.jsonl import JsonlError
    from sleep_jax.dream.tasks import read_tasks, task_arrays
    from sleep_jax.mesh import run_mesh
    from sleep_jax.models.checkpoint_dir import CheckpointError, load_checkpoint

    try:
        config, a, run, dcfg, rl = parse(list(sys.argv[1:] if argv is None else argv))
        if config is None:
            return 0  # --help
        try:  # many processes: before any device use
            runtime.initialize(runtime_config(a))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            mesh = run_mesh(run.mesh, run.devices)
        except ValueError as e:
            raise ConfigError(f"run.mesh={run.mesh!r}, run.devices={run.devices}: {e}") from None
        check_run_config(a["workdir"], config, a["allow_config_change"])
        tasks = read_tasks(a["tasks"])
        base, tok, meta = load_checkpoint(a["checkpoint"], mesh=mesh)  # onto its shards
        if tok is None:
            raise ValueError(f"checkpoint {a['checkpoint']!r} has no tokenizer.json; dreaming "
                             "needs one to read the task set")
        tokens = dict(meta["tokens"])
        pad = tokens.get("pad_id") or 0
        bos = tokens.get("bos_id")
        bos = pad if bos is None else bos
        enc = lambda s: tok.encode(s, add_special_tokens=False).ids
        arrays = task_arrays(tasks, enc, dream_template=run.dream_template,
                             prompt_format=run.prompt_format, bos_id=bos, pad_id=pad)
    except (ConfigError, JsonlError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"sleep-jax dream: error: {e}", file=sys.stderr)
        return 2
    if runtime.is_writer():
        write_run_config(a["workdir"], config, a["allow_config_change"])
    result = train_generator(base, tok, meta, arrays, run=run, cfg=dcfg, rl=rl,
                             workdir=a["workdir"], checkpoint=a["checkpoint"], mesh=mesh)
    if not runtime.is_writer():
        return 0 if result["status"] == "done" else 1
    print(json.dumps({k: result[k] for k in ("status", "step", "reward_first", "reward_last")},
                     indent=2))
    print(f"outputs in {a['workdir']}: metrics.jsonl, train/ (resume by re-running), model/ "
          f"(the checkpoint with the generator, {GENERATOR_FILE})")
    return 0 if result["status"] == "done" else 1


def train_generator(base, tok, meta, arrays, *, run: DreamRunConfig, cfg, rl, workdir: str,
                    checkpoint: str, mesh=None) -> dict:
    """The run behind the command (module docstring, steps 2-4) on ``mesh`` (default: one
    device); returns a summary dict."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from sleep_jax import runtime
    from sleep_jax.dream import iteration
    from sleep_jax.grow.experts import used_slots
    from sleep_jax.mesh import make_mesh
    from sleep_jax.models.checkpoint_dir import save_checkpoint
    from sleep_jax.train.loop import LoopConfig, RngSource, read_metrics, run_loop
    from sleep_jax.train.optim import make_optimizer

    tokens = dict(meta["tokens"])
    pad = tokens.get("pad_id") or 0
    bos = tokens.get("bos_id")
    bos = pad if bos is None else bos
    key = jax.random.key(run.seed)
    mesh = mesh or make_mesh("fsdp=1", devices=jax.devices()[:1])
    model, gslot, islot = prepare_model(base, run, jax.random.fold_in(key, 99), mesh)
    noise = tuple(e for e in used_slots(model) if e not in (gslot, islot)) \
        if run.route_noise > 0 else ()  # the trained slots of earlier sleeps
    gen, a0 = iteration.prepare(model, gen_slot=gslot, inner_slot=islot,
                                tx=make_optimizer(run.optim, run.steps))
    N = arrays.prompt.shape[0]
    # the same global batch on every process, each placing its rows (contexts over the mesh's
    # batch axes; a count they do not divide is replicated)
    source = RngSource(lambda r: runtime.shard_rows(arrays.as_batch(r.integers(0, N,
                                                                              run.contexts)),
                                                    mesh),
                       np.random.default_rng(run.seed + 17))
    eos = tokens.get("eos_id")

    # fixed shardings on the mesh for the state (a restored one too): every step, resumed or
    # not, runs one program. The generator state by its logical names, adapter0 replicated.
    gen = jax.device_put(gen, gen.shardings(mesh))
    a0 = jax.device_put(a0, NamedSharding(mesh, PartitionSpec()))
    state_sh = jax.tree.map(lambda x: x.sharding,
                            {"params": gen.params, "opt_state": gen.opt_state, "step": gen.step})

    @jax.jit
    def core(g, adapter0, batch, rng):
        g, out = iteration.dream_iteration(g, islot, adapter0, batch, rng, cfg=cfg, rl=rl,
                                           bos_id=bos, eos_id=eos, pad_id=pad,
                                           noise_slots=noise, noise_scale=run.route_noise)
        m = {k: v for k, v in out.items() if getattr(v, "ndim", 1) == 0}
        m["skipped"] = out.get("update/skipped", 0)
        return {"params": g.params, "opt_state": g.opt_state, "step": g.step}, m

    def step(state, batch, rng):  # the checkpointed state is the generator adapter's part
        return core(gen.replace(**jax.device_put(state, state_sh)), a0, batch, rng)

    state = {"params": gen.params, "opt_state": gen.opt_state, "step": gen.step}
    lcfg = LoopConfig(steps=run.steps, log_every=run.log_every,
                      checkpoint_every=run.checkpoint_every,
                      keep_checkpoints=run.keep_checkpoints, progress_bar=run.progress_bar,
                      seed=run.seed, tensorboard=False)
    initial = runtime.host_read(gen.params)  # the untrained generator (the demo's control)
    res = run_loop(step, state, source, cfg=lcfg, rng=key, workdir=workdir,
                   desc="dream: generator")
    # process 0 wrote the metrics (another host may not see its file)
    history = read_metrics(os.path.join(workdir, "metrics.jsonl")) if runtime.is_writer() \
        else []
    final = gen.replace(**res.state)
    model_dir = os.path.join(workdir, "model")
    info = {"generator_slot": gslot, "inner_slot": islot, "generator_file": GENERATOR_FILE,
            "steps": res.step, "dream_template": run.dream_template,
            "prompt_format": run.prompt_format, "noise_slots": list(noise),
            "route_noise": run.route_noise, "config": dataclasses.asdict(cfg),
            "rl": dataclasses.asdict(rl)}
    # the model as the dreams see it (the generator slot's B = 0); the trained adapter is kept
    # beside it, not written into the slot, so the checkpoint computes what its input did
    save_checkpoint(model_dir, model, tok, tokens=tokens,  # every process: its shards
                    extra={**meta.get("extra", {}), "grown_from": os.path.abspath(checkpoint),
                           "dream": info})
    adapter = runtime.host_read(final.params)  # a collective when it spans processes
    if runtime.is_writer():
        save_generator(model_dir, adapter)
    rewards = [r["reward_mean"] for r in history if "reward_mean" in r]
    return {"status": res.status, "step": res.step, "message": res.message,
            "reward_first": rewards[0] if rewards else None,
            "reward_last": rewards[-1] if rewards else None, "history": history,
            "generator_slot": gslot, "inner_slot": islot, "initial_adapter": initial,
            "step_s": res.step_s, "compile_s": res.compile_s}
