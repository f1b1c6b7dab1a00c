"""Tests for sleep_jax.data: tokenizers, JSONL readers/writers, grain pipeline, tfds source."""

import dataclasses
import json
import logging
import os

import numpy as np
import pytest

from sleep_jax.data import jsonl, pipeline, tokenizers
from sleep_jax.data.pipeline import make_dataset, make_iterator

BOS, EOS = 1, 2  # DEFAULT_SPECIALS order: pad, bos, eos, unk


def byte_ids(text):
    """Independent reference for the byte tokenizer: id = 4 + UTF-8 byte."""
    return [4 + b for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def byte_tok():
    return tokenizers.byte_level_tokenizer()


# ----------------------------------------------------------------------------------------------
# Tokenizers

def test_word_level_round_trip_and_ids(tmp_path):
    corpus = ["Where does Ada Vell live?", "Ada Vell lives in Porto.", "Hello, world! It's 1999.",
              "line one\nline two"]
    tok = tokenizers.word_level_tokenizer(corpus)
    for text in corpus:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert tokenizers.special_ids(tok) == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    # ".", "Ada" and "Vell" occur twice (most frequent; ties in code-point order) -> ids 4, 5, 6.
    assert [tok.token_to_id(t) for t in (".", "\u2581Ada", "\u2581Vell")] == [4, 5, 6]
    assert tok.encode("Ada Zorp", add_special_tokens=False).ids == [5, 3]
    # The same corpus gives the same vocabulary; save/load keeps the ids.
    assert tokenizers.word_level_tokenizer(corpus).get_vocab() == tok.get_vocab()
    loaded = tokenizers.load_tokenizer(tokenizers.save_tokenizer(tok, tmp_path / "tok"))
    assert os.path.isfile(tmp_path / "tok" / "tokenizer.json")
    assert loaded.encode(corpus[1]).ids == tok.encode(corpus[1]).ids
    lower = tokenizers.word_level_tokenizer(corpus, lowercase=True)
    assert lower.decode(lower.encode("ADA vell").ids) == "ada vell"


def test_byte_level_tokenizer(byte_tok, tmp_path):
    text = "héllo wörld\n  ok?"
    ids = byte_tok.encode(text, add_special_tokens=False).ids
    assert ids == byte_ids(text)
    assert byte_tok.decode(ids) == text
    assert byte_tok.get_vocab_size() == 260
    got = tokenizers.encode_batch(byte_tok, ["ab", ""], bos=BOS, eos=EOS)
    assert [g.tolist() for g in got] == [[BOS, 101, 102, EOS], [BOS, EOS]]
    assert got[0].dtype == np.int32
    with pytest.raises(ValueError, match="<s>"):
        tokenizers.special_ids(byte_tok, ("<s>", "<bos>", "<eos>", "<unk>"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizers.load_tokenizer(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# Pipeline

def batches(ds):
    return [{k: v.copy() for k, v in b.items()} for b in ds]


def check_dtypes(batch, shape):
    for k in ("inputs", "targets", "positions", "segment_ids"):
        assert batch[k].dtype == np.int32 and batch[k].shape == shape, k
    for k in ("mask", "loss_mask"):
        assert batch[k].dtype == bool and batch[k].shape == shape, k


def test_packing_hand_made(byte_tok):
    # seqs: [bos a b eos] (3 steps), [bos c d e eos] (4), [bos f eos] (2); T = 8, one row per batch:
    # row 1 holds the first two (3 + 4 = 7 <= 8), the third does not fit and starts row 2.
    a, b, c, d, e, f = (4 + ord(ch) for ch in "abcdef")
    ds = make_dataset(["ab", "cde", "f"], byte_tok, seq_len=8, batch_size=1, shuffle=False,
                      num_epochs=1, drop_remainder=False, shard=(0, 1))
    got = batches(ds)
    assert len(got) == 2
    check_dtypes(got[0], (1, 8))
    expect = [
        dict(inputs=[BOS, a, b, BOS, c, d, e, 0], targets=[a, b, EOS, c, d, e, EOS, 0],
             segment_ids=[1, 1, 1, 2, 2, 2, 2, 0], positions=[0, 1, 2, 0, 1, 2, 3, 0],
             mask=[1, 1, 1, 1, 1, 1, 1, 0], loss_mask=[1, 1, 1, 1, 1, 1, 1, 0]),
        dict(inputs=[BOS, f, 0, 0, 0, 0, 0, 0], targets=[f, EOS, 0, 0, 0, 0, 0, 0],
             segment_ids=[1, 1, 0, 0, 0, 0, 0, 0], positions=[0, 1, 0, 0, 0, 0, 0, 0],
             mask=[1, 1, 0, 0, 0, 0, 0, 0], loss_mask=[1, 1, 0, 0, 0, 0, 0, 0]),
    ]
    for batch, want in zip(got, expect):
        for k, v in want.items():
            np.testing.assert_array_equal(batch[k][0], np.asarray(v).astype(batch[k].dtype), k)


def segments_of(batch):
    """Splits packed rows into (inputs, targets, loss_mask, positions) per segment."""
    out = []
    for row in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert np.all(np.diff(idx) == 1), "a segment must be contiguous"
            out.append(tuple(batch[k][row, idx] for k in ("inputs", "targets", "loss_mask",
                                                           "positions")))
        assert not batch["mask"][row, seg == 0].any() and batch["mask"][row, seg > 0].all()
    return out


def test_packing_holds_every_example_once(byte_tok):
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdefgh"), size=rng.integers(1, 12))) + str(i)
             for i in range(40)]
    ds = make_dataset(texts, byte_tok, seq_len=16, batch_size=4, seed=3, num_epochs=1,
                      drop_remainder=False, shard=(0, 1))
    got = batches(ds)
    check_dtypes(got[0], (4, 16))
    segs = [s for b in got for s in segments_of(b)]
    seen = []
    for inputs, targets, loss_mask, positions in segs:
        seq = [*inputs.tolist(), targets[-1]]
        assert seq[0] == BOS and seq[-1] == EOS
        np.testing.assert_array_equal(targets[:-1], inputs[1:])  # targets are inputs shifted
        np.testing.assert_array_equal(positions, np.arange(len(inputs)))
        assert loss_mask.all()
        seen.append(bytes(t - 4 for t in seq[1:-1]).decode())
    assert sorted(seen) == sorted(texts)
    assert seen != texts  # shuffled
    # Rows are well filled: first-fit over 4 bins.
    fill = np.mean([b["mask"].mean() for b in got[:-1]])
    assert fill > 0.6, fill


def test_completion_only_loss_mask():
    tok = tokenizers.word_level_tokenizer(["Where does Ada live ? Porto", "Ada Vell"])
    ids = {w: tok.token_to_id("\u2581" + w) for w in ["Where", "does", "Ada", "live", "Porto"]}
    q = tok.token_to_id("?")
    examples = [("Where does Ada live?", "Porto"), "Ada"]
    ds = make_dataset(examples, tok, seq_len=8, batch_size=2, shuffle=False, pack=False,
                      num_epochs=1, shard=(0, 1))
    (batch,) = batches(ds)
    check_dtypes(batch, (2, 8))
    # seq = [bos Where does Ada live ? Porto eos]; the loss sees only "Porto" and eos.
    seq = [BOS, ids["Where"], ids["does"], ids["Ada"], ids["live"], q, ids["Porto"], EOS]
    np.testing.assert_array_equal(batch["inputs"][0], seq[:-1] + [0])
    np.testing.assert_array_equal(batch["targets"][0], seq[1:] + [0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(batch["mask"][0], [1] * 7 + [0])
    # A plain text: loss on every real target.
    np.testing.assert_array_equal(batch["loss_mask"][1], [1, 1, 0, 0, 0, 0, 0, 0])
    # Packing keeps the prompt masked out too.
    (packed,) = batches(make_dataset(examples, tok, seq_len=12, batch_size=1, shuffle=False,
                                     num_epochs=1, shard=(0, 1)))
    np.testing.assert_array_equal(packed["loss_mask"][0],
                                  [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(packed["segment_ids"][0],
                                  [1, 1, 1, 1, 1, 1, 1, 2, 2, 0, 0, 0])


def test_padding_and_buckets(byte_tok):
    ds = make_dataset(["abc", "d", "efghij", "k"], byte_tok, seq_len=10, batch_size=2,
                      shuffle=False, pack=False, num_epochs=1, buckets=(4, 6), shard=(0, 1),
                      add_bos=False)
    got = batches(ds)
    # Batch 1: "abc" -> 3 steps, "d" -> 1 step: bucket 4. Batch 2: "efghij" -> 6: bucket 6.
    assert [b["inputs"].shape for b in got] == [(2, 4), (2, 6)]
    check_dtypes(got[0], (2, 4))
    a, b_, c, d = (4 + ord(ch) for ch in "abcd")
    np.testing.assert_array_equal(got[0]["inputs"], [[a, b_, c, 0], [d, 0, 0, 0]])
    np.testing.assert_array_equal(got[0]["targets"], [[b_, c, EOS, 0], [EOS, 0, 0, 0]])
    np.testing.assert_array_equal(got[0]["positions"], [[0, 1, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(got[0]["segment_ids"], [[1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(got[0]["loss_mask"], got[0]["mask"])
    np.testing.assert_array_equal(got[1]["mask"].sum(1), [6, 1])


def test_shards_disjoint_and_complete(byte_tok):
    texts = [f"t{i}" for i in range(11)]
    per_shard = []
    for index in range(3):
        ds = make_dataset(texts, byte_tok, seq_len=4, batch_size=1, seed=7, pack=False,
                          num_epochs=1, shard=(index, 3))
        per_shard.append({bytes(t - 4 for t in b["inputs"][0, 1:b["mask"][0].sum()]).decode()
                          for b in ds})
    assert [len(s) for s in per_shard] == [4, 4, 3]
    assert set().union(*per_shard) == set(texts)
    assert sum(len(s) for s in per_shard) == len(texts)  # disjoint
    # The default shard is this process: one process here.
    default = make_dataset(texts, byte_tok, seq_len=4, batch_size=1, seed=7, pack=False,
                           num_epochs=1)
    assert len(batches(default)) == len(texts)


@pytest.mark.parametrize("pack", [True, False])
def test_iterator_resume_is_exact(byte_tok, pack):
    texts = [f"example {i} " + "x" * (i % 7) for i in range(13)]
    ds = make_dataset(texts, byte_tok, seq_len=24, batch_size=3, seed=5, pack=pack,
                      num_epochs=None, shard=(0, 1))
    it = make_iterator(ds)
    for _ in range(4):
        next(it)
    state = it.get_state()
    state = json.loads(json.dumps(state))  # the state is plain JSON (what a checkpoint stores)
    # Enough batches to cross several epoch boundaries.
    want = [next(it) for _ in range(12)]
    resumed = make_iterator(make_dataset(texts, byte_tok, seq_len=24, batch_size=3, seed=5,
                                         pack=pack, num_epochs=None, shard=(0, 1)))
    resumed.set_state(state)
    got = [next(resumed) for _ in range(12)]
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k in w:
            np.testing.assert_array_equal(w[k], g[k], k)
    # And the batches do differ from a fresh start (the test could fail).
    fresh = next(make_iterator(ds))
    assert not np.array_equal(fresh["inputs"], want[0]["inputs"])


def test_epochs_reshuffle_and_count(byte_tok):
    texts = [f"t{i}" for i in range(8)]
    ds = make_dataset(texts, byte_tok, seq_len=4, batch_size=8, seed=1, pack=False,
                      num_epochs=2, shard=(0, 1))
    got = batches(ds)
    assert len(got) == 2
    e1, e2 = (b["inputs"][:, 1:3].tolist() for b in got)
    assert sorted(e1) == sorted(e2) and e1 != e2


def test_too_long_truncate_or_error(byte_tok, caplog):
    texts = ["abcdefghij", "ab"]
    with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
        (batch,) = batches(make_dataset(texts, byte_tok, seq_len=5, batch_size=2, shuffle=False,
                                        pack=False, num_epochs=1, shard=(0, 1)))
    assert "truncated 1 example(s)" in caplog.text
    np.testing.assert_array_equal(batch["inputs"][0], [BOS] + byte_ids("abcd"))
    np.testing.assert_array_equal(batch["targets"][0], byte_ids("abcde"))  # eos was cut
    encode = pipeline.Encode(byte_tok, 5, too_long="truncate")
    for text in texts + texts:
        encode(text)
    assert encode.num_truncated == 2
    with pytest.raises(ValueError, match="exceeds seq_len=5"):
        batches(make_dataset(texts, byte_tok, seq_len=5, batch_size=2, shuffle=False,
                             pack=False, num_epochs=1, shard=(0, 1), too_long="error"))
    with pytest.raises(ValueError, match="too_long"):
        pipeline.Encode(byte_tok, 5, too_long="drop")


# ----------------------------------------------------------------------------------------------
# JSONL

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_read_good_files(tmp_path):
    mem = write_lines(tmp_path / "m.jsonl", ['{"id": "m1", "text": "Ada lives in Porto."}', "",
                                             '{"id": "m2", "text": "B.", "source": "extra"}'])
    memories = jsonl.read_memories(mem)
    assert memories == [jsonl.Memory("m1", "Ada lives in Porto."), jsonl.Memory("m2", "B.")]
    probes = jsonl.read_probes(write_lines(tmp_path / "p.jsonl", [
        '{"memory_id": "m1", "question": "Where?", "answers": ["Porto", "porto"]}']),
        memory_ids=[m.id for m in memories])
    assert probes == [jsonl.Probe("m1", "Where?", ("Porto", "porto"))]
    texts = jsonl.read_texts(write_lines(tmp_path / "t.jsonl", ['{"text": "héllo"}']))
    assert texts == [jsonl.Text("héllo")]
    with pytest.raises(dataclasses.FrozenInstanceError):
        texts[0].text = "x"
    # Round trip through the writer.
    assert jsonl.write_jsonl(tmp_path / "out" / "m.jsonl", memories) == 2
    assert jsonl.read_memories(tmp_path / "out" / "m.jsonl") == memories


GOOD_M = '{"id": "m1", "text": "x"}'
GOOD_P = '{"memory_id": "m1", "question": "q?", "answers": ["a"]}'


@pytest.mark.parametrize("reader,lines,match", [
    ("memories", [GOOD_M, '{"id": "m2", "text": "x"'], "invalid JSON"),
    ("memories", [GOOD_M, '["m2", "x"]'], "expected a JSON object, got list"),
    ("memories", [GOOD_M, '{"id": "m2"}'], "missing key 'text'"),
    ("memories", [GOOD_M, '{"id": 2, "text": "x"}'], "key 'id' must be a str, got int"),
    ("memories", [GOOD_M, '{"id": "m2", "text": "  "}'], "key 'text' is empty"),
    ("memories", [GOOD_M, '{"id": "m1", "text": "y"}'], "duplicate id 'm1' .*line 1"),
    ("probes", [GOOD_P, '{"memory_id": "m1", "question": "q?", "answers": []}'],
     "'answers' is an empty list"),
    ("probes", [GOOD_P, '{"memory_id": "m1", "question": "q?", "answers": "a"}'],
     "key 'answers' must be a list, got str"),
    ("probes", [GOOD_P, '{"memory_id": "m1", "question": "q?", "answers": ["a", 3]}'],
     r"answers\[1\] must be a non-empty string"),
    ("probes", [GOOD_P, '{"memory_id": "m9", "question": "q?", "answers": ["a"]}'],
     "unknown memory_id 'm9'"),
    ("texts", ['{"text": "a"}', '{"txt": "b"}'], "missing key 'text'"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, reader, lines, match):
    path = write_lines(tmp_path / f"{reader}.jsonl", lines)
    read = {"memories": jsonl.read_memories,
            "probes": lambda p: jsonl.read_probes(p, memory_ids={"m1"}),
            "texts": jsonl.read_texts}[reader]
    with pytest.raises(jsonl.JsonlError, match=match) as info:
        read(path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert info.value.line == 2 and info.value.path == str(path)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        jsonl.read_texts(tmp_path / "nope.jsonl")


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "texts.jsonl"
    jsonl.write_jsonl(path, [{"text": "old"}])

    def records():
        yield jsonl.Text("new 1")
        yield jsonl.Text("new 2")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        jsonl.write_jsonl(path, records())
    assert jsonl.read_texts(path) == [jsonl.Text("old")]  # untouched
    assert os.listdir(tmp_path) == ["texts.jsonl"]  # no temporary file left behind
    with pytest.raises(RuntimeError):
        jsonl.write_jsonl(tmp_path / "fresh.jsonl", records())
    assert not (tmp_path / "fresh.jsonl").exists()
    with pytest.raises(TypeError, match="dataclasses or mappings"):
        jsonl.write_jsonl(tmp_path / "bad.jsonl", ["a string"])
    assert os.listdir(tmp_path) == ["texts.jsonl"]


# ----------------------------------------------------------------------------------------------
# tfds (array_record, no TensorFlow)

def test_tfds_array_record_round_trip(tmp_path, byte_tok):
    import sys

    from sleep_jax.data import tfds_source

    texts = [f"passage {i}: " + "é" * (i % 3) for i in range(9)]
    directory = tfds_source.build_text_dataset({"train": texts, "test": ["held out"]},
                                               tmp_path / "tfds")
    source = tfds_source.tfds_text_source(directory)
    assert len(source) == 9 and list(source) == texts and source[-1] == texts[-1]
    by_name = tfds_source.tfds_text_source("sleep_jax_texts", split="test",
                                           data_dir=tmp_path / "tfds")
    assert list(by_name) == ["held out"]
    assert "tensorflow" not in sys.modules
    # Feed the pipeline straight from the data source.
    ds = make_dataset(source, byte_tok, seq_len=32, batch_size=3, pack=False, shuffle=False,
                      num_epochs=1, shard=(0, 1))
    got = batches(ds)
    first = got[0]["inputs"][0, 1:first_len(got[0])]
    assert bytes(t - 4 for t in first).decode() == texts[0]
    with pytest.raises(FileExistsError, match="overwrite"):
        tfds_source.build_text_dataset(["x"], tmp_path / "tfds")
    tfds_source.build_text_dataset(["x"], tmp_path / "tfds", overwrite=True)
    assert list(tfds_source.tfds_text_source(directory)) == ["x"]
    with pytest.raises(FileNotFoundError, match="array_record"):
        tfds_source.tfds_text_source("no_such_dataset", data_dir=tmp_path / "tfds")


def first_len(batch):
    return int(batch["mask"][0].sum())


def test_examples_as_mappings_and_records(byte_tok):
    rows = [{"text": b"ab"}, {"prompt": "q", "completion": "a"}, jsonl.Memory("m", "cd")]
    enc = pipeline.Encode(byte_tok, 8)
    got = [enc(r) for r in rows]
    assert got[0]["inputs"].tolist() == [BOS] + byte_ids("ab")
    assert got[1]["loss_mask"].tolist() == [0, 1, 1]
    assert got[2]["targets"].tolist() == byte_ids("cd") + [EOS]
    with pytest.raises(TypeError, match="an example must be"):
        enc(3)
