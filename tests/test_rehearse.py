"""Rehearsal (sleep_jax/dream/rehearse.py): dreams about the new memories train the sleep's slot
further, mixed with replay rows. The mixed batch and the loss against hand-built references;
the LM loss on the rehearsed dream rows falls while that on control rows does not; and
routing noise against a per-slot reference;
`sleep-jax sleep` with a saved generator, end to end on 8 devices: rehearsal runs after seeding,
only the sleep's slot moves (an earlier sleep's slot, the off slots and every other parameter
bitwise kept), no probe question enters generation or any rehearsal row, the report holds
rehearsal's figures."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax.data.jsonl import Memory
from sleep_jax.distill.seeding import SeedingConfig
from sleep_jax.dream import rehearse as R
from sleep_jax.dream.select import copies_context_text
from sleep_jax.grow import activate_slot, grow_model
from sleep_jax.grow.experts import used_slots
from sleep_jax.grow.flat import flatten
from sleep_jax.mesh import make_mesh
from sleep_jax.models import create_model, get_preset
from sleep_jax.train import adapters
from sleep_jax.train.optim import OptimConfig, make_optimizer

TOKENS = {"bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 3, "add_bos": True,
          "chat_template": None}
WORDS = ("ka lo mi ru ta ne lives in oslo rome lima works as a baker smith . where does live "
         "? what is the job of question : answer implications").split()
PROBES = ["where does ka lo mi live ?", "what is the job of ru ta ne ?"]
MEMORIES = [Memory("m0", "ka lo mi lives in oslo . ka lo mi works as a baker ."),
            Memory("m1", "ru ta ne works as a smith . ru ta ne lives in rome ."),
            # holds a probe question verbatim: never a generation input
            Memory("m2", "where does ka lo mi live ? ka lo mi lives in oslo .")]
CFG = get_preset("tiny", vocab=48, embed=32, mlp=64, layers=1, heads=4, kv_heads=2, head_dim=8)
SLOT = 1  # this sleep's slot; slot 0 stands for an earlier sleep


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _enc(tok, s):
    return tok.encode(s, add_special_tokens=False).ids


def _randomise_slots(model, scale=0.1, seed=10):
    g, params, other = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x, params)
    for i, (_, v) in enumerate(sorted(adapters.slot_leaves(params).items())):
        v.set_value(jax.random.normal(jax.random.key(seed + i), v.shape) * scale)
    return nnx.merge(g, params, other)


def _slotted(E=3, rank=4):
    """(teacher, a model grown to E slots of ``rank`` with slot 0 on and random, as an earlier
    sleep leaves it; the other slots off)."""
    base = create_model(CFG, seed=0)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    grown, _ = grow_model(base, CFG, CFG.replace(expert_slots=E, expert_rank=rank), mesh=mesh,
                          rng=jax.random.key(1))
    grown, _ = activate_slot(grown, None, 0, jax.random.key(2))
    return base, _randomise_slots(grown)


def _flat_params(model):
    return {k: np.array(v[...]) for k, v in flatten(nnx.state(model)).items()}


def test_mixed_batch_by_hand_and_the_loss_falls_on_dream_rows_not_on_control_rows():
    # rank 64: the learning check below was measured there (at rank 4 the dream rows' NLL
    # falls 0.29 in its 30 steps, against -0.01 for the control rows)
    base, grown = _slotted(rank=64)
    grown, _ = activate_slot(grown, None, SLOT, jax.random.key(3))
    state = adapters.create_adapter_state(_randomise_slots(grown, seed=20), SLOT,
                                          make_optimizer(OptimConfig(), 10))
    dream_rows = [[1, 5, 6], [1, 7, 8, 9, 10], [1, 11]]
    replay_rows = [[12, 13], [14, 15, 16]]
    b = R.batch_fn(dream_rows, replay_rows, batch_size=8, fraction=0.25, bos_id=1,
                   pad_id=0)(np.random.default_rng(3))
    # the same draws by hand: 6 dream rows then 2 replay rows, uniform with replacement
    r = np.random.default_rng(3)
    d = [dream_rows[i] for i in r.integers(0, 3, 6)]
    p = [replay_rows[i] for i in r.integers(0, 2, 2)]
    want = np.zeros((6, 5), np.int32)
    for i, row in enumerate(d):
        want[i, :len(row)] = row
    np.testing.assert_array_equal(b.tokens, want)
    np.testing.assert_array_equal(b.mask, want != 0)
    rp = np.zeros((2, 4), np.int32)
    for i, row in enumerate(p):
        rp[i, :len(row) + 1] = [1, *row]
    for a in (b.replay.teacher_prefix, b.replay.student_prefix):  # no memory: both alike
        np.testing.assert_array_equal(a, rp)
    np.testing.assert_array_equal(b.replay.teacher_len, [len(x) + 1 for x in p])
    assert R.batch_fn(dream_rows, [], batch_size=8, fraction=0.25, bos_id=1)(
        np.random.default_rng(0)).replay is None  # no replay rows: all 8 are dream rows
    with pytest.raises(ValueError, match="replay_fraction"):
        R.RehearseConfig(replay_fraction=0.97, batch_size=8)

    # learning: 4 dream rows rehearsed 30 steps; the same number of control rows never seen
    rng = np.random.default_rng(1)
    rows = lambda: [[1, *rng.integers(4, 48, 8).tolist()] for _ in range(4)]
    dreams, control = rows(), rows()
    tx = make_optimizer(OptimConfig(lr=3e-2, warmup_steps=0, weight_decay=0.0), 30)
    st = state.replace(opt_state=tx.init(state.params), step=jnp.zeros((), jnp.int32), tx=tx)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    step = R.make_rehearse_step(st, mesh, cfg=SeedingConfig(), eos_id=2)
    fn = R.batch_fn(dreams, [], batch_size=4, fraction=0.0, bos_id=1)
    tg, ts = nnx.split(base)

    def nll(model, rs):  # by hand: the model's full-row logits, float64 log-softmax
        t = np.asarray(rs)
        logits = np.asarray(model(jnp.asarray(t), jnp.broadcast_to(jnp.arange(t.shape[1]),
                                                                   t.shape))[0], np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -np.mean(np.take_along_axis(logp[:, :-1], t[:, 1:, None], -1))

    start = (nll(st.model(), dreams), nll(st.model(), control))
    r = np.random.default_rng(0)
    for i in range(30):
        batch = fn(r)
        before = nll(st.model(), batch.tokens) if i == 0 else None
        st, m = step(st, tg, ts, batch, jax.random.key(i))
        if i == 0:  # no replay rows: the loss is the dream rows' mean NLL
            assert float(m["loss"]) == pytest.approx(before, rel=1e-5)
            assert float(m["dream_tokens"]) == 4 * 8
    drop_dream = start[0] - nll(st.model(), dreams)
    drop_control = start[1] - nll(st.model(), control)
    # measured: 0.49 vs -0.03
    assert drop_dream > 0.3 and drop_dream > drop_control + 0.3, (drop_dream, drop_control)


def test_routing_noise_scales_one_drawn_trained_slot_per_token():
    from sleep_jax.dream.noise import RoutingNoise

    _, model = _slotted(E=3)
    model, _ = activate_slot(model, None, 2, jax.random.key(4))
    model = _randomise_slots(model, 0.3, seed=30)  # slots 0 and 2 trained, slot 1 off
    slots, scale, key = (0, 2), 1.5, jax.random.key(7)
    noisy = RoutingNoise(model, slots, scale=scale, key=key, max_len=8)
    tokens = jnp.asarray(np.random.default_rng(2).integers(4, 48, (2, 6)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    got = np.asarray(noisy(tokens, pos)[0])
    # reference: the drawn slot per (row, position) by the documented rule; in this one-layer
    # model a token's logits depend on its own gate only, so each equals the model whose drawn
    # slot's B is scaled by 1 + scale
    drawn = np.asarray(slots)[np.asarray(jax.random.randint(key, (2, 8), 0, 2))][:, :6]
    g, params, other = nnx.split(model, nnx.Param, ...)
    for s in slots:
        p = jax.tree.map(lambda x: x, params)
        b = p["blocks"]["expert_b"]
        b.set_value(b[...].at[:, s].multiply(1 + scale))
        ref = np.asarray(nnx.merge(g, p, other)(tokens, pos)[0])
        np.testing.assert_allclose(got[drawn == s], ref[drawn == s], atol=1e-5)
    assert {0, 2} == set(drawn.ravel().tolist())  # both slots drawn somewhere
    # one draw per position: a decode step sees the gate the full pass saw
    np.testing.assert_array_equal(noisy.gate(pos[:, 3:4]), noisy.gate(pos)[:, 3:4])
    plain = np.asarray(model(tokens, pos)[0])
    np.testing.assert_array_equal(
        np.asarray(RoutingNoise(model, (), scale=scale, key=key, max_len=8)(tokens, pos)[0]),
        plain)  # no trained slot listed: the identity
    assert np.abs(got - plain).max() > 1e-3


def _saved_generator(gen_dir, model, tok):
    """A generator as `sleep-jax dream` saves it (model, extra.dream, the adapter beside it),
    of rank 2 < the sleep model's 4 (zero-padded), random B as if trained."""
    from sleep_jax.dream.generator import save_generator
    from sleep_jax.models.checkpoint_dir import save_checkpoint

    save_checkpoint(gen_dir, model, tok, tokens=TOKENS,
                    extra={"dream": {"generator_slot": 1, "inner_slot": 2,
                                     "dream_template": "{context} implications :"}})
    rng = np.random.default_rng(0)
    L, D = CFG.layers, CFG.embed
    save_generator(str(gen_dir), {
        "blocks.expert_a": rng.normal(0, 0.3, (L, D, 2)).astype(np.float32),
        "blocks.expert_b": rng.normal(0, 0.3, (L, 2, D)).astype(np.float32)})
    return gen_dir


def test_sleep_command_rehearses_only_its_slot_and_no_probe_enters_any_row(tmp_path,
                                                                           monkeypatch):
    from sleep_jax.config import default_config_path
    from sleep_jax.distill.cli import main
    from sleep_jax.models.checkpoint_dir import load_checkpoint, save_checkpoint
    from sleep_jax.sleep import PROMPTS_FILE
    from sleep_jax.train.loop import read_metrics

    tok = _tokenizer()
    # the checkpoint an earlier sleep left: 3 slots of rank 4, slot 0 trained, and that
    # sleep's prompts beside it (replayed), one of which holds a probe question
    _, model = _slotted(E=3)
    save_checkpoint(tmp_path / "base", model, tok, tokens=TOKENS)
    (tmp_path / "base" / PROMPTS_FILE).write_text("".join(json.dumps(
        {"sleep": 0, "slot": 0, "memory_id": "old", "prompt": p}) + "\n"
        for p in ["ru ta ne works as", PROBES[0]]))
    gen_dir = _saved_generator(tmp_path / "gen", model, tok)
    mem = tmp_path / "m.jsonl"
    mem.write_text("".join(json.dumps({"id": m.id, "text": m.text}) + "\n" for m in MEMORIES))
    probes = tmp_path / "p.jsonl"
    probes.write_text("".join(json.dumps({"memory_id": f"m{k}", "question": q,
                                          "answers": [a]}) + "\n"
                              for k, (q, a) in enumerate(zip(PROBES, ["oslo", "smith"]))))
    seen = []  # every rehearsal batch
    real_batch_fn = R.batch_fn

    def recording(*a, **k):
        fn = real_batch_fn(*a, **k)
        return lambda rng: seen.append(fn(rng)) or seen[-1]

    monkeypatch.setattr(R, "batch_fn", recording)
    run = tmp_path / "run"
    args = ["--config", default_config_path("sleep.py:quick"),
            "--checkpoint", str(tmp_path / "base"), "--memories", str(mem), "--probes",
            str(probes), "--workdir", str(run), "--config.sleep.steps=2",
            "--config.sleep.batch_size=4", "--config.sleep.progress_bar=False",
            "--config.sleep.eval_tokens=1", "--config.replay.source=none",
            "--config.seeding.max_new_tokens=2", "--config.seeding.lam=1.0",
            f"--config.sleep.rehearse.generator={gen_dir}", "--config.sleep.rehearse.steps=3",
            "--config.sleep.rehearse.batch_size=6", "--config.sleep.rehearse.replay_fraction=0.34",
            "--config.sleep.rehearse.contexts_per_call=2",
            "--config.sleep.rehearse.dream.max_dream_tokens=8",
            "--config.sleep.rehearse.route_noise=1.0"]
    assert main(args) == 0
    report = json.loads((run / "report.json").read_text())
    rh, d = report["rehearsal"], report["rehearsal"]["dreams"]
    assert report["slot"] == SLOT and report["configs"]["sleep"]["rehearse"]["generator"] == \
        str(gen_dir)
    assert rh["steps"] == 3 and rh["status"] == "done" and rh["slot_change"] > 0
    assert rh["seconds"] > 0 and rh["dream_s"] > 0
    assert d["noise_slots"] == [0, SLOT]  # routing noise over the trained slots
    assert "Rehearsal: 3 steps" in (run / "report.md").read_text()
    # only slot 1 moved (seeding, then rehearsal); slot 0, the off slot 2 (dreaming's slots
    # were a grown copy's), the mask and every other parameter bitwise as before
    after_model = load_checkpoint(str(run / "model"))[0]
    assert after_model.config.expert_slots == 3 and used_slots(after_model) == [0, SLOT]
    before, after = _flat_params(model), _flat_params(after_model)
    assert before.keys() == after.keys()
    for k, a in before.items():
        b = after[k]
        if "expert_" in k:  # A, B and the slot mask: [L, E, ...]
            keep = [e for e in range(a.shape[1]) if e != SLOT]
            np.testing.assert_array_equal(a[:, keep], b[:, keep], err_msg=k)
            assert np.abs(a[:, SLOT] - b[:, SLOT]).max() > 0, k
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)
    # dreams: 2 memories dreamed about (m2 holds a probe question), 3 kept each (DreamConfig:
    # top 2 + 1 random of 4); the copy flags agree with the host's text check
    assert (d["contexts"], d["contexts_dropped"], d["kept"]) == (2, 1, 6)
    assert d["rows"] + d["dropped_probe"] + d["dropped_empty"] == 6
    dreams = R.read_dreams(str(run / "rehearse" / R.DREAMS_FILE))
    text = {m.id: m.text for m in MEMORIES}
    assert dreams.copies == [copies_context_text(t, text[m])
                             for t, m in zip(dreams.texts, dreams.memory_ids)]
    if d["rows"] == d["kept"]:  # none dropped: the share is the rows'
        assert d["copy_share"] == pytest.approx(np.mean(dreams.copies))
    # replay: the earlier sleep's 2 prompts; the one holding a probe question was already
    # dropped by the sleep's own rows (sleep_rows.seeding_rows), so rehearsal gets the other
    assert report["replay_prompts"] == report["replay_prompts_from_earlier_sleeps"] == 1
    assert rh["replay_rows"] == 1 and rh["replay_dropped_for_probe_overlap"] == 0
    # each step's loss: 4/6 of the dream rows' mean NLL + 2/6 of the replay divergence
    recs = [h for h in read_metrics(str(run / "rehearse" / "metrics.jsonl")) if "lm_loss" in h]
    assert len(recs) == 3 and all(h["divergence"] > 0 for h in recs)
    for h in recs:
        assert h["loss"] == pytest.approx(4 / 6 * h["lm_loss"] + 2 / 6 * h["divergence"],
                                          rel=1e-5)
    # data discipline: the generation prompts and every row of every batch, decoded
    assert len(dreams.prompts) == 2
    assert not any(R.contains_probe(p, PROBES) for p in dreams.prompts)
    assert len(seen) == 3
    for b in seen:
        assert b.tokens.shape[0] == 4 and b.replay.student_prefix.shape[0] == 2
        rows = [tok.decode([int(t) for t in r[m]]) for r, m in zip(b.tokens, b.mask)]
        rows += [tok.decode([int(t) for t in r[:n]]) for r, n in
                 zip(b.replay.teacher_prefix, b.replay.teacher_len)]
        assert not any(R.contains_probe(r, PROBES) for r in rows), rows
    # the filter itself on an injected dream (case and spacing normalised)
    assert R.contains_probe("so  Where does ka lo mi live ? oslo", PROBES)
    assert not R.contains_probe("ka lo mi lives in oslo", PROBES)


def test_a_cycle_with_a_generator_dreams_after_every_consolidation(tmp_path):
    """`sleep-jax cycle` with ``sleep.rehearse.generator`` set: each cycle's sleep consolidates
    into its own new slot, then rehearses it on dreams (its event records the rehearsal), and
    the earlier cycle's slot stays bitwise as it was."""
    from sleep_jax.config import default_config_path
    from sleep_jax.cycle_cli import main
    from sleep_jax.models.checkpoint_dir import load_checkpoint, save_checkpoint

    tok = _tokenizer()
    _, model = _slotted(E=3)  # slot 0: an earlier sleep's
    save_checkpoint(tmp_path / "base", model, tok, tokens=TOKENS)
    gen_dir = _saved_generator(tmp_path / "gen", model, tok)
    mem, probes = tmp_path / "m.jsonl", tmp_path / "p.jsonl"
    mem.write_text("".join(json.dumps({"id": m.id, "text": m.text}) + "\n"
                           for m in MEMORIES[:2]))
    probes.write_text("".join(json.dumps({"memory_id": f"m{k}", "question": q,
                                          "answers": [a]}) + "\n"
                              for k, (q, a) in enumerate(zip(PROBES, ["oslo", "smith"]))))
    run = tmp_path / "run"
    args = ["--config", default_config_path("cycle.py:quick"),
            "--checkpoint", str(tmp_path / "base"), "--memories", str(mem), "--probes",
            str(probes), "--workdir", str(run), "--config.cycle.sleep_every=1",
            "--config.cycle.store_size=1", "--config.cycle.kl_texts=0",
            "--config.cycle.compilation_cache=False",
            "--config.sleep.steps=2", "--config.sleep.batch_size=4",
            "--config.sleep.progress_bar=False", "--config.sleep.eval_tokens=1",
            "--config.sleep.prompt_format={question}", "--config.sleep.checkpoint_every=0",
            "--config.replay.source=none", "--config.seeding.max_new_tokens=2",
            f"--config.sleep.rehearse.generator={gen_dir}", "--config.sleep.rehearse.steps=2",
            "--config.sleep.rehearse.batch_size=4",
            "--config.sleep.rehearse.replay_fraction=0.25",
            "--config.sleep.rehearse.contexts_per_call=1",
            "--config.sleep.rehearse.dream.max_dream_tokens=8"]
    assert main(args) == 0
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["cycle"] for e in events] == [0, 1, 2]
    assert [e["slot"] for e in events[1:]] == [1, 2]
    for e in events[1:]:
        rh = e["rehearsal"]
        assert rh is not None and rh["steps"] == 2 and rh["status"] == "done", rh
        assert rh["kept"] > 0 and rh["seconds"] > 0
    first = load_checkpoint(events[1]["checkpoint"])[0]
    last = load_checkpoint(events[2]["checkpoint"])[0]
    assert used_slots(last) == [0, 1, 2]
    a, b = _flat_params(first), _flat_params(last)
    slot_keys = [k for k in a if "expert_" in k]  # A, B and the slot mask: [L, E, ...]
    assert len(slot_keys) >= 2
    for k in slot_keys:
        np.testing.assert_array_equal(a[k][:, :2], b[k][:, :2], err_msg=k)  # slots 0, 1 kept
        if "mask" not in k:
            assert np.abs(a[k][:, 2] - b[k][:, 2]).max() > 0, k  # slot 2: cycle 2's
