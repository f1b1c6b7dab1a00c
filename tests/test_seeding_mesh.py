"""Upward distillation across mesh layouts: the teacher (the small self) sharded one way, the
grown student another on the same 8 devices, growth written straight onto the student's layout,
and the seeding step (lambda-mix sampling, aligned divergence, the slot adapter's update)
sharded; equal to the same step on one device."""

import jax
import numpy as np
import optax
from flax import nnx

from sleep_jax.distill import seeding
from sleep_jax.grow import activate_slot, grow_model
from sleep_jax.mesh import make_mesh
from sleep_jax.models import create_model, get_preset
from sleep_jax.models.sharding import shard_model
from sleep_jax.train.adapters import create_adapter_state
from sleep_jax.train.state import fresh_copy

CFG = get_preset("tiny", vocab=64, embed=32, mlp=64, layers=2, heads=4, kv_heads=2,
                 head_dim=8)
DST = CFG.replace(expert_slots=1, expert_rank=4)


def _rows(rng, n, lo, hi):
    return [list(rng.integers(3, CFG.vocab, int(rng.integers(lo, hi)))) for _ in range(n)]


def _mesh_shape(x):
    return dict(x.sharding.mesh.shape)


def test_seeding_across_mesh_layouts_equals_one_device():
    teacher_mesh, student_mesh = make_mesh("fsdp=8"), make_mesh("fsdp=2,tensor=4")
    base = create_model(CFG, seed=0)
    g, s = nnx.split(base)
    teacher = shard_model(nnx.merge(g, jax.tree.map(lambda x: x * 6.0, s)), teacher_mesh)
    q = nnx.state(teacher, nnx.Param)["blocks"]["q"][...]
    assert _mesh_shape(q) == dict(teacher_mesh.shape)
    # growth reads the teacher's layout and writes the student's
    student, _ = grow_model(teacher, CFG, DST, mesh=student_mesh, rng=jax.random.key(1))
    student, _ = activate_slot(student, None, 0, jax.random.key(2))
    sq = nnx.state(student, nnx.Param)["blocks"]["q"][...]
    assert _mesh_shape(sq) == dict(student_mesh.shape)
    assert sq.sharding.shard_shape(sq.shape) != sq.shape  # really split

    rng = np.random.default_rng(0)
    batch = seeding.make_batch(_rows(rng, 8, 3, 9), _rows(rng, 8, 2, 6), bos_id=1,
                               teacher_len=16, student_len=8)
    scfg = seeding.SeedingConfig(max_new_tokens=3)
    tx = optax.sgd(1.0)  # linear in the gradient: parameters compare at gradient precision

    one = make_mesh("fsdp=1", devices=jax.devices()[:1])
    on_one = lambda m: shard_model(fresh_copy(m), one)  # a copy on one device
    runs = {}
    for name, mesh, t, st in (("sharded", student_mesh, teacher, student),
                              ("one device", one, on_one(teacher), on_one(student))):
        state = create_adapter_state(st, 0, tx)
        step = seeding.make_seeding_step(scfg, state, mesh, eos_id=2)
        tg, ts = nnx.split(t)
        divs = []
        for i in range(2):
            state, m = step(state, tg, ts, batch, jax.random.key(i), None)
            divs.append(float(m["divergence"]))
        runs[name] = (divs, jax.device_get(state.params))
    (d_sh, p_sh), (d_one, p_one) = runs["sharded"], runs["one device"]
    assert d_sh[0] > 0 and d_sh[1] != d_sh[0]  # the step learns something to compare
    np.testing.assert_allclose(d_sh, d_one, rtol=1e-5, atol=1e-7)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(p_sh), jax.tree.leaves(p_one)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
