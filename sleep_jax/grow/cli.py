"""``sleep-jax grow``: grow a checkpoint (function preserving) and save the larger model.

  sleep-jax grow --checkpoint SRC --out DST [--config configs/grow.py]
      [--config.to=layers=60,embed=1152] [--config.mesh=fsdp=-1]
      [--config.options.width=replicate|zero] [--config.options.heads=split|zero]
      [--config.options.mlp=split|zero] [--config.options.depth=identity|stack]
      [--config.options.insert_at="(1,3)"] [--config.options.noise=0.01] [--config.seed=0]

The source is loaded straight onto the mesh, grown there by ``grow_model`` (one jitted
function), and saved with its tokenizer; the checkpoint's metadata records the growth. Runs on
many processes like every command (``sleep-jax launch --nproc N -- sleep-jax grow ...``, the
launch/ scripts, or the runtime flags): the mesh spans every process's devices and each
process writes its own shards of the grown checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys

from sleep_jax.config import (
    RUNTIME_FLAGS,
    ConfigError,
    Flag,
    default_config_path,
    from_section,
    parse_command,
    runtime_config,
)
from sleep_jax.grow.spec import GrowOptions, target_config

FLAGS = (Flag("checkpoint", help="source checkpoint directory", required=True),
         Flag("out", help="directory for the grown checkpoint", required=True), *RUNTIME_FLAGS)


def main(argv: list[str]) -> int:
    try:
        config, a = parse_command(argv, default=default_config_path("grow.py"), flags=FLAGS,
                                  prog="sleep-jax grow", doc=__doc__)
        if config is None:
            return 0  # --help
        options = from_section(GrowOptions, config.options, "options")
        from sleep_jax import runtime

        try:
            runtime.initialize(runtime_config(a))  # many processes: before any device use
        except ValueError as e:
            raise ConfigError(str(e)) from None
    except ConfigError as e:
        print(f"sleep-jax grow: error: {e}", file=sys.stderr)
        return 2
    import jax

    from sleep_jax.grow.api import grow_model
    from sleep_jax.mesh import make_mesh
    from sleep_jax.models.checkpoint_dir import load_checkpoint, save_checkpoint

    try:
        mesh = make_mesh(config.mesh)
        model, tokenizer, meta = load_checkpoint(a["checkpoint"], mesh=mesh)
        src_cfg = model.config
        dst_cfg = target_config(src_cfg, config.to)
        grown, _ = grow_model(model, src_cfg, dst_cfg, mesh=mesh, rng=jax.random.key(config.seed),
                              options=options)
    except (ValueError, FileNotFoundError) as e:
        print(f"sleep-jax grow: error: {e}", file=sys.stderr)
        return 2
    extra = {"grown_from": str(a["checkpoint"]), "growth": config.to,
             "grow_options": dataclasses.asdict(options)}
    save_checkpoint(a["out"], grown, tokenizer, extra=extra, tokens=meta["tokens"])
    cfg = grown.config
    if not runtime.is_writer():
        return 0
    print(f"grew {a['checkpoint']} -> {a['out']}: layers {src_cfg.layers}->{cfg.layers}, embed "
          f"{src_cfg.embed}->{cfg.embed}, mlp {src_cfg.mlp}->{cfg.mlp}, heads "
          f"{src_cfg.heads}/{src_cfg.kv_heads}->{cfg.heads}/{cfg.kv_heads}, expert slots "
          f"{src_cfg.expert_slots}->{cfg.expert_slots}, norm_eps {cfg.norm_eps:g}")
    return 0
