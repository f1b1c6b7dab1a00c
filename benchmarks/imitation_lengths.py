"""Learning to Imitate, before/after matched lengths, on the demo world (one seed).

The change (commit efe7e2a): the student's continuation of the cut teacher text is as long as
the teacher remainder it is compared with (width Y, rows truncated to each remainder), instead
of ``RLConfig.max_new_tokens`` (4) tokens against a remainder of up to Y = 8 tokens, which
charged the missing characters as edits. This trains one demo base, then runs the demo method
``sleep_imitate`` twice from it with the same settings: once as the code is ("matched") and
once with the earlier rollout ("unmatched", reconstructed below from that commit's parent),
and prints the demo's figures for both (selected on validation, and end of budget), last line
JSON.

    python benchmarks/imitation_lengths.py [--steps 200] [--seed 0] [--base-steps N]
"""

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sleep_jax import demo_run  # noqa: E402
from sleep_jax.data import world as worldlib  # noqa: E402
from sleep_jax.data.tokenizers import special_ids, word_level_tokenizer  # noqa: E402
from sleep_jax.demo import DemoConfig  # noqa: E402
from sleep_jax.distill import imitation  # noqa: E402
from sleep_jax.mesh import make_mesh  # noqa: E402
from sleep_jax.models.config import ModelConfig  # noqa: E402
from sleep_jax.rl.rollout import sample_rollout  # noqa: E402
from sleep_jax.sampling import generate, join  # noqa: E402

MATCHED = imitation.imitation_rollout


def unmatched_rollout(student, teacher, teacher_prefix_bp, teacher_len_b, student_prefix_bq,
                      student_len_b, rng, *, rl_cfg, text_tokens, temperature=1.0, eos_id,
                      pad_id=0):
    """The rollout before efe7e2a: the student writes rl_cfg.max_new_tokens tokens, whatever
    the length of the teacher remainder it is scored against."""
    k_text, k_cut, k_roll = jax.random.split(rng, 3)
    y = generate(teacher, teacher_prefix_bp, teacher_len_b, k_text, max_new_tokens=text_tokens,
                 temperature=temperature, eos_id=eos_id, pad_id=pad_id)
    n = jnp.maximum(y.lengths, 1)
    cut = jnp.floor(jax.random.uniform(k_cut, n.shape) * n).astype(jnp.int32)
    Y = text_tokens
    head = (jnp.arange(Y)[None] < cut[:, None]) & y.mask
    toks, _, _, _ = join(student_prefix_bq, student_len_b, y.tokens, head, pad_id)
    prompt_len = student_len_b + jnp.sum(head, 1)
    idx = jnp.minimum(cut[:, None] + jnp.arange(Y)[None], Y - 1)
    target = jnp.take_along_axis(y.tokens, idx, 1)
    target_mask = jnp.take_along_axis(y.mask, idx, 1) & (cut[:, None] + jnp.arange(Y)[None] < Y)
    roll = sample_rollout(student, None, toks, prompt_len, k_roll, cfg=rl_cfg, eos_id=eos_id,
                          pad_id=pad_id)
    G = rl_cfg.group_size
    return roll, jnp.repeat(target, G, 0), jnp.repeat(target_mask, G, 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="sleep steps of each run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-steps", type=int, default=DemoConfig().base_steps,
                   help="base training steps (the demo's by default; fewer for a smoke run)")
    a = p.parse_args()
    cfg = dataclasses.replace(DemoConfig(), sleep_steps=a.steps, seed=a.seed,
                              base_steps=a.base_steps, eval_every=min(100, a.steps))
    world = worldlib.make_world(cfg.seed, cfg.n_old, cfg.n_new, cfg.n_task)
    tok = word_level_tokenizer(world.vocabulary_corpus())
    model_cfg = ModelConfig(vocab=tok.get_vocab_size(), embed=cfg.embed, mlp=cfg.mlp,
                            layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.heads,
                            head_dim=cfg.embed // cfg.heads, max_seq_len=256)
    ctx = demo_run.Ctx(cfg, world, tok, special_ids(tok), model_cfg,
                       make_mesh("fsdp=1", devices=jax.devices()[:1]))
    t0 = time.time()
    base = demo_run.train_base(ctx)
    validation = demo_run.make_validation(ctx)
    base_val = validation(base)
    out = {"seed": a.seed, "steps": a.steps, "base_s": round(time.time() - t0, 1),
           "base": {**demo_run.evaluate(ctx, base, base), **base_val}}
    for name, fn in (("matched", MATCHED), ("unmatched", unmatched_rollout)):
        imitation.imitation_rollout = fn
        t0 = time.time()
        r = demo_run.run_method(ctx, "sleep_imitate", base, validation, base_val["val_old"])
        end = {"step": r["end_step"], **demo_run.evaluate(ctx, r["model"], base)}
        sel = None
        if r["selected"] is not None:
            sel = {**demo_run.evaluate(ctx, r["selected_model"], base), **r["selected"]}
        out[name] = {"selected": sel, "end": end, "wall_s": round(time.time() - t0, 1),
                     "step_s": r["step_s"]}
        print(name, json.dumps(out[name]), flush=True)
    imitation.imitation_rollout = MATCHED
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
