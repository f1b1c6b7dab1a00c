"""The cycle's methods (sleep_jax/cycle.py CycleMethod, run_methods) and the demo stream
(sleep_jax/cycle_demo.py): fixed seeding row lengths, the baselines' wiring (SFT replays every
earlier cycle's memories, seeding without growth trains the full model), in-context only, the
demo stream's data discipline and the base-reuse check, the CLI's checks before any work."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sleep_jax import cycle  # noqa: E402
from sleep_jax.data.jsonl import Memory, Probe  # noqa: E402
from sleep_jax.distill.seeding import SeedingConfig  # noqa: E402
from sleep_jax.sleep import ReplayConfig, Rows, SleepConfig, batch_fn  # noqa: E402


class _Tok:
    """Whitespace word ids (one id per word): token counts by hand."""

    def encode(self, s):
        class E:
            ids = [len(w) for w in s.split()]
        return E()


def test_row_lengths_fit_every_sleep_and_fix_the_batch_shape():
    mems = [Memory("a", "one two three"), Memory("b", "x")]
    inputs = cycle.CycleInputs(prompts={"a": ["p q"], "b": ["p q r s t"]},
                               replay_prompts=["r1 r2 r3 r4 r5 r6"])
    cfg = SleepConfig(prompts="given", memory_separator=" ")
    # teacher: max(3 + 2, 1 + 5, 6) + bos = 7; student: max(2, 5, 6) + bos = 7
    assert cycle.row_lengths(_Tok(), mems, inputs, cfg) == (7, 7)
    rows = Rows([([5] * 3, [1] * 2)], [([], [2] * 4)], [], 0, 0)
    kw = dict(batch_size=4, fraction=0.5, bos_id=1, pad_id=0)
    b = batch_fn(rows, **kw, lengths=(9, 8))(np.random.default_rng(0))
    short = batch_fn(rows, **kw)(np.random.default_rng(0))
    assert b.teacher_prefix.shape == (4, 9) and b.student_prefix.shape == (4, 8)
    assert short.teacher_prefix.shape == (4, 6) and short.student_prefix.shape == (4, 5)
    # the same rows, only padded further
    np.testing.assert_array_equal(b.student_prefix[:, :5], short.student_prefix)
    assert not b.student_prefix[:, 5:].any()
    with pytest.raises(ValueError, match="shorter than this sleep's longest rows"):
        batch_fn(rows, **kw, lengths=(5, 8))


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A tiny random checkpoint and a stream of 4 memories (2 cycles of 2)."""
    from sleep_jax.data.tokenizers import special_ids, word_level_tokenizer
    from sleep_jax.models import create_model, get_preset
    from sleep_jax.models.checkpoint_dir import save_checkpoint

    base_dir = str(tmp_path_factory.mktemp("cycle_methods") / "base")
    memories = [Memory(f"m{i}", f"n{i} lives in c{i % 4} .") for i in range(4)]
    probes = [Probe(f"m{i}", f"where does n{i} live ?", (f"c{i % 4}",)) for i in range(4)]
    tok = word_level_tokenizer([m.text for m in memories] + [p.question for p in probes]
                               + ["n9 lives in c1 . where does n9 live ?"])
    ids = special_ids(tok)
    tokens = {"bos_id": ids["bos"], "eos_id": ids["eos"], "pad_id": ids["pad"],
              "unk_id": ids["unk"], "add_bos": True, "chat_template": None}
    cfg = get_preset("tiny", vocab=tok.get_vocab_size(), embed=32, mlp=64, layers=1, heads=2,
                     kv_heads=2, head_dim=16)
    save_checkpoint(base_dir, create_model(cfg, seed=0), tok, tokens=tokens)
    return base_dir, memories, probes, tokens


SCFG = SleepConfig(steps=2, batch_size=4, slots=1, rank=4, when_full="grow",
                   checkpoint_every=0, progress_bar=False, eval_tokens=2,
                   prompt_format="{question}", sft_seq_len=8)
CCFG = cycle.CycleConfig(sleep_every=2, store_size=2, compilation_cache=False)


def test_in_context_only_trains_nothing_and_reads_each_cycles_store(stream, tmp_path):
    from sleep_jax.models.checkpoint_dir import load_checkpoint

    base_dir, memories, probes, tokens = stream
    out = cycle.run_cycle(base_dir, memories, probes, workdir=str(tmp_path), cfg=CCFG,
                          method=cycle.CycleMethod("in_context", None), write_report=False)
    ev = out["events"]
    assert all(np.isnan(x) for x in ev[0]["row"])  # nothing before the first store
    assert [e["checkpoint"] for e in ev[1:]] == [os.path.abspath(base_dir)] * 2
    assert [e["steps"] for e in ev[1:]] == [0, 0]
    base, tok, _ = load_checkpoint(base_dir)
    sets = [[memories[0], memories[1]], [memories[2], memories[3]]]
    psets = [[probes[0], probes[1]], [probes[2], probes[3]]]
    for k in (1, 2):  # row k: cycle k's store in context, every set; by a second path
        want = cycle.in_context_row(base, tok, sets[k - 1], psets, tokens=tokens, cfg=SCFG)
        assert ev[k]["row"] == want
        # the diagonal is the wake figure (the same store, this cycle's probes)
        assert ev[k]["row"][k - 1] == pytest.approx(ev[k]["wake_in_context"])


def test_baselines_get_their_replay_and_one_step_shape(stream, tmp_path, monkeypatch):
    """The wiring of the baselines into the sleep pipeline (the pipeline itself is tested in
    test_sleep.py and through the demo's methods): a stand-in sleep records its arguments and
    returns the model unchanged."""
    import sleep_jax.sleep as sleep_mod

    base_dir, memories, probes, _ = stream
    seen = []

    def fake_sleep(base, tok, mems, **kw):
        seen.append({"memories": [m.id for m in mems], "replay_texts": kw["replay_texts"],
                     "earlier": len(kw["earlier"]), "lengths": kw["row_lengths"],
                     "prompts": kw["replay_prompts"]})
        rows = None
        if kw["cfg"].objective == "seeding":
            rows = sleep_mod.Rows([], [], [{"sleep": len(seen), "slot": None,
                                            "memory_id": m.id, "prompt": m.text}
                                           for m in mems], 0, 0)
        return sleep_mod.SleepResult(base, None, [], [], [], "done", "", rows, {})

    monkeypatch.setattr(sleep_mod, "sleep", fake_sleep)
    full = SleepConfig(**{**SCFG.__dict__, "expert": False})
    sft = SleepConfig(**{**full.__dict__, "objective": "sft"})
    methods = [cycle.CycleMethod("seed_full", full, SeedingConfig(max_new_tokens=2),
                                 ReplayConfig(fraction=0.5, source="prompts")),
               cycle.CycleMethod("sft_replay", sft, None,
                                 ReplayConfig(fraction=0.5, source="texts"))]
    inputs = cycle.CycleInputs(replay_prompts=["where does n9 live ?"],
                               replay_texts=["n9 lives in c1 ."], old_probes=probes[:1])
    out = cycle.run_methods(base_dir, memories, probes, workdir=str(tmp_path), cfg=CCFG,
                            methods=methods, inputs=inputs)
    assert [s["memories"] for s in seen] == [["m0", "m1"], ["m2", "m3"]] * 2
    # seeding: the wake prompts, and every earlier sleep's prompts (read from the checkpoint)
    assert [s["earlier"] for s in seen[:2]] == [0, 2]
    assert seen[0]["prompts"] == seen[1]["prompts"] == ["where does n9 live ?"]
    assert seen[0]["lengths"] == seen[1]["lengths"] is not None  # one step shape
    # SFT: the wake texts, then also every earlier cycle's memory texts
    assert seen[2]["replay_texts"] == ["n9 lives in c1 ."]
    assert seen[3]["replay_texts"] == ["n9 lives in c1 .", memories[0].text, memories[1].text]
    assert seen[3]["lengths"] is None
    sf = out["events"]["seed_full"]
    assert [e["slot"] for e in sf[1:]] == [None, None] and sf[2]["slots"] == 0
    rep = json.load(open(tmp_path / "report.json"))
    assert list(rep["methods"]) == ["seed_full", "sft_replay"]
    for name in ("seed_full", "sft_replay"):
        e = rep["methods"][name]
        assert len(e["matrix"]) == 3 and len(e["old"]) == 3
        assert (tmp_path / name / "events.jsonl").exists()
    with pytest.raises(ValueError, match="'sft_replay' needs replay_texts"):
        cycle.run_methods(base_dir, memories, probes, workdir=str(tmp_path / "x"), cfg=CCFG,
                          methods=methods, inputs=cycle.CycleInputs(replay_prompts=["r"]))
    assert not (tmp_path / "x").exists()  # refused before any work
    with pytest.raises(ValueError, match="distinct"):
        cycle.run_methods(base_dir, memories, probes, workdir=str(tmp_path), cfg=CCFG,
                          methods=[methods[0], methods[0]])


def held_out_all(world):

    return {q.question for w in ("near", "far", "val_near", "val_far")
            for s in ("new", "old") for q in world.qa(s, w)}


def test_demo_stream_keeps_held_out_wordings_out_of_training():
    from sleep_jax import cycle_demo
    from sleep_jax.data import world as worldlib
    from sleep_jax.demo import DemoConfig

    world = worldlib.make_world(0, n_old=12, n_new=9, n_task=2)
    cd = cycle_demo.CycleDemoConfig(memories=6, old_entities=3)
    memories, probes, inputs = cycle_demo.stream(world, cd, DemoConfig(n_old=12, n_new=9,
                                                                       n_task=2))
    # the SFT baselines replay the wake mixture (held-out wordings never in it either)
    assert inputs.replay_texts and not [t for t in map(str, inputs.replay_texts)
                                        if any(q in t for q in held_out_all(world))]
    assert [m.id for m in memories] == [e.id for e in world.entities("new")[:6]]
    assert {p.memory_id for p in probes} == {m.id for m in memories}
    assert {p.memory_id for p in inputs.old_probes} == \
        {e.id for e in world.entities("old")[:3]}
    held_out = {q.question for w in worldlib.WORDINGS if w in ("near", "far", "val_near",
                                                               "val_far")
                for s in ("new", "old") for q in world.qa(s, w)}
    trained = [p for ps in inputs.prompts.values() for p in ps] + list(inputs.replay_prompts)
    assert held_out and not [p for p in trained if any(q in p for q in held_out)]
    with pytest.raises(ValueError, match="memories=10 > the world's 9 NEW"):
        cycle_demo.stream(world, cycle_demo.CycleDemoConfig(memories=10))
    val = cycle_demo.stream(world, cycle_demo.CycleDemoConfig(
        memories=6, wordings=("val_near", "val_far")))[1]
    assert {p.question for p in val} == {q.question for w in ("val_near", "val_far")
                                         for q in world.qa("new", w) if q.memory_id in
                                         {m.id for m in memories}}
    with pytest.raises(ValueError, match="wordings=\\('train',\\)"):
        cycle_demo.CycleDemoConfig(wordings=("train",))
    with pytest.raises(ValueError, match="unknown \\['sft'\\]"):
        cycle_demo.CycleDemoConfig(methods=("sleep", "sft"))


def test_demo_base_is_reused_only_when_its_settings_match(tmp_path):
    from sleep_jax import cycle_demo
    from sleep_jax.demo import DemoConfig
    from sleep_jax.demo_run import base_settings

    cfg = DemoConfig()
    d = tmp_path / "base"
    assert "no checkpoint" in cycle_demo.reusable(str(d), cfg)
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"extra": {"source": "sleep-jax demo"}}))
    assert "not a base written" in cycle_demo.reusable(str(d), cfg)
    (d / "config.json").write_text(json.dumps(
        {"extra": {"source": "sleep-jax demo", "base_settings": base_settings(cfg)}}))
    assert cycle_demo.reusable(str(d), cfg) is None
    assert "base_steps" in cycle_demo.reusable(str(d), DemoConfig(base_steps=10))


def test_cycle_demo_cli_checks_before_any_work(tmp_path, capsys):
    from sleep_jax.cycle_cli import main

    w = tmp_path / "run"
    demo = ["--config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                     "cycle.py:demo"), "--workdir", str(w)]
    assert main(demo + ["--checkpoint", "x"]) == 2
    assert "the demo presets make their own stream" in capsys.readouterr().err
    assert main(demo + ["--config.cycle_demo.memories=41"]) == 2
    assert "memories=41 > demo.n_new=40" in capsys.readouterr().err
    assert main(demo + ["--config.cycle_demo.methods=('sleep','bogus')"]) == 2
    assert "unknown ['bogus']" in capsys.readouterr().err
    assert main(["--workdir", str(w)]) == 2  # the file mode needs its inputs
    assert "missing --checkpoint, --memories, --probes" in capsys.readouterr().err
    assert not w.exists()


def test_earlier_sleeps_prompts_that_hold_a_probe_question_are_not_replayed():
    from sleep_jax.sleep import seeding_rows

    cfg = SleepConfig(prompts="given")
    earlier = [{"sleep": 0, "slot": 0, "memory_id": "a", "prompt": "Where does N1 live ? x"},
               {"sleep": 0, "slot": 0, "memory_id": "a", "prompt": "n1 works as"}]
    rows = seeding_rows(_Tok(), [Memory("b", "n2 lives in c2 .")], cfg=cfg,
                        replay=ReplayConfig(fraction=0.5, source="prompts"),
                        prompts={"b": ["n2 lives in", "where does n2 live ?"]},
                        replay_prompts=["r"], earlier=earlier,
                        probe_questions=["where does n1 live ?", "where does n2 live ?"])
    enc = lambda s: _Tok().encode(s).ids
    assert rows.seeding == [(enc("n2 lives in c2 . "), enc("n2 lives in"))]
    assert rows.replay == [([], enc("r")), ([], enc("n1 works as"))]
    assert rows.dropped == 2 and rows.earlier == 1


def test_sft_batches_with_replay_resume_from_their_state(stream):
    """ConcatBatches (memory rows + packed wake rows) restored from get_state continues with
    exactly the batches an uninterrupted iterator gives."""
    from sleep_jax.models.checkpoint_dir import load_checkpoint
    from sleep_jax.sleep import ConcatBatches, sft_batches

    base_dir, memories, _, _ = stream
    tok = load_checkpoint(base_dir)[1]
    cfg = SleepConfig(batch_size=4, sft_seq_len=8, expert=False, objective="sft")
    make = lambda: sft_batches(memories, tok, cfg=cfg, replay=ReplayConfig(
        fraction=0.5, source="texts"), replay_texts=["n9 lives in c1 ."] * 3 + [
        "where does n9 live ? c1"], seed=3)
    it = make()
    assert isinstance(it, ConcatBatches)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    again = make()
    again.set_state(state)
    got = [next(again) for _ in range(4)]
    fresh = make()
    start = [next(fresh) for _ in range(4)]  # what a restore that did nothing would give
    assert any(not np.array_equal(w["inputs"], s["inputs"]) for w, s in zip(want, start))
    for w, g in zip(want, got):
        assert w.keys() == g.keys() and w["inputs"].shape == (4, 8)
        for k in w:
            np.testing.assert_array_equal(w[k], g[k], err_msg=k)
