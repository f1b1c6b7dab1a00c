"""A sleep for an instruct model (SleepConfig.chat): the seeding rows, replay rows and probes
are the chat template's renderings (checked against ``models.cli.render_chat`` of the whole
turn, an independent path), rows carry no BOS when the tokenizer adds none, and
``sleep_checkpoint`` takes given prompts, scores probe splits and a retention list."""

import json

import numpy as np
import pytest

from sleep_jax.data.jsonl import (
    JsonlError,
    Memory,
    Probe,
    read_probes,
    read_prompts,
    read_questions,
)
from sleep_jax.distill.seeding import SeedingConfig
from sleep_jax.models import create_model, get_preset
from sleep_jax.models.checkpoint_dir import load_checkpoint, save_checkpoint
from sleep_jax.models.cli import render_chat
from sleep_jax.sleep import (
    ReplayConfig,
    SleepConfig,
    batch_fn,
    chat_parts,
    probe_prompt,
    seeding_rows,
    sleep_checkpoint,
)

TEMPLATE = ("{% for m in messages %}<s> <user> {{ m.content }} </user>{% endfor %}"
            "{% if add_generation_prompt %} <bot>{% endif %}")
WORDS = ["<pad>", "<s>", "</s>", "<user>", "</user>", "<bot>", "lives", "in", ".", "where",
         "does", "live", "?", "capital", "of", "x", "is", "y"] + \
    [f"n{i}" for i in range(6)] + [f"c{i}" for i in range(6)]
# no BOS added by the tokenizer: the template writes its own start token
TOKENS = {"bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 0, "add_bos": False,
          "chat_template": TEMPLATE}


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)},
                                     unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def enc(tok, text):
    return tok.encode(text).ids


def test_chat_rows_are_the_templates_renderings_of_each_turn():
    tok = tokenizer()
    cfg = SleepConfig(chat=True, prompts="given", memory_separator=" ",
                      prompt_format="{question}")
    mems = [Memory("m0", "n0 lives in c1 ."), Memory("m1", "n1 lives in c2 .")]
    prompts = {"m0": ["where does n0 live ?"], "m1": ["where does n1 live ?", "n1 lives in"]}
    replay = ReplayConfig(fraction=0.5, source="prompts")
    rows = seeding_rows(tok, mems, cfg=cfg, replay=replay, prompts=prompts,
                        replay_prompts=["capital of x is"], tokens=TOKENS)
    render = lambda text: enc(tok, render_chat(TEMPLATE, text, TOKENS, tok))
    want = [(m.text + " " + p, p) for m in mems for p in prompts[m.id]]
    assert len(rows.seeding) == 3 and len(rows.replay) == 1
    batch = batch_fn(rows, batch_size=8, fraction=0.0, bos_id=None, pad_id=0)(
        np.random.default_rng(0))
    # every drawn row: teacher = the memory and prompt asked in one user turn, student = the
    # prompt alone, both exactly as the template renders them, no BOS in front
    seen = set()
    for i in range(8):
        t = batch.teacher_prefix[i, :batch.teacher_len[i]].tolist()
        s = batch.student_prefix[i, :batch.student_len[i]].tolist()
        k = [j for j, (tt, ss) in enumerate(want) if render(tt) == t]
        assert len(k) == 1, tok.decode(t)
        assert s == render(want[k[0]][1])
        seen.add(k[0])
    assert len(seen) >= 2
    # a replay row: teacher and student read the same rendered turn
    rep = batch_fn(rows, batch_size=2, fraction=0.5, bos_id=None, pad_id=0)(
        np.random.default_rng(1))
    r = int(np.argmax(rep.teacher_len == rep.student_len))
    assert rep.teacher_len[r] == rep.student_len[r]
    assert rep.student_prefix[r, :rep.student_len[r]].tolist() == render("capital of x is")
    assert rep.teacher_prefix[r, :rep.teacher_len[r]].tolist() == render("capital of x is")
    # probes are asked the same way, open book with the memory first
    assert probe_prompt("where does n0 live ?", cfg=cfg, tokens=TOKENS, tokenizer=tok) == \
        render_chat(TEMPLATE, "where does n0 live ?", TOKENS, tok)
    assert probe_prompt("q ?", cfg=cfg, tokens=TOKENS, tokenizer=tok, memory="n0 lives") == \
        render_chat(TEMPLATE, "n0 lives q ?", TOKENS, tok)
    # without chat: bos + memory + prompt, as before
    plain = seeding_rows(tok, mems[:1], cfg=SleepConfig(prompts="given"),
                         replay=ReplayConfig(fraction=0.0), prompts=prompts)
    assert plain.head == [] and plain.seeding[0] == (enc(tok, "n0 lives in c1 . "),
                                                     enc(tok, "where does n0 live ?"))


def test_chat_parts_refuses_a_checkpoint_without_a_template():
    with pytest.raises(ValueError, match="no chat template"):
        chat_parts({**TOKENS, "chat_template": None}, tokenizer())
    with pytest.raises(ValueError, match="verbatim"):
        chat_parts({**TOKENS, "chat_template": "{{ messages[0].content }}{{ messages[0]"
                    ".content }}"}, tokenizer())
    with pytest.raises(ValueError, match="rehearse"):
        from sleep_jax.dream.rehearse import RehearseConfig

        SleepConfig(chat=True, rehearse=RehearseConfig(generator="/x"))


def test_prompt_question_and_split_files(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"memory_id": "m0", "prompt": "a"}\n{"memory_id": "m0", "prompt": "b"}\n')
    assert read_prompts(p, {"m0"}) == {"m0": ["a", "b"]}
    with pytest.raises(JsonlError, match="unknown memory_id 'm0'"):
        read_prompts(p, {"m1"})
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "capital of x ?", "answers": ["y"]}\n{"question": "z"}\n')
    with pytest.raises(JsonlError, match="q.jsonl:2: missing key 'answers'"):
        read_questions(q)
    pr = tmp_path / "probes.jsonl"
    pr.write_text('{"memory_id": "m0", "question": "q", "answers": ["a"], "split": "val"}\n'
                  '{"memory_id": "m0", "question": "r", "answers": ["a"]}\n')
    assert [x.split for x in read_probes(pr)] == ["val", ""]
    pr.write_text('{"memory_id": "m0", "question": "q", "answers": ["a"], "split": 3}\n')
    with pytest.raises(JsonlError, match="'split' must be a string"):
        read_probes(pr)


def test_a_chat_sleep_reports_splits_retention_and_its_wall_time(tmp_path):
    tok = tokenizer()
    cfg_m = get_preset("tiny", vocab=len(WORDS), embed=32, mlp=64, layers=1, heads=2,
                       kv_heads=2, head_dim=16)
    save_checkpoint(tmp_path / "base", create_model(cfg_m, seed=0), tok, tokens=TOKENS)
    base, tok2, meta = load_checkpoint(tmp_path / "base")
    mems = [Memory(f"m{i}", f"n{i} lives in c{i} .") for i in range(3)]
    probes = [Probe(f"m{i}", q.format(i=i), (f"c{i}",), split)
              for i in range(3) for q, split in (("where does n{i} live ?", "val"),
                                                 ("n{i} lives in", "test"))]
    cfg = SleepConfig(steps=2, batch_size=4, slots=1, rank=2, chat=True, prompts="given",
                      prompt_format="{question}", eval_tokens=2, checkpoint_every=0,
                      progress_bar=False)
    report = sleep_checkpoint(
        str(tmp_path / "base"), base, tok2, meta, mems, probes, workdir=str(tmp_path / "s"),
        cfg=cfg, seeding_cfg=SeedingConfig(max_new_tokens=2),
        replay=ReplayConfig(fraction=0.25, samples=4, sample_tokens=3, prefix_tokens=2),
        prompts={m.id: [f"where is n{i} ?"] for i, m in enumerate(mems)},
        retain=[Probe("", "capital of x is", ("y",))])
    assert report["status"] == "done" and report["slot"] == 0
    assert set(report["splits"]) == {"val", "test"}
    for split in ("val", "test"):
        for k in ("before", "after", "open_book"):
            sc = report["splits"][split][k]
            assert sc["n"] == 3 and 0.0 <= sc["contains"] <= 1.0
    # the split scores are the predictions of that split's probes, rescored
    from sleep_jax.eval import qa

    val = [r for r, pr in zip(report["predictions"], probes) if pr.split == "val"]
    assert report["splits"]["val"]["after"]["em"] == pytest.approx(
        qa.score([r["after"] for r in val], [r["answers"] for r in val])["em"])
    ret = report["retention"]
    assert ret["n"] == 1 and ret["kept"] <= ret["base_right"] <= 1
    assert set(report["wall_s"]) == {"open_book_s", "sleep_s", "evaluation_s"}
    md = (tmp_path / "s" / "report.md").read_text()
    assert "| closed book, after | val |" in md and "Retention on 1 general" in md
    saved = json.loads((tmp_path / "s" / "report.json").read_text())
    assert saved["splits"] == report["splits"]
    with pytest.raises(ValueError, match="needs seeding prompts"):
        sleep_checkpoint(str(tmp_path / "base"), base, tok2, meta, mems, probes,
                         workdir=str(tmp_path / "s2"), cfg=cfg,
                         seeding_cfg=SeedingConfig(), replay=ReplayConfig())


def test_example_data_keeps_probe_wordings_out_of_the_prompts(tmp_path, capsys):
    from sleep_jax.data import fictional
    from sleep_jax.data.jsonl import read_memories

    assert fictional.main(["--out", str(tmp_path)]) == 0
    mems = read_memories(tmp_path / "memories.jsonl")
    probes = read_probes(tmp_path / "probes.jsonl", {m.id for m in mems})
    prompts = read_prompts(tmp_path / "prompts.jsonl", {m.id for m in mems})
    retain = read_questions(tmp_path / "retain.jsonl")
    assert len(mems) == 30 and len(probes) == 60 and len(retain) == len(fictional.GENERAL_QA)
    assert {p.split for p in probes} == {"val", "test"}
    every_prompt = {p.lower() for ps in prompts.values() for p in ps}
    for pr in probes:  # the memory states the answer; no seeding prompt is a probe question
        assert pr.answers[0] in {m.id: m.text for m in mems}[pr.memory_id]
        assert pr.question.lower() not in every_prompt
    names = [m.text.split(" lives")[0].split(" works")[0].split(" has")[0] for m in mems]
    assert len(set(names)) == 30  # one fact per person
    assert fictional.main(["--out", str(tmp_path / "x"), "--facts", "99"]) == 2
    assert "n=99 facts; allowed: 1..36" in capsys.readouterr().err
