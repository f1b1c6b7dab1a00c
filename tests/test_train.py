"""The sharded train step, exact accumulation, masks, the NaN guard, the trainer loop, the CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sleep_jax.mesh import make_mesh
from sleep_jax.models import Decoder
from sleep_jax.train.optim import OptimConfig, lr_schedule, make_optimizer
from sleep_jax.train.state import create_train_state, train_state_shardings
from sleep_jax.train.step import accumulate_gradients, lm_loss, make_train_step
from sleep_jax.train.trainer import TrainConfig, constant_batches, fit, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T = 8, 16


def make_batch(seed: int, vocab: int = 256, loss_keep: float = 1.0) -> dict:
    """Random tokens in [1, vocab); loss_mask keeps a random ``loss_keep`` share of targets."""
    r = np.random.default_rng(seed)
    x = r.integers(1, vocab, (B, T + 1)).astype(np.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:],
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32), "mask": np.ones((B, T), bool),
            "loss_mask": r.random((B, T)) < loss_keep if loss_keep < 1 else np.ones((B, T), bool)}


def new_state(cfg, tx, mesh):
    """A fresh train state on ``mesh`` (initialised once per cfg/tx on the host, then placed)."""
    key = (cfg, id(tx))
    if key not in _STATES:
        # Host copies: the step donates its input, so no device buffer may be shared.
        _STATES[key] = jax.device_get(create_train_state(Decoder(cfg, rngs=nnx.Rngs(0)), tx))
    state = _STATES[key]
    return jax.device_put(state, train_state_shardings(state, mesh))


_STATES = {}


def one_device():
    return make_mesh("data=1", jax.devices()[:1])


def assert_tree_close(a, b, rtol=1e-5):
    """Every leaf equal to rtol, with atol = rtol * max|leaf| (float32 summation-order noise)."""
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=rtol * np.abs(y).max())


def test_lr_schedule_short_runs_and_shape():
    """warmup >= steps (optax would fail) is clamped; the cosine matches the formula."""
    for warmup, steps in [(10, 3), (10, 1), (5, 5), (0, 4)]:
        f = lr_schedule(OptimConfig(lr=1.0, warmup_steps=warmup, end_lr_ratio=0.1), steps)
        vals = np.array([float(f(t)) for t in range(steps + 3)])
        assert np.all(np.isfinite(vals)) and vals.max() <= 1.0 + 1e-6
        assert vals[-1] == pytest.approx(0.1)
    f = lr_schedule(OptimConfig(lr=2.0, warmup_steps=4, end_lr_ratio=0.1), 20)
    assert float(f(2)) == pytest.approx(1.0)  # linear warmup: 2 * 2/4
    t, W, S, e = 12, 4, 20, 0.2
    assert float(f(t)) == pytest.approx(e + (2.0 - e) * (1 + np.cos(np.pi * (t - W) / (S - W))) / 2)


def test_same_step_on_every_mesh(tiny_cfg):
    """One SGD step on data=8, data=2/fsdp=4, fsdp=4/tensor=2 equals the single-device step."""
    batch, rng = make_batch(0), jax.random.key_data(jax.random.key(0))
    tx = optax.sgd(0.5)  # linear in the gradient, so params compare at gradient precision
    results = {}
    for spec in ("single", "data=8", "data=2,fsdp=4", "fsdp=4,tensor=2"):
        mesh = one_device() if spec == "single" else make_mesh(spec)
        state = new_state(tiny_cfg, tx, mesh)
        step = make_train_step(state, mesh)
        state, m = step(state, batch, rng)
        results[spec] = (jax.device_get(state.params), jax.device_get(m))
        if spec == "fsdp=4,tensor=2":  # parameters really are split
            q = state.params["blocks"]["q"][...]
            assert q.sharding.shard_shape(q.shape) == (2, 16, 2, 16)
    ref_p, ref_m = results.pop("single")
    for spec, (p, m) in results.items():
        assert_tree_close(p, ref_p)
        np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5, err_msg=spec)
        np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-5, err_msg=spec)
    assert abs(float(ref_m["loss"]) - np.log(256)) < 0.1  # random init: near-uniform


def test_micro_batches_equal_full_batch(tiny_cfg):
    """k micro-batches give the full-batch gradient (uneven loss counts per micro-batch)."""
    batch = make_batch(1, loss_keep=0.4)
    state = new_state(tiny_cfg, optax.sgd(0.5), one_device())
    rng = jax.random.key_data(jax.random.key(0))
    acc = jax.jit(accumulate_gradients, static_argnums=3)
    grads = {}
    for k in (1, 4):
        s, c, g = acc(state, batch, rng, k)
        grads[k] = jax.tree.map(lambda x, c=c: x / c, g)
    assert_tree_close(grads[4], grads[1])
    # A mean of per-micro-batch means is not the same thing (the test can fail).
    means = []
    for j in range(4):
        _, c, g = acc(state, {n: v[j::4] for n, v in batch.items()}, rng, 1)
        means.append(jax.tree.map(lambda x, c=c: x / c, g))
    naive = jax.tree.map(lambda *xs: sum(xs) / 4, *means)
    diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
               for a, b in zip(jax.tree.leaves(naive), jax.tree.leaves(grads[1])))
    assert diff > 1e-3
    # And through the jitted, sharded step: micro_batches=2 on data=2,fsdp=4 == one device.
    mesh = make_mesh("data=2,fsdp=4")
    st2 = new_state(tiny_cfg, optax.sgd(0.5), mesh)
    st2, m2 = make_train_step(st2, mesh, micro_batches=2)(st2, batch, rng)
    st1, m1 = make_train_step(state, one_device())(state, batch, rng)
    assert_tree_close(st2.params, st1.params)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    assert float(m2["tokens"]) == batch["loss_mask"].sum()


def test_masked_entries_bitwise_unchanged(tiny_cfg):
    """Whole arrays and parts of arrays masked out stay bitwise equal, weight decay on."""
    mesh = make_mesh("data=2,fsdp=4")
    tx = make_optimizer(OptimConfig(lr=1e-2, weight_decay=0.5, warmup_steps=0), 10)
    state = new_state(tiny_cfg, tx, mesh)
    p0 = jax.device_get(state.params)
    mask = jax.tree.map(lambda _: True, p0)
    mask["embed"] = mask["embed"].replace(False)  # whole array
    q_mask = np.array([True, False])[:, None, None, None]  # layer 1 of q [L,D,N,H] frozen
    mask["blocks"]["q"] = mask["blocks"]["q"].replace(q_mask)
    down_mask = np.arange(tiny_cfg.mlp)[None, :, None] < 10  # rows 10.. of down [L,F,D] frozen
    mask["blocks"]["down"] = mask["blocks"]["down"].replace(down_mask)
    step = make_train_step(state, mesh, mask=mask)
    key = jax.random.key_data(jax.random.key(0))
    for i in range(3):
        state, _ = step(state, make_batch(i), jax.random.fold_in(key, i))
    p = jax.device_get(state.params)
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")][0]
    mu, nu = jax.device_get(adam.mu), jax.device_get(adam.nu)
    assert np.array_equal(p["embed"][...], p0["embed"][...])
    assert not np.any(mu["embed"][...]) and not np.any(nu["embed"][...])
    q, q0 = p["blocks"]["q"][...], p0["blocks"]["q"][...]
    assert np.array_equal(q[1], q0[1]) and not np.any(mu["blocks"]["q"][...][1])
    assert np.mean(q[0] != q0[0]) > 0.99  # the trainable layer moved
    d, d0 = p["blocks"]["down"][...], p0["blocks"]["down"][...]
    assert np.array_equal(d[:, 10:], d0[:, 10:]) and not np.any(nu["blocks"]["down"][...][:, 10:])
    assert np.mean(d[:, :10] != d0[:, :10]) > 0.99
    assert not np.array_equal(p["final_norm"][...], p0["final_norm"][...])


def _poison_loss(model, batch, rng):
    """lm_loss, but NaN when the batch's first token is 0 (the injected fault)."""
    s, c = lm_loss(model, batch, rng)
    return jnp.where(batch["inputs"][0, 0] == 0, jnp.nan, s), c


def test_no_recompile_and_nan_step_skipped(tiny_cfg):
    """Steps 2.. reuse the first compilation; an injected NaN step is skipped and counted."""
    mesh = make_mesh("fsdp=8")
    state = new_state(tiny_cfg, make_optimizer(OptimConfig(), 10), mesh)
    step = make_train_step(state, mesh, loss_fn=_poison_loss)
    key = jax.random.key_data(jax.random.key(0))
    for i in range(3):
        state, m = step(state, make_batch(i), jax.random.fold_in(key, i))
        assert int(m["skipped"]) == 0
    assert step.jitted._cache_size() == 1
    before = jax.device_get((state.params, state.opt_state))
    bad = make_batch(5)
    bad["inputs"][0, 0] = 0
    state, m = step(state, bad, key)
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    after = jax.device_get((state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        assert np.array_equal(a, b)
    assert int(state.step) == 4  # step counts batches consumed, skipped ones included
    assert step.jitted._cache_size() == 1


def test_trainer_stops_after_consecutive_nans(tiny_cfg, tmp_path):
    mesh = make_mesh("fsdp=8")
    tcfg = TrainConfig(steps=20, batch_size=B, seq_len=T, checkpoint_every=2,
                       max_consecutive_skips=3, progress_bar=False, async_checkpoints=False)
    ocfg = OptimConfig(warmup_steps=0)
    state = new_state(tiny_cfg, make_optimizer(ocfg, tcfg.steps), mesh)
    good = [make_batch(i) for i in range(3)]
    bad = make_batch(9)
    bad["inputs"][0, 0] = 0
    data = iter(good + [bad] * 10)
    r = fit(state, data, train_cfg=tcfg, optim_cfg=ocfg, mesh=mesh, workdir=str(tmp_path),
            loss_fn=_poison_loss, tensorboard=False)
    assert r.status == "nonfinite" and r.step == 6
    assert "3 consecutive steps had a non-finite loss" in r.message
    assert "last good checkpoint is step 2" in r.message
    assert [h["skipped"] for h in r.history] == [0, 0, 0, 1, 1, 1]
    assert r.history[-1]["skipped_total"] == 3
    from sleep_jax.checkpoint import Checkpointer

    assert Checkpointer(str(tmp_path / "train")).all_steps() == [2]


def test_memorises_tiny_set_and_writes_run_files(tiny_cfg, tmp_path):
    """Loss on 8 fixed sequences falls from ln(256) = 5.55 to below 0.1 in 60 steps."""
    mesh = make_mesh("data=2,fsdp=4")
    tcfg = TrainConfig(steps=60, batch_size=B, seq_len=T, checkpoint_every=30, eval_every=30,
                       progress_bar=False)
    ocfg = OptimConfig(lr=1e-2, warmup_steps=5, weight_decay=0.0)
    state = new_state(tiny_cfg, make_optimizer(ocfg, tcfg.steps), mesh)
    batch = make_batch(0)
    r = fit(state, constant_batches([batch]), train_cfg=tcfg, optim_cfg=ocfg, mesh=mesh,
            workdir=str(tmp_path), eval_batches=[batch])
    losses = [h["loss"] for h in r.history]
    assert losses[0] > 5.0 and losses[-1] < 0.1, losses[::10]  # measured: 0.006
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [x["step"] for x in recs] == list(range(1, 61))
    assert recs[-1]["eval_loss"] < 0.1 and "eval_loss" in recs[29]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert sorted(os.listdir(tmp_path / "train")) == ["30", "60"]


def test_cli_runs_out_of_the_box_and_resumes(tmp_path, capsys):
    """Defaults (built-in text) train; the same command again resumes without new lines."""
    from sleep_jax.train.cli import main

    w = str(tmp_path / "run")
    argv = ["--config", os.path.join(ROOT, "configs", "train.py:tiny"), "--workdir", w,
            "--config.train.steps=4", "--config.train.seq_len=32",
            "--config.train.progress_bar=false", "--config.data.builtin_sentences=200"]
    assert main(argv) == 0
    assert "trained to step 4" in capsys.readouterr().out
    assert {"config.json", "metrics.jsonl", "tb", "train", "model"} <= set(os.listdir(w))
    assert os.path.exists(os.path.join(w, "model", "config.json"))  # exported on completion
    assert main(argv[:-1] + ["--config.data.builtin_sentences=200"]) == 0
    assert [r["step"] for r in read_metrics(os.path.join(w, "metrics.jsonl"))] == [1, 2, 3, 4]
    with open(os.path.join(w, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 4


def _guard_case():
    """A small state (Linear, AdamW on a warmup schedule) and a finite gradient for it."""
    from sleep_jax.train.state import apply_gradients

    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.linear_schedule(0.0, 1e-2, 10), weight_decay=0.1))
    state = create_train_state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), tx)
    state = apply_gradients(state, jax.tree.map(jnp.ones_like, state.params))  # moments != 0
    g = jax.tree.map(lambda p: jnp.full(p.shape, 0.3, p.dtype), state.params)
    return state, g


@pytest.mark.parametrize("fault", ["nan_grad", "inf_grad", "nan_loss", "inf_loss"])
def test_skip_if_nonfinite_keeps_the_old_state_bitwise(fault):
    """A non-finite gradient entry or loss: params, optimizer state (its own step count
    included) bitwise the old ones, skipped = 1, ``step`` counts the batch (+1)."""
    from sleep_jax.train.finite import skip_if_nonfinite
    from sleep_jax.train.state import apply_gradients

    state, g = _guard_case()
    loss = jnp.float32(1.5)
    if fault.endswith("grad"):
        bad = jnp.nan if fault == "nan_grad" else jnp.inf
        g = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(bad), g)
    else:
        loss = jnp.float32(jnp.nan if fault == "nan_loss" else jnp.inf)
    before = jax.device_get((state.params, state.opt_state))

    @jax.jit
    def guarded(s, loss, g):
        return skip_if_nonfinite(apply_gradients(s, g), s, loss, g)

    new, skipped = guarded(state, loss, g)
    assert int(skipped) == 1
    after = jax.device_get((new.params, new.opt_state))
    leaves_b, leaves_a = jax.tree.leaves(before), jax.tree.leaves(after)
    assert len(leaves_a) == len(leaves_b) > 2
    for a, b in zip(leaves_a, leaves_b):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.array_equal(np.asarray(a), np.asarray(b))
    counts = [x for x in leaves_b if np.asarray(x).dtype == np.int32]
    assert counts and all(int(c) == 1 for c in counts)  # the optimizer's count did not advance
    assert int(new.step) == int(state.step) + 1


def test_skip_if_nonfinite_passes_finite_updates_unchanged():
    """Finite loss and gradients: the guarded step is bitwise the unguarded one, skipped = 0."""
    from sleep_jax.train.finite import skip_if_nonfinite
    from sleep_jax.train.state import apply_gradients

    state, g = _guard_case()
    plain = jax.jit(apply_gradients)(state, g)
    new, skipped = jax.jit(lambda s, g: skip_if_nonfinite(apply_gradients(s, g), s, 1.5, g))(
        state, g)
    assert int(skipped) == 0
    for a, b in zip(jax.tree.leaves(jax.device_get(new)), jax.tree.leaves(jax.device_get(plain))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(new.params),
                         jax.device_get(state.params))
    assert all(jax.tree.leaves(moved))  # the step did move every parameter
