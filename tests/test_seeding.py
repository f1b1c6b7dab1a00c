"""Knowledge Seeding: exactness right after growth, masked updates, prompt hygiene, CLI errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sleep_jax.distill import align, seeding
from sleep_jax.distill.cli import drop_probe_overlap, memory_prompts
from sleep_jax.distill.cli import main as sleep_main
from sleep_jax.grow import activate_slot, grow_model
from sleep_jax.mesh import make_mesh
from sleep_jax.models import create_model, get_preset
from sleep_jax.train.state import create_train_state, fresh_copy

CFG = get_preset("tiny", vocab=64, embed=32, mlp=64, layers=2, heads=4, kv_heads=2,
                 head_dim=8)


@pytest.fixture(scope="module")
def grown():
    """(base, grown student with one active expert slot, trainable mask)."""
    base = create_model(CFG, seed=0)
    # sharper than the 0.02-std init, so that context changes the distributions visibly
    graphdef, state = nnx.split(base)
    base = nnx.merge(graphdef, jax.tree.map(lambda x: x * 6.0, state))
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    dst = CFG.replace(expert_slots=1, expert_rank=4)
    student, _ = grow_model(base, CFG, dst, mesh=mesh, rng=jax.random.key(1))
    student, mask = activate_slot(student, None, 0, jax.random.key(2))
    return base, student, mask


def _rows(rng, n, lo, hi):
    return [list(rng.integers(4, CFG.vocab, int(rng.integers(lo, hi)))) for _ in range(n)]


@pytest.mark.parametrize("name, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1),
                                        ("jsd", 0.5), ("jsd", 0.9)])
def test_divergence_zero_after_growth_only_with_memory(grown, name, beta):
    base, student, _ = grown
    rng = np.random.default_rng(0)
    mem, prompts, comps = _rows(rng, 4, 3, 9), _rows(rng, 4, 2, 6), _rows(rng, 4, 1, 5)
    # student also reads the memory: the grown model is an exact copy, so D = 0
    same = align.build_aligned_batch(mem, prompts, comps, bos_id=1, student_prefixes=[
        [1] + m + p for m, p in zip(mem, prompts)])
    # student without the memory (the seeding setting): D > 0
    priv = align.build_aligned_batch(mem, prompts, comps, bos_id=1)

    def div(b):
        t = base(jnp.asarray(b.teacher.tokens), jnp.asarray(b.teacher.positions),
                 mask=jnp.asarray(b.teacher.valid))[0]
        s = student(jnp.asarray(b.student.tokens), jnp.asarray(b.student.positions),
                    mask=jnp.asarray(b.student.valid))[0]
        total, count = align.completion_divergence(name, s, t, b, beta=beta)
        return float(total / count)

    assert abs(div(same)) < 1e-5
    assert div(priv) > 1e-3


def test_seeding_step_moves_only_new_parameters(grown):
    base, student, mask = grown
    state = create_train_state(fresh_copy(student), optax.adamw(1e-2, weight_decay=0.1))
    before = jax.tree.map(np.asarray, state.params)
    rng = np.random.default_rng(1)
    batch = seeding.make_batch(_rows(rng, 8, 3, 9), _rows(rng, 8, 2, 6), bos_id=1,
                               teacher_len=16, student_len=8)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    step = seeding.make_seeding_step(seeding.SeedingConfig(max_new_tokens=3), state, mesh,
                                     eos_id=2)
    tg, ts = nnx.split(base)
    jmask = jax.tree.map(jnp.asarray, mask)
    for i in range(3):
        state, m = step(state, tg, ts, batch, jax.random.key(i), jmask)
    assert step.jitted._cache_size() == 1  # no recompilation across steps
    assert float(m["tokens"]) > 0
    after = jax.tree.map(np.asarray, state.params)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(before))
    for path, new in jax.tree_util.tree_leaves_with_path(after):
        old = flat_b[path]
        key = jax.tree_util.keystr(path)
        if "expert_a" in key or "expert_b" in key:
            assert not np.array_equal(old, new), f"{key} should train"
        else:
            assert np.array_equal(old, new), f"{key} changed but is frozen"


def test_seeding_step_skips_a_nonfinite_update(grown):
    """A NaN in the trained slot makes the loss NaN: the step reports skipped=1 and leaves
    params and optimizer state bitwise unchanged (train.finite.skip_if_nonfinite)."""
    base, student, mask = grown
    state = create_train_state(fresh_copy(student), optax.adamw(1e-2))
    poisoned = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[(0,) * x.ndim].set(jnp.nan)
        if "expert_b" in jax.tree_util.keystr(p) else x, state.params)
    state = state.replace(params=poisoned)
    rng = np.random.default_rng(2)
    batch = seeding.make_batch(_rows(rng, 4, 3, 9), _rows(rng, 4, 2, 6), bos_id=1,
                               teacher_len=16, student_len=8)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    cfg = seeding.SeedingConfig(max_new_tokens=3, lam=0.0)  # teacher samples: finite tokens
    step = seeding.make_seeding_step(cfg, state, mesh, eos_id=2)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    tg, ts = nnx.split(base)
    state, m = step(state, tg, ts, batch, jax.random.key(0), jax.tree.map(jnp.asarray, mask))
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_seeding_step_on_an_adapter_state_equals_the_masked_full_model_step(grown):
    """The sleep pipeline's path (only the slot's adapter tree trains, ``train.adapters``)
    against the masked full-model path: same divergences, same trained slot."""
    from sleep_jax.train.adapters import create_adapter_state

    base, student, mask = grown
    tx = optax.adamw(1e-2, weight_decay=0.1)
    rng = np.random.default_rng(1)
    batch = seeding.make_batch(_rows(rng, 8, 3, 9), _rows(rng, 8, 2, 6), bos_id=1,
                               teacher_len=16, student_len=8)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    scfg = seeding.SeedingConfig(max_new_tokens=3)
    tg, ts = nnx.split(base)
    full = create_train_state(fresh_copy(student), tx)
    adapter = create_adapter_state(student, 0, tx)
    step_f = seeding.make_seeding_step(scfg, full, mesh, eos_id=2)
    step_a = seeding.make_seeding_step(scfg, adapter, mesh, eos_id=2)
    jmask = jax.tree.map(jnp.asarray, mask)
    for i in range(3):
        full, mf = step_f(full, tg, ts, batch, jax.random.key(i), jmask)
        adapter, ma = step_a(adapter, tg, ts, batch, jax.random.key(i), None)
        np.testing.assert_allclose(float(ma["divergence"]), float(mf["divergence"]),
                                   rtol=1e-4)
    assert step_a.jitted._cache_size() == 1
    a = nnx.state(adapter.model(), nnx.Param)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                            jax.tree.leaves(full.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_self_teacher_is_the_live_weights_each_step(grown):
    """OPSD (SeedingConfig.teacher="self"): every step equals a frozen-teacher step whose
    teacher is the student's weights at that step (an independent route: the teacher passed
    in by hand); a teacher frozen at the student's first weights gives a different run (the
    control; the hand-fed route's program, so no third compile)."""
    base, student, _ = grown
    # three equal states: each step donates its input state
    tx = optax.adam(1e-2)  # one tx: it is static metadata of the state the steps were built for
    a, b, c = (create_train_state(fresh_copy(student), tx) for _ in range(3))
    rng = np.random.default_rng(3)
    batch = seeding.make_batch(_rows(rng, 8, 3, 9), _rows(rng, 8, 2, 6), bos_id=1,
                               teacher_len=16, student_len=8)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    self_step = seeding.make_seeding_step(seeding.SeedingConfig(max_new_tokens=3,
                                                                teacher="self"),
                                          a, mesh, eos_id=2)
    frozen_step = seeding.make_seeding_step(seeding.SeedingConfig(max_new_tokens=3), b,
                                            mesh, eos_id=2)
    tg, ts = nnx.split(base)
    first_g, first_s = nnx.split(fresh_copy(c.model()))  # the control's teacher, never updated
    for i in range(3):
        live_g, live_s = nnx.split(fresh_copy(b.model()))  # the student's weights now
        a, ma = self_step(a, tg, ts, batch, jax.random.key(i), None)
        b, mb = frozen_step(b, live_g, live_s, batch, jax.random.key(i), None)
        c, mc = frozen_step(c, first_g, first_s, batch, jax.random.key(i), None)
        np.testing.assert_allclose(float(ma["divergence"]), float(mb["divergence"]),
                                   rtol=1e-5, atol=1e-7)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    assert float(mc["divergence"]) != pytest.approx(float(ma["divergence"]), rel=1e-3)
    with pytest.raises(ValueError, match="teacher='teach'"):
        seeding.SeedingConfig(teacher="teach")


def test_seeding_prompts_are_disjoint_from_evaluation():
    from sleep_jax.data import world as worldlib
    from sleep_jax.data.tokenizers import special_ids, word_level_tokenizer
    from sleep_jax.demo import DemoConfig
    from sleep_jax.demo_run import Ctx, seeding_rows

    w = worldlib.make_world(3, n_old=20, n_new=5)
    tok = word_level_tokenizer(w.vocabulary_corpus())
    ctx = Ctx(DemoConfig(), w, tok, special_ids(tok), CFG, None)
    prompts = {tok.decode(p) for split, mem in (("new", True), ("old", False))
               for _, p in seeding_rows(ctx, split, mem)}
    evaluation = {q.question for split in ("new", "old") for wd in ("near", "far")
                  for q in w.qa(split, wd)}
    assert prompts and evaluation
    assert not any(q in p for q in evaluation for p in prompts)
    # the negative control of this check: a TRAIN question does appear among the prompts
    assert any(w.qa("new", "train")[0].question in p for p in prompts)


def test_memory_prompts_and_probe_overlap():
    assert memory_prompts("ab cd ef. gh ij kl mn!") == ["ab cd", "gh ij", "gh ij kl"]
    keep, dropped = drop_probe_overlap(["where does x live", "x was"], ["Where does X live"])
    assert keep == ["x was"] and dropped == 1


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sleep_cli_bad_input_names_the_problem(tmp_path, capsys):
    mem = _write(tmp_path / "m.jsonl", [{"id": "a", "text": "x lives in oslo."}])
    probes = _write(tmp_path / "p.jsonl", [{"memory_id": "zz", "question": "where?",
                                            "answers": ["oslo"]}])
    args = ["--checkpoint", str(tmp_path / "nope"), "--memories", mem, "--probes", probes,
            "--workdir", str(tmp_path / "w")]
    assert sleep_main(args) == 2
    assert "'zz'" in capsys.readouterr().err  # the unknown memory id is named
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "ok"}\n{"id": "b"\n')
    args[args.index(mem)] = str(bad)
    assert sleep_main(args) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err
    good_probes = _write(tmp_path / "p2.jsonl", [{"memory_id": "a", "question": "where?",
                                                  "answers": ["oslo"]}])
    assert sleep_main(["--checkpoint", str(tmp_path / "nope"), "--memories", mem, "--probes",
                       good_probes, "--workdir", str(tmp_path / "w")]) == 2
    assert "nope" in capsys.readouterr().err


def test_imitation_rollout_cuts_the_teacher_text(grown):
    """Student prompt = prompt + y[:c] and target = y[c:], with y the teacher's own text."""
    from sleep_jax.distill.imitation import imitation_rollout
    from sleep_jax.sampling import generate

    base, student, _ = grown
    rng = np.random.default_rng(2)
    b = seeding.make_batch(_rows(rng, 6, 3, 9), _rows(rng, 6, 2, 6), bos_id=1, teacher_len=16,
                           student_len=8)
    scfg = seeding.SeedingConfig(max_new_tokens=3, imitation_group=2, imitation_text_tokens=5)
    key = jax.random.key(7)
    roll, target, tmask = imitation_rollout(
        student, base, b.teacher_prefix, b.teacher_len, b.student_prefix, b.student_len, key,
        rl_cfg=scfg.rl_config(), text_tokens=5, eos_id=None)
    y = generate(base, b.teacher_prefix, b.teacher_len, jax.random.split(key, 3)[0],
                 max_new_tokens=5, eos_id=None)
    cuts = []
    for row in range(12):
        r = row // 2
        sl, pl = int(b.student_len[r]), int(roll.prompt_len[row])
        np.testing.assert_array_equal(roll.prompt[row, :sl], b.student_prefix[r, :sl])
        rebuilt = list(roll.prompt[row, sl:pl]) + list(np.asarray(target[row])[tmask[row]])
        np.testing.assert_array_equal(rebuilt, np.asarray(y.tokens[r]))
        cuts.append(pl - sl)
    assert all(0 <= c <= 4 for c in cuts) and len(set(cuts)) > 1  # random cut, >= 1 left


def test_seeding_with_imitation_runs_and_moves_only_new_parameters(grown):
    base, student, mask = grown
    state = create_train_state(fresh_copy(student), optax.adam(1e-2))
    before = jax.tree.map(np.asarray, state.params)
    rng = np.random.default_rng(3)
    rows = (_rows(rng, 4, 3, 9), _rows(rng, 4, 2, 6))
    batches = iter(lambda: seeding.make_batch(*rows, bos_id=1, teacher_len=16, student_len=8),
                   None)
    scfg = seeding.SeedingConfig(max_new_tokens=3, alpha=0.5, gamma=0.0, z0=1.0,
                                 imitation_group=2, imitation_text_tokens=4)
    with pytest.raises(ValueError, match="decode="):
        seeding.run_seeding(state, base, batches, 1, mesh=make_mesh(
            "fsdp=1", devices=jax.devices()[:1]), cfg=scfg, eos_id=None, mask=mask)
    decode = lambda ids: " ".join(f"w{i}" for i in ids)
    state, times = seeding.run_seeding(
        state, base, batches, 2, mesh=make_mesh("fsdp=1", devices=jax.devices()[:1]), cfg=scfg,
        eos_id=None, mask=mask, decode=decode)
    after = jax.tree.map(np.asarray, state.params)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
    flat_m = jax.tree.leaves(jax.tree.map(lambda m: bool(np.any(np.asarray(m))), mask))
    assert jax.tree.leaves(moved) and any(jax.tree.leaves(moved))
    for mv, trainable in zip(jax.tree.leaves(moved), flat_m):
        assert trainable or not mv
    assert len(times) == 2


def test_expert_costs_are_added_to_the_loss_and_reported_per_row_kind():
    """With a router, loss(gate_l1=c, expert_l1=e) - loss(0, 0) = c * mean gate + e * mean
    expert output RMS over the student rows (same rng, same state), each reported separately
    for memory and replay rows."""
    base = create_model(CFG, seed=0)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    dst = CFG.replace(expert_slots=1, expert_rank=4, expert_router=True)
    student, _ = grow_model(base, CFG, dst, mesh=mesh, rng=jax.random.key(1))
    student, mask = activate_slot(student, None, 0, jax.random.key(2))
    rng = np.random.default_rng(3)
    mems = _rows(rng, 4, 3, 9) + [[]] * 4  # the last four rows are replay rows
    batch = seeding.make_batch(mems, _rows(rng, 8, 2, 6), bos_id=1, teacher_len=16,
                               student_len=8)
    tg, ts = nnx.split(base)
    out = {}
    student.blocks.expert_b[...] = 0.1 * jax.random.normal(jax.random.key(4),
                                                           student.blocks.expert_b.shape)
    for c in (0.0, 0.5):
        state = create_train_state(fresh_copy(student), optax.sgd(0.0))
        scfg = seeding.SeedingConfig(max_new_tokens=3, gate_l1=c, expert_l1=2 * c)
        step = seeding.make_seeding_step(scfg, state, mesh, eos_id=2)
        _, out[c] = step(state, tg, ts, batch, jax.random.key(0),
                         jax.tree.map(jnp.asarray, mask))
    m0, m1 = out[0.0], out[0.5]
    mean_gate = 0.5 * (float(m1["gate_memory_rows"]) + float(m1["gate_replay_rows"]))
    mean_rms = 0.5 * (float(m1["expert_rms_memory_rows"]) + float(m1["expert_rms_replay_rows"]))
    assert 0.0 < mean_gate < 1.0 and mean_rms > 1e-4
    assert float(m1["divergence"]) == pytest.approx(float(m0["divergence"]), rel=1e-6)
    assert float(m1["loss"]) - float(m0["loss"]) == pytest.approx(
        0.5 * mean_gate + 1.0 * mean_rms, rel=1e-4)
    for name in ("gate_l1", "expert_l1"):
        with pytest.raises(ValueError, match=name):
            seeding.SeedingConfig(**{name: -1.0})
