"""The checkpoint directory format: bitwise round trip, restore onto a mesh's shards, atomic
overwrite that keeps train/, and one clear error (naming the offending value) per bad input."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from sleep_jax.data.tokenizers import byte_level_tokenizer
from sleep_jax.mesh import make_mesh
from sleep_jax.models import ModelConfig, RopeScaling, create_model, state_shardings
from sleep_jax.models.checkpoint_dir import (
    CheckpointError,
    load_checkpoint,
    read_config,
    save_checkpoint,
)

CFG = ModelConfig(vocab=260, embed=32, mlp=64, layers=2, heads=4, kv_heads=4, head_dim=8,
                  rope_scaling=RopeScaling(4.0, 1.0, 4.0, 16), norm_eps=1e-6,
                  tie_embeddings=False, expert_slots=2, expert_rank=4, max_seq_len=64)


def _leaves(model):
    return jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = create_model(CFG, seed=3)
    # Give the non-trainable slot mask and zero-initialised expert_b values worth checking.
    model.blocks.expert_mask[...] = jax.numpy.asarray([[1.0, 0.0], [0.0, 1.0]])
    model.blocks.expert_b[...] = jax.random.normal(jax.random.key(1), model.blocks.expert_b.shape)
    tok = byte_level_tokenizer()
    d = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(d, model, tok, extra={"source": "unit test"})
    return d, model, tok


def test_round_trip_is_bitwise(saved):
    d, model, tok = saved
    assert sorted(os.listdir(d)) == ["config.json", "params", "tokenizer.json"]
    loaded, tok2, meta = load_checkpoint(d)
    assert loaded.config == CFG
    a, b = _leaves(model), _leaves(loaded)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), path
    text = "héllo <eos> wörld"
    assert tok2.encode(text).ids == tok.encode(text).ids
    # Special ids inferred from the tokenizer's spellings (pad, bos, eos, unk = 0..3).
    assert meta["tokens"] == {"bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 3,
                              "add_bos": False, "chat_template": None}
    assert meta["extra"] == {"source": "unit test"}
    tokens = jax.numpy.asarray([[5, 9, 200, 7]])
    pos = jax.numpy.arange(4)[None]
    np.testing.assert_array_equal(np.asarray(loaded(tokens, pos)[0]),
                                  np.asarray(model(tokens, pos)[0]))


def test_load_onto_mesh_puts_params_on_their_shards(saved):
    d, model, _ = saved
    mesh = make_mesh("fsdp=2,tensor=4")
    loaded, _, _ = load_checkpoint(d, mesh=mesh)
    want = jax.tree.leaves(state_shardings(nnx.state(loaded), mesh))
    got = jax.tree.leaves(nnx.state(loaded))
    assert len(want) == len(got) == len(_leaves(model))
    for s, x in zip(want, got):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    # Hand-checked shard shapes: q [L,D,N,H] = [2,32,4,8] -> embed/fsdp=2, heads/tensor=4.
    q = loaded.blocks.q[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 1, 8)}
    np.testing.assert_array_equal(np.asarray(q), np.asarray(model.blocks.q[...]))
    unembed = loaded.unembed[...]  # [D,V] = [32,260]: vocab 260 % 4 == 0 -> tensor
    assert {s.data.shape for s in unembed.addressable_shards} == {(16, 65)}


def test_load_with_dtype_casts(saved):
    d, model, _ = saved
    loaded, _, _ = load_checkpoint(d, dtype="bfloat16")
    assert loaded.config.param_dtype == "bfloat16"
    assert loaded.blocks.up[...].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(loaded.embed[...]),
                                  np.asarray(model.embed[...].astype(jax.numpy.bfloat16)))


def test_overwrite_is_atomic_and_keeps_train(tmp_path):
    model = create_model(CFG.replace(expert_slots=0), seed=0)
    d = tmp_path / "ck"
    save_checkpoint(d, model)
    os.makedirs(d / "train" / "7")
    (d / "train" / "7" / "marker").write_text("kept")
    model2 = create_model(CFG.replace(expert_slots=0, layers=3), seed=1)
    save_checkpoint(d, model2, extra={"v": 2})
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp or trash directory left behind
    assert (d / "train" / "7" / "marker").read_text() == "kept"
    loaded, tok, meta = load_checkpoint(d)
    assert loaded.config.layers == 3 and tok is None and meta["extra"] == {"v": 2}


# ----------------------------------------------------------------------------- errors


@pytest.fixture()
def copy(saved, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(saved[0], d)
    return d


def _edit_config(d, fn):
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def test_missing_directory_and_files(tmp_path, copy):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "empty")
    import shutil

    shutil.rmtree(copy / "params")
    with pytest.raises(FileNotFoundError, match="params"):
        load_checkpoint(copy)


def test_malformed_config_names_the_field(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(copy)
    (copy / "config.json").write_text(json.dumps({"format_version": 1, "model": {}}))
    _edit_config(copy, lambda c: c.update(format_version=7))
    with pytest.raises(CheckpointError, match="format_version=7"):
        read_config(copy)
    (copy / "config.json").write_text(json.dumps({"format_version": 1, "model": "x"}))
    with pytest.raises(CheckpointError, match="'model'"):
        read_config(copy)
    (copy / "config.json").write_text(json.dumps({"format_version": 1,
                                                  "model": {"heads": 3, "kv_heads": 2}}))
    with pytest.raises(CheckpointError, match="heads=3"):
        read_config(copy)
    (copy / "config.json").write_text(json.dumps({"format_version": 1,
                                                  "model": {"layerz": 2}}))
    with pytest.raises(CheckpointError, match="layerz"):
        read_config(copy)
    (copy / "config.json").write_text(json.dumps({"format_version": 1, "model": {},
                                                  "tokens": {"eos_id": "x"}}))
    with pytest.raises(CheckpointError, match="eos_id='x'"):
        read_config(copy)
    (copy / "config.json").write_text(json.dumps({"format_version": 1, "model": {},
                                                  "architecture": "gpt2"}))
    with pytest.raises(CheckpointError, match="'gpt2'"):
        read_config(copy)


def test_shape_mismatch_names_param_and_shapes(copy):
    _edit_config(copy, lambda c: c["model"].update(mlp=48))
    with pytest.raises(CheckpointError, match=r"'blocks\.down' has shape \(2, 64, 32\) but the "
                                              r"config expects \(2, 48, 32\)"):
        load_checkpoint(copy)


def test_missing_param_is_named(copy):
    _edit_config(copy, lambda c: c["model"].update(expert_slots=0))
    with pytest.raises(CheckpointError, match="expert_a"):
        load_checkpoint(copy)


def test_save_rejects_bad_inputs(tmp_path):
    model = create_model(CFG.replace(expert_slots=0), seed=0)
    with pytest.raises(CheckpointError, match="eos_idd"):
        save_checkpoint(tmp_path / "a", model, tokens={"eos_idd": 1})
    with pytest.raises(TypeError, match="set"):
        save_checkpoint(tmp_path / "b", model, extra={"bad": {1, 2}})
    with pytest.raises(TypeError, match="dict"):
        save_checkpoint(tmp_path / "c", {"not": "a model"})
    assert os.listdir(tmp_path) == []
