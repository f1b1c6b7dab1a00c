"""One seeding step and one GRPO update on one process or many (tests/test_multiprocess_steps.py).

usage: python tests/steps_worker.py OUT.npz [--mesh fsdp=2]
Joins the other processes (``runtime.initialize``: the environment of ``sleep-jax launch``;
none: one process), builds the same tiny teacher, grown student and global batches on every
process, each process feeding only its rows (``runtime.shard_rows``, ``process_rows`` +
``global_batch``), then runs one ``seeding.make_seeding_step`` step (lambda-mix sampling,
aligned divergence, masked update of an AdapterState) and one GRPO update
(``rl.update.make_update``; the rollout's log-probs and group advantages computed on device
from the global rows). Every result is read
through ``runtime.host_read`` on every process; process 0 alone writes OUT.npz: the metrics
(``seed_metric/<name>``, ``grpo_metric/<name>``), the updated parameters (``seed/<path>``,
``grpo/<path>``; ``grpo_before/<path>`` the policy before its update) and the rows each
process fed (``rows/<batch>/<process>``).
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--mesh", default="fsdp=2")
    a = p.parse_args()

    from sleep_jax import runtime

    runtime.initialize()  # before any device use; one process: nothing to do
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    jax.config.update("jax_default_matmul_precision", "highest")
    from sleep_jax.distill import seeding
    from sleep_jax.grow import activate_slot, grow_model
    from sleep_jax.mesh import batch_sharding, make_mesh
    from sleep_jax.models import create_model, get_preset
    from sleep_jax.rl import RLConfig, with_rewards
    from sleep_jax.rl.rollout import Rollout, policy_outputs
    from sleep_jax.rl.update import make_update
    from sleep_jax.train.adapters import create_adapter_state
    from sleep_jax.train.state import create_train_state

    cfg = get_preset("tiny", vocab=64, embed=32, mlp=64, layers=1, heads=4, kv_heads=2,
                     head_dim=8)
    mesh = make_mesh(a.mesh)
    out = {}

    def rows_of(x, name):
        """This process's rows of the global numpy batch ``x`` as a global array."""
        spec = batch_sharding(mesh, x.ndim, x.shape[0])
        rows = runtime.process_rows(x.shape[0], mesh, spec, x.ndim)
        out[f"rows/{name}/{jax.process_index()}"] = rows
        return runtime.global_batch(x[rows], mesh, spec, x.shape[0])

    def params_of(tree, prefix):
        host = runtime.host_read(tree)
        for path, x in jax.tree_util.tree_leaves_with_path(host):
            out[prefix + jax.tree_util.keystr(path)] = np.asarray(x)

    # ---- one seeding step: teacher = the tiny model (sharpened), student = it grown by a slot
    base = create_model(cfg, mesh, seed=0)  # initialised on its shards: no host copy
    g, s = nnx.split(base)
    teacher = nnx.merge(g, jax.jit(lambda t: jax.tree.map(lambda x: x * 6.0, t))(s))
    student, _ = grow_model(teacher, cfg, cfg.replace(expert_slots=1, expert_rank=4),
                            mesh=mesh, rng=jax.random.key(1))
    student, _ = activate_slot(student, None, 0, jax.random.key(2))
    rng = np.random.default_rng(0)
    mk = lambda n, lo, hi: [list(rng.integers(3, cfg.vocab, int(rng.integers(lo, hi))))
                            for _ in range(n)]
    host_batch = seeding.make_batch(mk(8, 3, 9), mk(8, 2, 6), bos_id=1, teacher_len=16,
                                    student_len=8)
    batch = runtime.shard_rows(host_batch, mesh)  # what the seeding step does with a host batch
    for i, x in enumerate(batch):
        idx = [s.index[0] for s in x.addressable_shards]
        out[f"rows/seed{i}/{jax.process_index()}"] = np.unique(np.concatenate(
            [np.arange(x.shape[0])[ix] for ix in idx]))
    state = create_adapter_state(student, 0, optax.sgd(1.0))  # linear in the gradient
    step = seeding.make_seeding_step(seeding.SeedingConfig(max_new_tokens=3), state, mesh,
                                     eos_id=2)
    tg, ts = nnx.split(teacher)
    state, m = step(state, tg, ts, batch, jax.random.key(3), None)
    for k, v in runtime.host_read(m).items():
        out[f"seed_metric/{k}"] = np.asarray(v)
    params_of(state.params, "seed/")

    # ---- one GRPO update of the tiny model, the sharpened one as the KL reference: a
    # rollout of 4 prompts x G=2 fixed completions of lengths 1..M (so the token-level policy
    # term is not 0), log-probs and group advantages computed on device from the global rows
    rl = RLConfig(group_size=2, max_new_tokens=4, kl_coef=0.05)
    pstate = create_train_state(base, optax.sgd(0.5))
    B, M = 8, rl.max_new_tokens
    lens = rng.integers(1, M + 1, B)
    cols = {"prompt": np.repeat(rng.integers(3, cfg.vocab, (4, 5)), 2, 0).astype(np.int32),
            "prompt_len": np.repeat(np.array([5, 3, 4, 2], np.int32), 2),
            "completion": rng.integers(3, cfg.vocab, (B, M)).astype(np.int32),
            "mask": np.arange(M)[None] < lens[:, None],
            "rewards": rng.random(B).astype(np.float32)}
    cols = {k: rows_of(v, k) for k, v in cols.items()}

    @jax.jit
    def rollout_of(policy, ref, c):
        lp = lambda mdl: policy_outputs(mdl, c["prompt"], c["prompt_len"], c["completion"],
                                        c["mask"], temperature=rl.temperature)["logp"]
        z = jnp.zeros(c["mask"].shape, jnp.float32)
        r = Rollout(prompt=c["prompt"], prompt_len=c["prompt_len"],
                    completion=c["completion"], mask=c["mask"], old_logp=lp(policy),
                    ref_logp=lp(ref), values=z, rewards=z[:, 0], advantages=z, returns=z)
        return with_rewards(r, c["rewards"], rl)

    with jax.set_mesh(mesh):
        rollout = rollout_of(pstate.model(), teacher, cols)
    update = make_update(pstate, mesh, rl, donate=False)
    new, gm = update(pstate, rollout, jax.random.key(5))
    for k, v in runtime.host_read(gm).items():
        out[f"grpo_metric/{k}"] = np.asarray(v)
    params_of(new.params, "grpo/")
    params_of(pstate.params, "grpo_before/")

    # every process's rows, gathered so that process 0 can write them
    from jax.experimental import multihost_utils

    for key in [k for k in out if k.startswith("rows/")]:
        name = key.split("/")[1]
        allr = multihost_utils.process_allgather(np.asarray(out.pop(key)))
        for i, r in enumerate(np.asarray(allr).reshape(jax.process_count(), -1)):
            out[f"rows/{name}/{i}"] = r
    out["processes"] = np.asarray(jax.process_count())
    if runtime.is_writer():
        np.savez(a.out, **out)
    print(f"process {jax.process_index()} of {jax.process_count()}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
