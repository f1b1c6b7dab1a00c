"""Bad input refused on the host where it enters: token ids outside [0, vocab) (tokenizer layer,
pipeline, probes, CLI prompts, checkpoints whose tokenizer does not fit the model) and empty
JSONL files. Each refusal is checked for its type and that the message names the offending
value and what is allowed; each boundary value (id 0, id vocab - 1) is checked to still pass.

Byte tokenizer ids (hand-computed): pad 0, bos 1, eos 2, unk 3, byte b -> 4 + b, so
"a" (0x61 = 97) -> 101 and "b" -> 102; the tokenizer has 260 ids.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.data import jsonl, pipeline, tokenizers
from sleep_jax.data.tokenizers import TokenIdError, check_token_ids

A, B_ = 101, 102  # byte-tokenizer ids of "a" and "b"


@pytest.fixture(scope="module")
def byte_tok():
    return tokenizers.byte_level_tokenizer()


# ----------------------------------------------------------------------------- check_token_ids


@pytest.mark.parametrize("ids, vocab, bad, index", [
    ([3, 10, 4], 10, 10, 1),           # id == vocab
    ([0, 5, -1], 10, -1, 2),           # negative id (would wrap on the device)
    (np.array([[0, 1], [2, 99]]), 50, 99, (1, 1)),
    (7, 7, 7, None),                    # a scalar
])
def test_check_token_ids_refuses_out_of_range(ids, vocab, bad, index):
    with pytest.raises(TokenIdError) as info:
        check_token_ids(ids, vocab, where="my ids")
    e = info.value
    assert isinstance(e, ValueError)
    assert (e.token_id, e.vocab, e.index, e.where) == (bad, vocab, index, "my ids")
    msg = str(e)
    assert msg.startswith(f"my ids: token id {bad}")
    assert f"vocabulary of size {vocab}" in msg and f"0 <= id < {vocab}" in msg
    assert ("" if index is None else f"at index {index}") in msg


def test_check_token_ids_ragged_rows_name_the_row():
    with pytest.raises(TokenIdError, match=r"^batch\[1\]: token id 8 at index 2 .* size 8"):
        check_token_ids([[1, 2], [0, 7, 8]], 8, where="batch")


def test_check_token_ids_boundaries_pass():
    for ids in ([0], [9], [0, 9], np.arange(10), np.array([[0, 9]], np.int64), [], [[0], [9, 1]],
                0, 9, jnp.asarray([0, 9])):
        assert check_token_ids(ids, 10) is None


def test_check_token_ids_rejects_non_integers_and_bad_vocab():
    with pytest.raises(TypeError, match="must be integers, got dtype float"):
        check_token_ids([1.0, 2.0], 10)
    with pytest.raises(TypeError, match="dtype bool"):
        check_token_ids([True], 10)
    for vocab in (0, -3, True, 2.5, None):
        with pytest.raises(ValueError, match=rf"vocab must be a positive integer .*{vocab!r}"):
            check_token_ids([0], vocab)


def test_encode_batch_vocab(byte_tok):
    with pytest.raises(TokenIdError, match=rf"text 1 'ba': token id {B_} .* size {B_}"):
        tokenizers.encode_batch(byte_tok, ["a", "ba"], bos=1, eos=2, vocab=B_)
    got = tokenizers.encode_batch(byte_tok, ["a", "ba"], bos=1, eos=2, vocab=B_ + 1)
    assert [x.tolist() for x in got] == [[1, A, 2], [1, B_, A, 2]]
    with pytest.raises(TokenIdError, match="bos/eos ids: token id 2 at index 0 .* size 2"):
        tokenizers.encode_batch(byte_tok, ["a"], bos=2, vocab=2)


# ----------------------------------------------------------------------------- pipeline


def test_encode_refuses_ids_beyond_the_model_vocab(byte_tok):
    with pytest.raises(TokenIdError, match=rf"example 'ab': token id {B_} at index 2 .* size {B_}"):
        pipeline.Encode(byte_tok, 8, vocab=B_)("ab")
    # Boundary: "b" is vocab - 1 and pad/bos 0/1 are in range.
    seg = pipeline.Encode(byte_tok, 8, vocab=B_ + 1)("ab")
    assert seg["inputs"].tolist() == [1, A, B_]
    assert seg["targets"].tolist() == [A, B_, 2]
    # Special ids that do not fit are refused when the pipeline is built.
    with pytest.raises(TokenIdError, match=r"special ids .*token id 2 at index 1 .* size 2"):
        pipeline.Encode(byte_tok, 8, vocab=2)
    with pytest.raises(ValueError, match="vocab must be a positive integer"):
        pipeline.Encode(byte_tok, 8, vocab=0)


@pytest.mark.parametrize("pack", [True, False])
def test_make_dataset_refuses_ids_beyond_the_model_vocab(byte_tok, pack):
    kw = dict(seq_len=8, batch_size=1, shuffle=False, num_epochs=1, shard=(0, 1), pack=pack)
    with pytest.raises(TokenIdError, match=rf"example 'b': token id {B_} .* size {B_}"):
        list(pipeline.make_dataset(["a", "b"], byte_tok, vocab=B_, **kw))
    batches = list(pipeline.make_dataset(["a", "b"], byte_tok, vocab=B_ + 1, **kw))
    assert len(batches) == (1 if pack else 2)  # packed: both examples share one row
    real = lambda k: [int(x) for b in batches for x in b[k][b["mask"]]]
    assert real("inputs") == [1, A, 1, B_] and real("targets") == [A, 2, B_, 2]


def test_pad_batch_checks_ids_when_given_vocab():
    def seg(inputs, targets):
        return {"inputs": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32),
                "loss_mask": np.ones(len(inputs), np.int32)}

    with pytest.raises(TokenIdError, match=r"segment 1 inputs: token id -1 at index 0 .* size 5"):
        pipeline.pad_batch([seg([1, 2], [2, 3]), seg([-1], [4])], 3, vocab=5)
    with pytest.raises(TokenIdError, match=r"segment 0 targets: token id 5 at index 1 .* size 5"):
        pipeline.pad_batch([seg([1, 2], [2, 5])], 3, vocab=5)
    out = pipeline.pad_batch([seg([1, 4], [4, 0]), seg([0], [4])], 3, vocab=5)
    assert out["inputs"].tolist() == [[1, 4, 0], [0, 0, 0]]
    assert out["targets"].tolist() == [[4, 0, 0], [4, 0, 0]]
    assert out["mask"].tolist() == [[True, True, False], [True, False, False]]
    with pytest.raises(ValueError, match="segment 0 has 2 tokens > length 1"):
        pipeline.pad_batch([seg([1, 2], [2, 3])], 1)


# ----------------------------------------------------------------------------- JSONL


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
@pytest.mark.parametrize("kind, read", [("memories", jsonl.read_memories),
                                        ("probes", jsonl.read_probes),
                                        ("texts", jsonl.read_texts)])
def test_jsonl_file_with_no_records(tmp_path, content, kind, read):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text(content)
    with pytest.raises(jsonl.JsonlError) as info:
        read(path)
    assert str(info.value) == (f"{path}: {kind} file {str(path)!r} has no records (it is empty "
                               "or holds only blank lines; expected one JSON object per line)")
    assert info.value.line is None


def test_read_probes_against_no_memory_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"memory_id": "q1", "question": "Where?", "answers": ["Osk"]}\n')
    with pytest.raises(ValueError, match="memory_ids is empty"):
        jsonl.read_probes(path, memory_ids=set())
    assert jsonl.read_probes(path, memory_ids={"q1"}) == [jsonl.Probe("q1", "Where?", ("Osk",))]


def test_sleep_cli_names_the_empty_memories_file(tmp_path, capsys):
    from sleep_jax.distill.cli import main as sleep_main

    mem = tmp_path / "m.jsonl"
    mem.write_text("")
    probes = tmp_path / "p.jsonl"
    probes.write_text('{"memory_id": "q1", "question": "Where?", "answers": ["Osk"]}\n')
    rc = sleep_main(["--checkpoint", str(tmp_path / "nope"), "--memories", str(mem),
                     "--probes", str(probes), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"memories file {str(mem)!r} has no records" in err
    assert "unknown memory_id" not in err


# ----------------------------------------------------------------------------- probes


def test_encode_prompts_checks_ids(byte_tok):
    from sleep_jax.eval.probes import encode_prompts

    with pytest.raises(TokenIdError, match=rf"prompt 1 'ab': token id {B_} at index 2 .* {B_}"):
        encode_prompts(byte_tok, ["a", "ab"], bos_id=1, pad_id=0, vocab=B_)
    with pytest.raises(TokenIdError, match=rf"pad_id: token id {B_ + 1} .* size {B_ + 1}"):
        encode_prompts(byte_tok, ["a"], bos_id=1, pad_id=B_ + 1, vocab=B_ + 1)
    with pytest.raises(TokenIdError, match=r"bos_id: token id -1 .* size 260"):
        encode_prompts(byte_tok, ["a"], bos_id=-1, pad_id=0)  # default vocab: the tokenizer's
    tokens, lengths = encode_prompts(byte_tok, ["a", "ab"], bos_id=1, pad_id=B_, vocab=B_ + 1)
    assert tokens.shape == (2, 16) and lengths.tolist() == [2, 3]
    assert tokens[0, :3].tolist() == [1, A, B_] and tokens[1, :4].tolist() == [1, A, B_, B_]
    with pytest.raises(ValueError, match="no prompts"):
        encode_prompts(byte_tok, [], bos_id=1, pad_id=0)


def _small_model(vocab):
    from sleep_jax.models import ModelConfig, create_model

    return create_model(ModelConfig(vocab=vocab, embed=16, mlp=32, layers=1, heads=2,
                                    kv_heads=2, head_dim=8, max_seq_len=32), seed=0)


def test_probe_answers_refuse_ids_beyond_the_model_vocab(byte_tok):
    from sleep_jax.eval import probes

    small = _small_model(B_)  # "b" (102) does not fit
    with pytest.raises(TokenIdError, match=rf"prompt 0 'b': token id {B_} at index 1 .* {B_}"):
        probes.answer(small, byte_tok, ["b"], bos_id=1, eos_id=2)
    with pytest.raises(TokenIdError, match=rf"eos_id: token id {B_} .* size {B_}"):
        probes.answer(small, byte_tok, ["a"], bos_id=1, eos_id=B_)
    with pytest.raises(TokenIdError, match=rf"token id {B_} .* size {B_}"):
        probes.kl_to_base(small, small, byte_tok, ["ab"], bos_id=1)


def test_probe_answer_at_the_boundary_matches_argmax(byte_tok):
    from sleep_jax.eval import probes

    model = _small_model(B_ + 1)  # "b" = vocab - 1, pad 0: both in range
    (got,) = probes.answer(model, byte_tok, ["b"], bos_id=1, eos_id=2, max_new_tokens=1)
    logits = model(jnp.asarray([[1, B_]]), jnp.arange(2)[None])[0]
    nxt = int(jnp.argmax(logits[0, -1]))
    assert got == ("" if nxt == 2 else byte_tok.decode([nxt]))


# ----------------------------------------------------------------------------- CLI prompts


def test_cli_prompt_and_completion_ids_checked(byte_tok):
    from sleep_jax.models.cli import encode_completion, encode_prompt

    tokens = {"bos_id": 1, "add_bos": True}
    with pytest.raises(TokenIdError, match=rf"--prompt: token id {B_} at index 2 .* size {B_}"):
        encode_prompt(byte_tok, "ab", tokens, chat=False, vocab=B_)
    assert encode_prompt(byte_tok, "ab", tokens, chat=False, vocab=B_ + 1) == [1, A, B_]
    with pytest.raises(TokenIdError, match=rf"--completion: token id {B_} .* size {B_}"):
        encode_completion(byte_tok, "b", vocab=B_)
    assert encode_completion(byte_tok, "ba", vocab=B_ + 1) == [B_, A]
    with pytest.raises(ValueError, match="--completion encodes to zero tokens"):
        encode_completion(byte_tok, "")


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_with_a_tokenizer_larger_than_vocab_is_refused(tmp_path, byte_tok, capsys):
    from sleep_jax.models.checkpoint_dir import CheckpointError, load_checkpoint, save_checkpoint
    from sleep_jax.models.cli import generate_main, score_main

    model = _small_model(64)
    with pytest.raises(CheckpointError, match=r"tokenizer has 260 tokens .* config.vocab=64"):
        save_checkpoint(tmp_path / "refused", model, byte_tok)
    assert not (tmp_path / "refused").exists()
    d = tmp_path / "ckpt"
    save_checkpoint(d, model)  # then a tokenizer too large for the model is put next to it
    byte_tok.save(str(d / "tokenizer.json"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(d)
    msg = str(info.value)
    assert msg.startswith(str(d / "tokenizer.json"))
    assert "the tokenizer has 260 tokens (ids 0..259)" in msg and "config.vocab=64" in msg
    for main, extra in ((generate_main, []), (score_main, ["--completion", "b"])):
        assert main(["--checkpoint", str(d), "--prompt", "a", *extra]) == 2
        err = capsys.readouterr().err
        assert "260 tokens" in err and "config.vocab=64" in err


@pytest.mark.parametrize("vocab", [260, 300])  # equal, and a padded model vocabulary
def test_checkpoint_tokenizer_that_fits_loads(tmp_path, byte_tok, vocab):
    from sleep_jax.models.checkpoint_dir import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "c", _small_model(vocab), byte_tok)
    model, tok, meta = load_checkpoint(tmp_path / "c")
    assert model.config.vocab == vocab and tok.get_vocab_size() == 260
    assert meta["tokens"]["eos_id"] == 2


def test_checkpoint_special_ids_beyond_vocab_refused(tmp_path):
    from sleep_jax.models.checkpoint_dir import CheckpointError, load_checkpoint, save_checkpoint

    model = _small_model(64)
    with pytest.raises(CheckpointError, match=r"tokens.eos_id=64 is outside .*model.vocab=64"):
        save_checkpoint(tmp_path / "a", model, tokens={"eos_id": 64})
    d = save_checkpoint(tmp_path / "b", model, tokens={"eos_id": 63, "bos_id": 0})
    assert load_checkpoint(d)[2]["tokens"]["eos_id"] == 63  # vocab - 1 passes
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg["tokens"]["bos_id"] = 64
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"config.json: tokens.bos_id=64 is outside .*=64"):
        load_checkpoint(d)


def test_checkpoint_json_files_go_through_atomic(tmp_path, byte_tok, monkeypatch):
    from sleep_jax import atomic
    from sleep_jax.models import checkpoint_dir

    written = []
    for name in ("write_json", "write_text"):
        real = getattr(atomic, name)
        monkeypatch.setattr(checkpoint_dir, name,
                            lambda path, *a, _real=real, **k: written.append(
                                os.path.basename(path)) or _real(path, *a, **k))
    d = checkpoint_dir.save_checkpoint(tmp_path / "c", _small_model(260), byte_tok)
    assert sorted(written) == ["config.json", "tokenizer.json"]
    text = open(os.path.join(d, "tokenizer.json")).read()
    assert text == byte_tok.to_str(pretty=True)
    assert [n for n in os.listdir(d) if n.endswith(".tmp")] == []
    assert json.load(open(os.path.join(d, "config.json")))["model"]["vocab"] == 260


def test_device_would_not_have_refused():
    """Why the host checks exist: on the device an id >= vocab gives NaN logits (no error)."""
    model = _small_model(8)
    assert not bool(jnp.isnan(model(jnp.asarray([[7, 1]]), jnp.arange(2)[None])[0]).any())
    logits = model(jnp.asarray([[8, 1]]), jnp.arange(2)[None])[0]
    assert bool(jnp.isnan(logits).all())  # the whole row, not only the bad position


def test_pad_rows_by_hand():
    from sleep_jax.data.tokenizers import pad_rows

    toks, lens = pad_rows([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(toks, [[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(lens, [3, 1])
    toks, _ = pad_rows([[1, 2, 3]], pad_id=9, multiple=4)
    np.testing.assert_array_equal(toks, [[1, 2, 3, 9]])
    assert toks.dtype == np.int32 and pad_rows([[1]], width=2)[0].shape == (1, 2)
    with pytest.raises(ValueError, match="prompt 1 has 3 tokens; allowed 0..2"):
        pad_rows([[1], [1, 2, 3]], width=2, where="prompt")
    with pytest.raises(ValueError, match="row 0 has 0 tokens; allowed 1..1"):
        pad_rows([[]], width=1, min_len=1)
