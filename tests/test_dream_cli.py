"""``sleep-jax dream``: a tiny end-to-end run through main() on a random checkpoint and a
2-context task set, a re-run that resumes (steps continue, no metrics row twice), the saved
generator, and bad task-set lines refused with file:line and the offending value."""

import json
import os
import shutil

import numpy as np
import pytest

from sleep_jax.data import world as W
from sleep_jax.data.jsonl import JsonlError
from sleep_jax.dream import cli, tasks
from sleep_jax.models import create_model, get_preset
from sleep_jax.models.checkpoint_dir import load_checkpoint, save_checkpoint
from sleep_jax.train.loop import read_metrics

TOKENS = {"bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 3, "add_bos": True,
          "chat_template": None}
WORDS = ("ka lo mi ru ta ne lives in oslo rome lima works as a baker smith . where does live "
         "? what is the job of question : answer implications").split()
RECORDS = [
    {"id": "t0", "context": "ka lo mi lives in oslo . ka lo mi works as a baker .",
     "questions": [{"question": "where does ka lo mi live ?", "answers": ["oslo"],
                    "candidates": ["oslo", "rome", "lima"]},
                   {"question": "what is the job of ka lo mi ?", "answers": ["baker"]}]},
    {"id": "t1", "context": "ru ta ne lives in rome . ru ta ne works as a smith .",
     "questions": [{"question": "where does ru ta ne live ?", "answers": ["rome"]},
                   {"question": "what is the job of ru ta ne ?", "answers": ["smith"]}]},
]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("dream_cli")
    cfg = get_preset("tiny", vocab=48, embed=32, mlp=64, layers=1, heads=4, kv_heads=2,
                     head_dim=8)
    save_checkpoint(d / "base", create_model(cfg, seed=0), _tokenizer(), tokens=TOKENS)
    return d


def _args(d, steps, *extra):
    return ["--config", cli.default_config_path("dream.py:quick"), "--checkpoint",
            str(d / "base"), "--tasks", _write(d / "tasks.jsonl", RECORDS), "--workdir",
            str(d / "run"), "--config.run.slots=2", "--config.run.rank=4",
            f"--config.run.steps={steps}", "--config.run.devices=1", *extra]


@pytest.mark.slow  # ~33 s of CPU (one compile of the iteration, growth, 2 checkpoint saves):
# the learning test (test_dream_learning.py) takes the new tests' default budget
def test_dream_command_trains_saves_and_resumes(checkpoint, capsys):
    d = checkpoint
    assert cli.main(_args(d, 3)) == 0
    path = str(d / "run" / "metrics.jsonl")
    first = read_metrics(path)
    assert [r["step"] for r in first] == [1, 2, 3]
    assert all(np.isfinite(r["reward_mean"]) and 0 <= r["copy_share"] <= 1 for r in first)
    # a run killed after step 2's checkpoint (quick: checkpoint_every=2) but with step 3's
    # metrics row written: the re-run resumes at step 2 and writes step 3 once
    shutil.rmtree(d / "run" / "train" / "3")
    assert cli.main(_args(d, 3)) == 0
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3]  # continued, no row twice
    assert rows[:2] == first[:2]
    assert rows[2]["reward_mean"] == pytest.approx(first[2]["reward_mean"], abs=1e-5)  # exact
    assert '"step": 3' in capsys.readouterr().out
    assert cli.main(_args(d, 4)) == 2  # a changed config is refused
    assert "config.json holds a different config" in capsys.readouterr().err
    # the saved model: grown to 2 slots, both on with B = 0 in the generator slot (exact); the
    # trained generator beside it, moved away from its start (B no longer 0)
    model, tok, adapter, info = cli.read_generator(str(d / "run" / "model"))
    assert model.config.expert_slots == 2 and (info["generator_slot"], info["inner_slot"]) == (0, 1)
    assert info["steps"] == 3 and tok is not None
    b = [v for k, v in adapter.items() if k.endswith("expert_b")]
    assert b and np.any(b[0] != 0)
    _, _, meta = load_checkpoint(str(d / "run" / "model"))
    assert meta["extra"]["dream"]["generator_file"] == cli.GENERATOR_FILE


def test_task_records_and_their_candidates(tmp_path):
    path = _write(tmp_path / "t.jsonl", RECORDS)
    ts = tasks.read_tasks(path)
    cands = tasks.candidates(ts)
    assert cands[0][0] == ("oslo", "rome", "lima")  # given: answer first
    assert cands[0][1] == ("baker", "smith")  # default: the other records' answers
    assert cands[1][0] == ("rome", "oslo")
    tok = _tokenizer()
    arr = tasks.task_arrays(ts, lambda s: tok.encode(s, add_special_tokens=False).ids,
                            dream_template="{context} implications:",
                            prompt_format="question: {question} answer:", bos_id=1)
    assert arr.answers.shape == (2, 2, 3, 1) and arr.answer_mask[1, 0].any(-1).tolist() == [
        True, True, False]
    assert arr.prompt[0, 0] == 1 and arr.ctx[1, 0] == 1 and arr.q_mask.all()
    want = [1] + tok.encode("question: where does ru ta ne live ? answer:").ids
    assert arr.tau_prompt[1, 0, :arr.tau_prompt_len[1, 0]].tolist() == want
    # the world's TASK split exports in this format, in the task wording only
    world = W.make_world(seed=0, n_old=2, n_new=2, n_task=3)
    recs = tasks.world_task_records(world)
    assert [r["id"] for r in recs] == [e.id for e in world.entities("task")]
    held_out = {W.question(x, a, w, k) for x in world.entities("task") for a in W.ATTRIBUTES
                for w in W.EVALUATION + W.VALIDATION
                for k in range(len(W.QUESTION_TEMPLATES[a][w]))}
    qs = [q["question"] for r in recs for q in r["questions"]]
    assert not held_out & set(qs) and len(qs) == 3 * len(W.ATTRIBUTES)
    got = tasks.read_tasks(tasks.export_world_tasks(world, tmp_path / "w.jsonl"))
    assert got[0].questions[0].candidates[0] == got[0].questions[0].answers[0]


@pytest.mark.parametrize("line, where, says", [
    ("{not json", 2, "invalid JSON"),
    ({"id": "t0", "context": "x", "questions": []}, 2, "duplicate id 't0'"),
    ({"id": "t9", "context": "", "questions": []}, 2, "'context' must be a non-empty string"),
    ({"id": "t9", "context": "x", "questions": []}, 2, "'questions' must be a non-empty list"),
    ({"id": "t9", "context": "x", "questions": [{"question": "q", "answers": []}]}, 2,
     "questions[0]: key 'answers' must be a non-empty list of strings, got []"),
    ({"id": "t9", "context": "x", "questions": [{"question": "q", "answers": ["a"],
                                                 "candidates": ["b", "c"]}]}, 2,
     "candidates ['b', 'c'] do not hold the answer 'a'"),
])
def test_bad_task_lines_name_file_line_and_value(tmp_path, line, where, says):
    path = _write(tmp_path / "bad.jsonl", [RECORDS[0], line])
    with pytest.raises(JsonlError) as e:
        tasks.read_tasks(path)
    assert str(e.value).startswith(f"{path}:{where}: ") and says in str(e.value), str(e.value)


# two runs of one step of a 1-layer model: about 18 s on 2 cores
def test_dream_command_routing_noise_over_the_trained_slots(tmp_path):
    """A checkpoint holding one trained slot (an earlier sleep's): with route_noise the
    generator's dreams are sampled with that slot scaled per token (``dream.noise``), so the
    same seed draws other dreams and rewards; the run records the slots it drew from. Without
    a trained slot the setting is off."""
    import jax
    from flax import nnx

    from sleep_jax.grow import activate_slot
    from sleep_jax.train import adapters

    cfg = get_preset("tiny", vocab=48, embed=32, mlp=64, layers=1, heads=4, kv_heads=2,
                     head_dim=8, expert_slots=3, expert_rank=4)
    model, _ = activate_slot(create_model(cfg, seed=0), None, 0, jax.random.key(1))
    g, params, other = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x, params)
    for i, (_, v) in enumerate(sorted(adapters.slot_leaves(params).items())):
        v.set_value(jax.random.normal(jax.random.key(10 + i), v.shape) * 0.5)  # "trained"
    save_checkpoint(tmp_path / "base", nnx.merge(g, params, other), _tokenizer(), tokens=TOKENS)
    runs = {}
    for name, noise in (("plain", "0.0"), ("noisy", "3.0")):
        d = tmp_path / name
        d.mkdir()
        shutil.copytree(tmp_path / "base", d / "base")
        assert cli.main(_args(d, 1, f"--config.run.route_noise={noise}")) == 0
        info = load_checkpoint(str(d / "run" / "model"))[2]["extra"]["dream"]
        runs[name] = (info, read_metrics(str(d / "run" / "metrics.jsonl"))[0])
    assert runs["plain"][0]["noise_slots"] == [] and runs["noisy"][0]["noise_slots"] == [0]
    assert (runs["plain"][0]["generator_slot"], runs["plain"][0]["inner_slot"]) == (1, 2)
    assert runs["plain"][1]["reward_mean"] != runs["noisy"][1]["reward_mean"]


def test_bad_input_to_the_command(tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [RECORDS[0], {"id": "t1", "context": 5}])
    base = ["--checkpoint", str(tmp_path / "none"), "--workdir", str(tmp_path / "run")]
    assert cli.main(["--tasks", bad, *base]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "'context' must be a non-empty string, got 5" in err
    one = _write(tmp_path / "one.jsonl", [{"id": "t", "context": "x", "questions": [
        {"question": "q", "answers": ["a"]}]}])
    with pytest.raises(ValueError, match="only the candidate"):
        tasks.candidates(tasks.read_tasks(one))
    assert cli.main(["--tasks", one, *base, "--config.run.dream_template=no field"]) == 2
    assert "must contain {context}" in capsys.readouterr().err
    assert cli.main(["--tasks", one, *base, "--config.rl.algorithm=ppo"]) == 2
    assert "'grpo' or 'rest_em'" in capsys.readouterr().err
    assert cli.main(["--tasks", one, *base, "--config.run.route_noise=-1"]) == 2
    assert "DreamRunConfig.route_noise=-1.0 must be >= 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
