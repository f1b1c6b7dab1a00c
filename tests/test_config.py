"""Config files, overrides, the run folder's config.json, and the train CLI's error messages."""

import json
import os

import pytest

from sleep_jax.config import (
    ConfigError,
    apply_override,
    config_diff,
    load_config_file,
    model_config,
    optim_config,
    parse_config_args,
    train_config,
    write_run_config,
)
from sleep_jax.train.optim import OptimConfig
from sleep_jax.train.trainer import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "configs", "train.py")


def _cfg(*overrides):
    return parse_config_args(["--config", f"{TRAIN_PY}:tiny", *overrides])[0]


def test_presets_and_typed_views():
    c = _cfg()
    assert train_config(c) == TrainConfig(**dict(c.train))
    assert optim_config(c) == OptimConfig(**dict(c.optim))
    m = model_config(c)
    assert (m.vocab, m.layers, m.embed) == (256, 2, 64)
    big = load_config_file(f"{TRAIN_PY}:llama_8b")
    mb = model_config(big)
    assert (mb.layers, mb.dtype, mb.remat, mb.rope_scaling.factor) == (32, "bfloat16", "full", 8.0)


def test_overrides_are_typed():
    c, rest = parse_config_args(["--config", f"{TRAIN_PY}:tiny", "--config.train.steps=7",
                                 "--config.optim.lr", "1", "--config.train.async_checkpoints=false",
                                 "--config.model.remat=dots", "--workdir", "w"])
    assert rest == ["--workdir", "w"]
    assert c.train.steps == 7 and isinstance(c.train.steps, int)
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.train.async_checkpoints is False
    assert model_config(c).remat == "dots"


def test_unknown_key_names_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'.*allowed: .*steps"):
        _cfg("--config.train.stepz=5")
    with pytest.raises(ConfigError, match=r"no 'trian' under <top level>; allowed: data, mesh"):
        _cfg("--config.trian.steps=5")


def test_wrong_type_names_type():
    with pytest.raises(ConfigError, match=r"train.steps='abc'.*type int"):
        _cfg("--config.train.steps=abc")
    with pytest.raises(ConfigError, match=r"async_checkpoints='maybe'.*true/false"):
        _cfg("--config.train.async_checkpoints=maybe")


def test_bad_value_names_allowed_values():
    with pytest.raises(ConfigError, match=r"remat='sometimes'; allowed: none, full, dots"):
        model_config(_cfg("--config.model.remat=sometimes"))


def test_missing_config_file():
    with pytest.raises(ConfigError, match=r"config file 'nope/train.py' not found"):
        parse_config_args(["--config", "nope/train.py:tiny"])


def test_changed_config_refused_with_diff(tmp_path):
    write_run_config(str(tmp_path), _cfg())
    write_run_config(str(tmp_path), _cfg())  # the same config resumes
    with pytest.raises(ConfigError, match=r"train.steps: 200 -> 50(.|\n)*--allow_config_change"):
        write_run_config(str(tmp_path), _cfg("--config.train.steps=50"))
    write_run_config(str(tmp_path), _cfg("--config.train.steps=50"), allow_change=True)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["train"]["steps"] == 50
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["  a.c: '<absent>' -> 2"]


def test_override_section_is_an_error():
    c = _cfg()
    with pytest.raises(ConfigError, match=r"names a section; set one of its keys"):
        apply_override(c, "train", "3")


def test_cli_errors(tmp_path, capsys):
    from sleep_jax.train.cli import main

    w = str(tmp_path / "run")
    base = ["--config", f"{TRAIN_PY}:tiny", "--workdir", w]
    assert main(base + ["--config.data.source=jsonl", "--config.data.path=/no/such.jsonl"]) == 2
    assert "data file '/no/such.jsonl' not found" in capsys.readouterr().err
    assert not os.path.exists(w)  # nothing written on bad input
    assert main(base + ["--config.train.bogus=1"]) == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err
    assert main(base + ["--config.data.source=web"]) == 2
    assert "data.source='web'; allowed: builtin, jsonl, tfds" in capsys.readouterr().err
