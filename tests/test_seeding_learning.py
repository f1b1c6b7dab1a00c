"""Seeding learns: knowledge given only in context ends up in the parameters.

A tiny base model is trained once (module fixture, 300 steps) on reading comprehension:
"n12 lives in c3 . where does n12 live ?" -> "c3", and the same with a second wording
"home of n12 is" -> "c3", on random (name, city) pairs, so it answers from context. NEW facts
are then seeded with the first wording only; closed-book accuracy is measured on the second
wording, never used in seeding. The negative control is the same run with the teacher
reading no memory: it cannot raise accuracy.
"""

import fcntl
import os
import pickle

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from sleep_jax.distill import seeding
from sleep_jax.mesh import make_mesh
from sleep_jax.models import create_model, get_preset
from sleep_jax.sampling import generate
from sleep_jax.train.state import create_train_state, fresh_copy
from sleep_jax.train.step import make_train_step

NAMES, CITIES, T = 56, 10, 16
WORDS = (["<pad>", "<bos>", "<eos>", "lives", "in", ".", "where", "does", "live", "?", "home",
          "of", "is"] + [f"n{i}" for i in range(NAMES)] + [f"c{i}" for i in range(CITIES)])
ID = {w: i for i, w in enumerate(WORDS)}
CFG = get_preset("tiny", vocab=80, embed=64, mlp=128, layers=2, heads=4, kv_heads=2,
                 head_dim=16)
NEW = {n: (3 * n + 1) % CITIES for n in range(40, 56)}


def enc(text):
    return [ID[w] for w in text.split()]


def memory(n, c):
    return f"n{n} lives in c{c} ."


def question(n, wording):
    return f"where does n{n} live ?" if wording == 0 else f"home of n{n} is"


def _rc_batch(rng, B):
    inp, tgt = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    valid, loss = np.zeros((B, T), bool), np.zeros((B, T), bool)
    for b in range(B):
        n, c, w = rng.integers(0, NAMES), rng.integers(0, CITIES), rng.integers(0, 2)
        toks = [1] + enc(memory(n, c) + " " + question(n, w)) + [ID[f"c{c}"], 2]
        L = len(toks) - 1
        inp[b, :L], tgt[b, :L], valid[b, :L] = toks[:-1], toks[1:], True
        loss[b, L - 2:L] = True  # the answer and EOS
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    return {"inputs": inp, "targets": tgt, "positions": pos,
            "segment_ids": valid.astype(np.int32), "mask": valid, "loss_mask": loss}


def _train_base():
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    state = create_train_state(create_model(CFG, seed=0), optax.adam(3e-3))
    step = make_train_step(state, mesh)
    rng = np.random.default_rng(0)
    for i in range(300):
        state, m = step(state, _rc_batch(rng, 64), jax.random.key(i))
    assert float(m["loss"]) < 0.05, float(m["loss"])
    return state.model()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The trained base (300 steps; its loss check runs where it is trained), trained once per
    test run: this file and test_sleep.py (which imports this fixture) each need it, often in
    the two pytest-xdist workers; the first trains it under a lock and leaves its parameters in
    the run's shared basetemp, the second loads them (bitwise the same arrays)."""
    from sleep_jax.models.checkpoint_dir import model_from_params

    tmp = tmp_path_factory.getbasetemp()
    root = tmp.parent if os.environ.get("PYTEST_XDIST_WORKER") else tmp
    path = root / "seeding_learning_base.pkl"
    with open(root / "seeding_learning_base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.exists():
            with open(path, "rb") as f:
                return model_from_params(CFG, pickle.load(f))
        model = _train_base()
        params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
        with open(f"{path}.tmp", "wb") as f:
            pickle.dump(params, f)
        os.replace(f"{path}.tmp", path)
        return model


def accuracy(model, wording, with_memory):
    ps = [[1] + (enc(memory(n, c)) if with_memory else []) + enc(question(n, wording))
          for n, c in NEW.items()]
    arr = np.zeros((len(ps), max(map(len, ps))), np.int32)
    for i, p in enumerate(ps):
        arr[i, :len(p)] = p
    out = generate(model, arr, np.array([len(p) for p in ps]), jax.random.key(0),
                   max_new_tokens=1, temperature=0.0)
    return float(np.mean(np.asarray(out.tokens[:, 0]) == [ID[f"c{c}"] for c in NEW.values()]))


# 300 seeding steps. Closed-book accuracy on the held-out wording differs by host (XLA's CPU
# code differs by CPU): on a 2-core AMD EPYC at 25/50/75/100/125/150 steps 0.125/0.19/0.69/
# 0.94/0.94/0.81; on a 2-core Intel Xeon (2026-12-03) at 125/200/300/400/600 steps
# 0.31/0.50/0.62/0.69/0.44; the control 0.0625 throughout on both (before: 0.0625).
def _seed(base, with_memory, steps=300):
    rows = [(enc(memory(n, c)) if with_memory else [], enc(question(n, 0)))
            for n, c in NEW.items()]
    rng = np.random.default_rng(1)

    def batches():
        while True:
            pick = [rows[i] for i in rng.integers(0, len(rows), 16)]
            yield seeding.make_batch([m for m, _ in pick], [p for _, p in pick], bos_id=1,
                                     teacher_len=12, student_len=8)

    # seeding without growth (full fine-tune): see docs/LOG.md for the expert-slot variant
    state = create_train_state(fresh_copy(base), optax.adam(1e-3))
    state, _ = seeding.run_seeding(state, base, batches(), steps,
                                   mesh=make_mesh("fsdp=1", devices=jax.devices()[:1]),
                                   cfg=seeding.SeedingConfig(max_new_tokens=2), eos_id=2)
    return state.model()


def test_seeding_moves_context_knowledge_into_parameters(base):
    assert accuracy(base, 1, with_memory=True) >= 0.9  # the teacher's (open-book) level
    before = accuracy(base, 1, with_memory=False)
    after = accuracy(_seed(base, with_memory=True), 1, with_memory=False)
    control = accuracy(_seed(base, with_memory=False), 1, with_memory=False)
    assert after >= before + 0.4 and after >= control + 0.4, (before, after, control)
    assert control <= before + 0.15, (before, control)
