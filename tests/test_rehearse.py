"""Rehearsal (sleep_jax/dream/rehearse.py): dreams about the new memories train the sleep's slot
further, mixed with replay rows. Only that slot moves (other slots and every other parameter
bitwise kept); the mixed batch and the loss against hand-built references; the LM loss on the
rehearsed dream rows falls while that on control rows does not; no probe question enters
generation or rehearsal rows; `sleep-jax sleep` with a generator runs rehearsal after seeding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax.data.jsonl import Memory
from sleep_jax.distill.seeding import SeedingConfig
from sleep_jax.dream import rehearse as R
from sleep_jax.dream.config import DreamConfig
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


@pytest.fixture(scope="module")
def world():
    """(teacher, consolidated AdapterState of slot 1 of 3 (slot 0 an earlier sleep's), the
    generator (rank 2 < the model's 4: padded), tokenizer)."""
    tok = _tokenizer()
    base = create_model(CFG, seed=0)
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    grown, _ = grow_model(base, CFG, CFG.replace(expert_slots=3, expert_rank=4), mesh=mesh,
                          rng=jax.random.key(1))
    grown, _ = activate_slot(grown, None, 0, jax.random.key(2))
    grown, _ = activate_slot(grown, None, SLOT, jax.random.key(3))
    grown = _randomise_slots(grown)  # slot 2 is off: its values never count
    state = adapters.create_adapter_state(grown, SLOT, make_optimizer(OptimConfig(), 10))
    rng = np.random.default_rng(0)
    L, D = CFG.layers, CFG.embed
    adapter = {"blocks.expert_a": rng.normal(0, 0.3, (L, D, 2)).astype(np.float32),
               "blocks.expert_b": rng.normal(0, 0.3, (L, 2, D)).astype(np.float32)}
    gen = (CFG, adapter, {"dream_template": "{context} implications :"}, tok.get_vocab())
    return base, state, gen, tok


def _flat_params(model):
    return {k: np.array(v[...]) for k, v in flatten(nnx.state(model)).items()}


def test_rehearsal_trains_only_its_slot_and_no_probe_enters_any_row(world, monkeypatch):
    base, state, gen, tok = world
    before = _flat_params(state.model())
    replay = [_enc(tok, "ka lo mi lives in"), _enc(tok, "ru ta ne works as"),
              _enc(tok, PROBES[0])]  # the last holds a probe question: dropped
    seen = []
    real_batch_fn = R.batch_fn

    def recording(*a, **k):
        fn = real_batch_fn(*a, **k)
        return lambda rng: seen.append(fn(rng)) or seen[-1]

    monkeypatch.setattr(R, "batch_fn", recording)
    cfg = R.RehearseConfig(generator="unused", steps=3, batch_size=6, replay_fraction=0.34,
                           contexts_per_call=2,
                           dream=DreamConfig(dreams=4, keep_top=2, keep_random=1,
                                             max_dream_tokens=8))
    state = jax.tree.map(jnp.copy, state)  # rehearse donates the state it trains
    out = R.rehearse(state, base, tok, MEMORIES, replay, cfg=cfg,
                     seeding_cfg=SeedingConfig(max_new_tokens=2), tokens=TOKENS,
                     probe_questions=PROBES, generator=gen, progress_bar=False)
    after = _flat_params(out.state.model())
    # only slot SLOT's entries moved; slot 0, the off slot 2, the mask and the rest bitwise
    moved = []
    for k, a in before.items():
        b = after[k]
        if "expert_a" in k or "expert_b" in k:
            keep = [e for e in range(a.shape[1]) if e != SLOT]
            np.testing.assert_array_equal(a[:, keep], b[:, keep], err_msg=k)
            moved.append(np.abs(a[:, SLOT] - b[:, SLOT]).max())
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)
    assert len(moved) == 2 and min(moved) > 0
    assert used_slots(out.state.model()) == [0, SLOT]  # dreaming's slots were a copy's
    rep = out.report
    assert rep["steps"] == 3 and rep["status"] == "done" and rep["slot_change"] > 0
    d = out.dreams
    # 2 memories dreamed about (m2 holds a probe), 2 calls x 3 kept; copy flags agree with the
    # host's text check, the share is theirs
    assert (d.contexts, d.contexts_dropped, d.kept) == (2, 1, 6)
    assert len(d.rows) + d.dropped_probe + d.dropped_empty == d.kept
    text = {m.id: m.text for m in MEMORIES}
    assert d.copies == [copies_context_text(t, text[m]) for t, m in zip(d.texts, d.memory_ids)]
    assert 0.0 <= d.copy_share <= 1.0
    # each step's loss: 4/6 of the dream rows' mean NLL + 2/6 of the replay divergence
    recs = [h for h in out.history if "lm_loss" in h]
    assert len(recs) == 3 and all(h["divergence"] > 0 for h in recs)
    for h in recs:
        assert h["loss"] == pytest.approx(4 / 6 * h["lm_loss"] + 2 / 6 * h["divergence"],
                                          rel=1e-5)
    assert rep["replay_rows"] == 2 and rep["replay_dropped_for_probe_overlap"] == 1
    # data discipline: the generation prompts and every row of every batch, decoded
    assert len(d.prompts) == 2 and not any(R.contains_probe(p, PROBES) for p in d.prompts)
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


def test_mixed_batch_by_hand_and_the_loss_falls_on_dream_rows_not_on_control_rows(world):
    base, state, _, _ = world
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
    st = jax.tree.map(jnp.copy, state)  # the step donates the state
    st = st.replace(opt_state=tx.init(st.params), step=jnp.zeros((), jnp.int32), tx=tx)
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


def test_sleep_command_rehearses_after_seeding_with_a_saved_generator(tmp_path, capsys):
    from sleep_jax.distill.cli import main
    from sleep_jax.dream import cli as dream_cli
    from sleep_jax.models.checkpoint_dir import save_checkpoint

    tok = _tokenizer()
    base = create_model(CFG, seed=0)
    save_checkpoint(tmp_path / "base", base, tok, tokens=TOKENS)
    # a generator as `sleep-jax dream` saves it: the grown model with both slots on, and an
    # adapter (random B here, as if trained) of rank 2 beside it
    run = dream_cli.DreamRunConfig(slots=2, rank=2)
    model, g, i = dream_cli.prepare_model(base, run, jax.random.key(0))
    gen_dir = tmp_path / "gen"
    save_checkpoint(gen_dir, model, tok, tokens=TOKENS,
                    extra={"dream": {"generator_slot": g, "inner_slot": i,
                                     "dream_template": "{context} implications :"}})
    adapter = adapters.extract_adapter(nnx.state(_randomise_slots(model, 0.3), nnx.Param), g)
    dream_cli.save_generator(str(gen_dir), adapter)
    mem = tmp_path / "m.jsonl"
    mem.write_text("".join(json.dumps({"id": m.id, "text": m.text}) + "\n"
                           for m in MEMORIES[:2]))
    probes = tmp_path / "p.jsonl"
    probes.write_text("".join(json.dumps({"memory_id": f"m{k}", "question": q,
                                          "answers": [a]}) + "\n"
                              for k, (q, a) in enumerate(zip(PROBES, ["oslo", "smith"]))))
    args = ["--config", dream_cli.default_config_path("sleep.py:quick"), "--checkpoint",
            str(tmp_path / "base"), "--memories", str(mem), "--probes", str(probes),
            "--workdir", str(tmp_path / "run"), "--config.sleep.steps=2",
            "--config.sleep.batch_size=4", "--config.sleep.rank=4",
            "--config.sleep.progress_bar=False", "--config.sleep.eval_tokens=2",
            "--config.replay.source=none", "--config.seeding.max_new_tokens=2",
            f"--config.sleep.rehearse.generator={gen_dir}", "--config.sleep.rehearse.steps=2",
            "--config.sleep.rehearse.batch_size=4", "--config.sleep.rehearse.contexts_per_call=2",
            "--config.sleep.rehearse.dream.dreams=2", "--config.sleep.rehearse.dream.keep_top=1",
            "--config.sleep.rehearse.dream.keep_random=0",
            "--config.sleep.rehearse.dream.max_dream_tokens=6"]
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rh = report["rehearsal"]
    assert rh["steps"] == 2 and rh["status"] == "done" and rh["slot_change"] > 0
    assert rh["dreams"]["kept"] == 2 and 0 <= rh["dreams"]["copy_share"] <= 1
    assert rh["seconds"] > 0 and rh["dream_s"] > 0
    assert rh["replay_rows"] == 0  # the sleep replays nothing here (the mix: test above)
    assert (tmp_path / "run" / "rehearse" / R.DREAMS_FILE).exists()
    assert "Rehearsal: 2 steps" in (tmp_path / "run" / "report.md").read_text()
    assert report["configs"]["sleep"]["rehearse"]["generator"] == str(gen_dir)
