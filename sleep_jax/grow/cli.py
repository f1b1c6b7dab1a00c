"""``sleep-jax grow``: grow a checkpoint (function preserving) and save the larger model.

  sleep-jax grow --checkpoint SRC --to layers=60,embed=1152 --out DST [--mesh fsdp=-1]
      [--width replicate|zero] [--heads split|zero] [--mlp split|zero] [--depth identity|stack]
      [--insert-at 1,3] [--noise 0.01] [--seed 0]

The source is loaded straight onto the mesh, grown there by ``grow_model`` (one jitted
function), and saved with its tokenizer; the checkpoint's metadata records the growth.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from sleep_jax.grow.spec import GROWABLE, GrowOptions, target_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sleep-jax grow", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="source checkpoint directory")
    p.add_argument("--to", required=True,
                   help=f"KEY=VALUE[,KEY=VALUE...] with keys in {', '.join(GROWABLE)}")
    p.add_argument("--out", required=True, help="directory for the grown checkpoint")
    p.add_argument("--mesh", default=None, help="mesh spec, e.g. 'data=2,tensor=4' "
                   "(default: all devices on fsdp)")
    p.add_argument("--width", default="replicate", choices=("replicate", "zero"))
    p.add_argument("--heads", default="split", choices=("split", "zero"))
    p.add_argument("--mlp", default="split", choices=("split", "zero"))
    p.add_argument("--depth", default="identity", choices=("identity", "stack"))
    p.add_argument("--insert-at", default=None,
                   help="source positions of new layers, e.g. '1,3' (default: spread)")
    p.add_argument("--noise", type=float, default=GrowOptions.noise)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    import jax

    from sleep_jax.grow.api import grow_model
    from sleep_jax.mesh import make_mesh
    from sleep_jax.models.checkpoint_dir import load_checkpoint, save_checkpoint

    try:
        insert_at = (None if a.insert_at is None
                     else tuple(int(p) for p in a.insert_at.split(",") if p.strip()))
        options = GrowOptions(width=a.width, heads=a.heads, mlp=a.mlp, depth=a.depth,
                              insert_at=insert_at, noise=a.noise)
        mesh = make_mesh(a.mesh)
        model, tokenizer, meta = load_checkpoint(a.checkpoint, mesh=mesh)
        src_cfg = model.config
        dst_cfg = target_config(src_cfg, a.to)
        grown, _ = grow_model(model, src_cfg, dst_cfg, mesh=mesh, rng=jax.random.key(a.seed),
                              options=options)
    except ValueError as e:
        print(f"sleep-jax grow: {e}", file=sys.stderr)
        return 2
    extra = {"grown_from": str(a.checkpoint), "growth": a.to,
             "grow_options": dataclasses.asdict(options)}
    save_checkpoint(a.out, grown, tokenizer, extra=extra, tokens=meta["tokens"])
    cfg = grown.config
    print(f"grew {a.checkpoint} -> {a.out}: layers {src_cfg.layers}->{cfg.layers}, embed "
          f"{src_cfg.embed}->{cfg.embed}, mlp {src_cfg.mlp}->{cfg.mlp}, heads "
          f"{src_cfg.heads}/{src_cfg.kv_heads}->{cfg.heads}/{cfg.kv_heads}, expert slots "
          f"{src_cfg.expert_slots}->{cfg.expert_slots}, norm_eps {cfg.norm_eps:g}")
    return 0
