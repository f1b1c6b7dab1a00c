"""The sleep pipeline (sleep_jax/sleep.py): each sleep trains the next free expert slot and
leaves earlier slots bitwise alone; all slots used is a clear error; two sleeps on disjoint
memories keep the first one's knowledge (replay of its prompts); a killed sleep resumes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from sleep_jax.data.jsonl import Memory, Probe
from sleep_jax.distill.seeding import SeedingConfig
from sleep_jax.grow.experts import SlotsExhausted, used_slots
from sleep_jax.grow.flat import flatten
from sleep_jax.models import create_model
from sleep_jax.models.checkpoint_dir import load_checkpoint, save_checkpoint
from sleep_jax.sleep import (
    PROMPTS_FILE,
    ReplayConfig,
    SleepConfig,
    read_sleep_prompts,
    sleep,
    sleep_checkpoint,
)
from sleep_jax.train.optim import OptimConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_seeding_learning import CFG, ID, NEW, accuracy, base, memory, question  # noqa: E402,F401,I001

TOKENS = {"bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 0, "add_bos": True,
          "chat_template": None}
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sleep_worker.py")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    # <unk> in the base's one spare id (79): the SFT objective's data pipeline looks up all
    # four specials
    tok = Tokenizer(models.WordLevel(vocab={**ID, "<unk>": len(ID)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def facts(names):
    mems = [Memory(f"n{n}", memory(n, NEW[n])) for n in names]
    # seeding: wording 0 and a continuation of the memory's own sentence (never wording 1)
    prompts = {f"n{n}": [question(n, 0), f"n{n} lives in"] for n in names}
    probes = [Probe(f"n{n}", question(n, 1), (f"c{NEW[n]}",)) for n in names]  # held out
    return mems, prompts, probes


def slot_values(model, slot):
    p = nnx.state(model, nnx.Param)["blocks"]
    return {k: np.asarray(p[k][...])[:, slot] for k in ("expert_a", "expert_b")}


def test_each_sleep_takes_the_next_free_slot_and_leaves_earlier_ones(tmp_path):
    tok = tokenizer()
    save_checkpoint(tmp_path / "base", create_model(CFG, seed=0), tok, tokens=TOKENS)
    cfg = SleepConfig(steps=3, batch_size=4, slots=2, rank=4, prompts="memory",
                      checkpoint_every=0, progress_bar=False, eval_tokens=1,
                      prompt_format="{question}")
    scfg = SeedingConfig(max_new_tokens=1)
    replay = ReplayConfig(fraction=0.5, source="none")
    ckpt, slots, models = str(tmp_path / "base"), [], []
    for k, names in enumerate(([40, 41], [42, 43])):
        mems, _, probes = facts(names)
        base_k, tok_k, meta = load_checkpoint(ckpt)
        report = sleep_checkpoint(ckpt, base_k, tok_k, meta, mems, probes,
                                  workdir=str(tmp_path / f"sleep{k}"), cfg=cfg,
                                  seeding_cfg=scfg, replay=replay)
        ckpt = str(tmp_path / f"sleep{k}" / "model")
        slots.append(report["slot"])
        models.append(load_checkpoint(ckpt)[0])
        # the earlier sleep's prompts are replayed (read from the checkpoint)
        earlier = len(read_sleep_prompts(tmp_path / "sleep0" / "model")) if k else 0
        assert report["replay_prompts_from_earlier_sleeps"] == earlier
        assert report["replay_prompts"] == earlier and (earlier > 0 or k == 0)
    assert slots == [0, 1]
    assert used_slots(models[1]) == [0, 1]
    first, second = slot_values(models[0], 0), slot_values(models[1], 0)
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])  # slot 0 bitwise unchanged
    assert np.abs(slot_values(models[1], 1)["expert_b"]).max() > 0  # slot 1 trained
    recs = read_sleep_prompts(ckpt)
    assert {r["sleep"] for r in recs} == {0, 1} and {r["slot"] for r in recs} == {0, 1}
    assert os.path.exists(os.path.join(ckpt, PROMPTS_FILE))
    # every slot is used now: a third sleep is refused before any work
    mems, _, probes = facts([44])
    base2, tok2, meta2 = load_checkpoint(ckpt)
    with pytest.raises(SlotsExhausted, match="slot"):
        sleep_checkpoint(ckpt, base2, tok2, meta2, mems, probes,
                         workdir=str(tmp_path / "sleep2"), cfg=cfg, seeding_cfg=scfg,
                         replay=replay)


def _closed(model, names):
    """Closed-book accuracy on the held-out wording (1) of ``names``."""
    sub = {n: NEW[n] for n in names}
    import test_seeding_learning as tsl

    saved = dict(tsl.NEW)
    tsl.NEW.clear()
    tsl.NEW.update(sub)
    try:
        return accuracy(model, 1, with_memory=False)
    finally:
        tsl.NEW.clear()
        tsl.NEW.update(saved)


# The learning base cannot recall through a position-wise expert slot (docs/LOG.md 2026-11-24):
# these two sleeps fine-tune the whole model. Replay keeps what the model knew before each
# sleep: its wake skill (reading comprehension on other names, the "wake" replay prompts; without
# them the first sleep's fine-tune loses it and the second sleep's teacher cannot read set 2)
# and the first sleep's seeding prompts (replayed in the second).
# 500 steps: at 300 the margin depended on the host (2026-12-02, a 2-core AMD EPYC: set 2 at
# 0.25 of 8 facts; 500 steps: set 1 0.875 -> 1.000, set 2 1.000). Keeping the first set allows
# one fact of 8 either way: another 2-core AMD EPYC host (eleventh session) gave set 1
# 1.000 -> 0.875, set 2 1.000, where the last session's host gained that fact.
TWO_SLEEPS = dict(steps=500, batch_size=16, expert=False, prompts="given", progress_bar=False,
                  checkpoint_every=0,
                  full_optim=OptimConfig(lr=3e-3, warmup_steps=10, weight_decay=0.0))


def wake_prompts():
    rng = np.random.default_rng(5)
    return [f"{memory(n, int(rng.integers(0, 10)))} {question(n, int(rng.integers(0, 2)))}"
            for n in range(40)]  # names 0..39: never a NEW fact


def test_two_sleeps_learn_both_memory_sets_and_keep_the_first(base):  # noqa: F811
    tok = tokenizer()
    set1, set2 = sorted(NEW)[:8], sorted(NEW)[8:]
    cfg = SleepConfig(**TWO_SLEEPS)
    scfg = SeedingConfig(max_new_tokens=2)
    replay = ReplayConfig(fraction=0.5, source="prompts")
    m1, p1, _ = facts(set1)
    r1 = sleep(base, tok, m1, tokens=TOKENS, cfg=cfg, seeding_cfg=scfg, replay=replay,
               prompts=p1, replay_prompts=wake_prompts())
    a1 = _closed(r1.model, set1)
    m2, p2, _ = facts(set2)
    r2 = sleep(r1.model, tok, m2, tokens=TOKENS, cfg=cfg, seeding_cfg=scfg, replay=replay,
               prompts=p2, replay_prompts=wake_prompts(), earlier=r1.rows.records)
    assert r2.rows.earlier == len(r1.rows.records) > 0
    b1, b2 = _closed(r2.model, set1), _closed(r2.model, set2)
    print(f"two sleeps: set 1 {a1:.3f} -> {b1:.3f}, set 2 {b2:.3f}")
    assert a1 >= 0.5, a1
    assert b2 >= 0.5, b2
    assert b1 >= a1 - 1 / 8 - 1e-6, (a1, b1)  # at most one of the 8 facts lost


def _worker(workdir, steps, kill_at=0):
    # one persistent compilation cache for the three runs (tmp_path's parent: this test's)
    cmd = [sys.executable, WORKER, str(workdir), str(steps), "--cache",
           str(workdir.parent / "jax_cache")]
    if kill_at:
        cmd += ["--kill-at", str(kill_at)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_a_killed_sleep_resumes_to_the_same_report(tmp_path):
    full = _worker(tmp_path / "full", 6)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _worker(tmp_path / "resumed", 6, kill_at=5)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert os.listdir(tmp_path / "resumed" / "out" / "train")  # a checkpoint survived
    resumed = _worker(tmp_path / "resumed", 6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads(full.stdout.strip().splitlines()[-1])
    b = json.loads(resumed.stdout.strip().splitlines()[-1])
    for k in ("before", "after", "open_book", "predictions_after", "slot", "seeding_prompts",
              "replay_prompts", "predictions", "warning"):
        assert a[k] == b[k], k
    # the report shows every probe's answers before, after and open book, and warns when the
    # teacher answers too few (this random model answers none with the memory in context)
    rows = a["predictions"]
    assert [r["question"] for r in rows] == [f"where does n{i} live ?" for i in range(4)]
    assert [r["after"] for r in rows] == a["predictions_after"]
    assert a["open_book"]["em"] < 0.3 and "open-book EM is 0.00" in a["warning"]
    md = open(tmp_path / "full" / "out" / "report.md").read()
    assert "## Predictions" in md and "where does n3 live ?" in md and "**Warning:**" in md
    la = [json.loads(x) for x in open(tmp_path / "full" / "out" / "metrics.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "resumed" / "out" / "metrics.jsonl")]
    assert [r["step"] for r in lb] == list(range(1, 7))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_sft_into_a_slot_trains_only_that_slot_and_replays_wake_texts():
    """The "SFT into a new slot with replay" baseline: only the slot's adapter moves, the
    memories' LM loss falls, and each batch holds round(fraction * B) packed wake rows."""
    from sleep_jax.sleep import sft_batches

    tok = tokenizer()
    model = create_model(CFG, seed=0)
    mems, _, _ = facts([40, 41, 42, 43])
    wake = [memory(n, n % 10) for n in range(8)]  # names 0..7: never a memory of this sleep
    cfg = SleepConfig(steps=30, batch_size=8, slots=1, rank=4, objective="sft",
                      prompts="given", checkpoint_every=0, progress_bar=False, sft_seq_len=16,
                      optim=OptimConfig(lr=3e-2, warmup_steps=2, weight_decay=0.0))
    replay = ReplayConfig(fraction=0.25, source="texts")
    batch = next(sft_batches(mems, tok, cfg=cfg, replay=replay, replay_texts=wake, seed=0))
    assert batch["inputs"].shape == (8, 16)
    rows = [tok.decode([int(t) for t in r if t]) for r in batch["inputs"]]
    assert all(any(f"n{n} " in r for n in range(40, 44)) for r in rows[:6]), rows
    assert all(any(f"n{n} " in r for n in range(8)) for r in rows[6:]), rows
    assert (batch["loss_mask"].sum(1) > 0).all()  # no replay row cut down to no target
    with pytest.raises(ValueError, match="gives no replay row"):
        sft_batches(mems, tok, cfg=cfg, replay=ReplayConfig(fraction=0.05, source="texts"),
                    replay_texts=wake, seed=0)
    with pytest.raises(ValueError, match="must be 'texts'"):
        sft_batches(mems, tok, cfg=cfg, replay=ReplayConfig(fraction=0.25, source="prompts"),
                    replay_texts=wake, seed=0)
    r = sleep(model, tok, mems, tokens=TOKENS, cfg=cfg, seeding_cfg=None, replay=replay,
              replay_texts=wake)
    assert r.slot == 0
    losses = [h["loss"] for h in r.history]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses  # measured: 4.06 -> 3.50
    before = flatten(nnx.state(model, nnx.Param))
    after = flatten(nnx.state(r.model, nnx.Param))
    assert set(after) - set(before) == {"['blocks']['expert_a']", "['blocks']['expert_b']"}
    for key, x in before.items():  # every base parameter bitwise unchanged
        np.testing.assert_array_equal(np.asarray(after[key][...]), np.asarray(x[...]),
                                      err_msg=key)
    assert np.abs(slot_values(r.model, 0)["expert_b"]).max() > 0
