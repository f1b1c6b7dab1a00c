"""Config files, overrides, the run folder's config.json, and the train CLI's error messages."""

import json
import os

import pytest

from sleep_jax.config import (
    ConfigError,
    Flag,
    config_diff,
    from_section,
    model_config,
    parse_command,
    rules_from_section,
    rules_section,
    section,
    write_run_config,
)
from sleep_jax.train.optim import OptimConfig
from sleep_jax.train.trainer import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "configs", "train.py")
FLAGS = (Flag("workdir", required=True), Flag("allow_config_change", bool, False))


def _cfg(*overrides, spec=f"{TRAIN_PY}:tiny"):
    return parse_command(["--config", spec, *overrides], default=f"{TRAIN_PY}:tiny")[0]


def test_presets_and_typed_views():
    c = _cfg()
    assert from_section(TrainConfig, c.train) == TrainConfig(**dict(c.train))
    assert from_section(OptimConfig, c.optim) == OptimConfig(**dict(c.optim))
    m = model_config(c)
    assert (m.vocab, m.layers, m.embed) == (256, 2, 64)
    mb = model_config(_cfg(spec=f"{TRAIN_PY}:llama_8b"))
    assert (mb.layers, mb.dtype, mb.remat, mb.rope_scaling.factor) == (32, "bfloat16", "full", 8.0)


def test_default_config_without_flag():
    c, args = parse_command(["--workdir=w"], default=f"{TRAIN_PY}:tiny", flags=FLAGS)
    assert c.preset == "tiny" and args == {"workdir": "w", "allow_config_change": False}


def test_overrides_are_typed():
    c, args = parse_command(["--config", f"{TRAIN_PY}:tiny", "--config.train.steps=7",
                             "--config.optim.lr", "1", "--config.train.async_checkpoints=false",
                             "--config.model.remat=dots", "--workdir", "w",
                             "--allow_config_change"], default=f"{TRAIN_PY}:tiny", flags=FLAGS)
    assert args == {"workdir": "w", "allow_config_change": True}
    assert c.train.steps == 7 and isinstance(c.train.steps, int)
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.train.async_checkpoints is False
    assert model_config(c).remat == "dots"


def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match=r"unknown config key in --config.train.stepz.*steps"):
        _cfg("--config.train.stepz=5")
    with pytest.raises(ConfigError, match=r"unknown config key in --config.trian.steps"):
        _cfg("--config.trian.steps=5")
    with pytest.raises(ConfigError, match=r"Unknown command line flag 'bogus'"):
        parse_command(["--bogus=1"], default=f"{TRAIN_PY}:tiny", flags=FLAGS)
    with pytest.raises(ConfigError, match=r"unexpected argument\(s\) \['stray'\]"):
        parse_command(["stray", "--workdir=w"], default=f"{TRAIN_PY}:tiny", flags=FLAGS)


def test_wrong_type_names_type():
    with pytest.raises(ConfigError, match=r"train.steps=abc.*int"):
        _cfg("--config.train.steps=abc")
    with pytest.raises(ConfigError, match=r"async_checkpoints=maybe"):
        _cfg("--config.train.async_checkpoints=maybe")


def test_bad_value_names_allowed_values():
    with pytest.raises(ConfigError, match=r"remat='sometimes'; allowed: none, full, dots"):
        model_config(_cfg("--config.model.remat=sometimes"))


def test_missing_config_file_and_bad_preset():
    with pytest.raises(ConfigError, match=r"config file 'nope/train.py' not found"):
        _cfg(spec="nope/train.py:tiny")
    with pytest.raises(ConfigError, match=r"unknown train preset 'huge'; allowed: tiny"):
        _cfg(spec=f"{TRAIN_PY}:huge")


def test_missing_required_flag():
    with pytest.raises(ConfigError, match=r"missing required flag\(s\) --workdir"):
        parse_command([], default=f"{TRAIN_PY}:tiny", flags=FLAGS)


def test_help_shows_defaults(capsys):
    assert parse_command(["--help"], default=f"{TRAIN_PY}:tiny", flags=FLAGS,
                         doc="the doc") == (None, {})
    out = capsys.readouterr().out
    assert "the doc" in out and "--workdir" in out and "steps: 200" in out


def test_sections_round_trip():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        a: int = 1
        name: str | None = None
        names: tuple[str, ...] = ("x", "y")

    s = section(Cfg, a=3)
    assert from_section(Cfg, s) == Cfg(a=3)
    s.name = "set"  # a None default is a typed placeholder: a string is accepted
    with pytest.raises(TypeError):
        s.name = 5
    assert from_section(Cfg, {"names": ["z"]}) == Cfg(names=("z",))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) Cfg.b; allowed under 'Cfg': a"):
        from_section(Cfg, {"b": 1})


def test_rules_round_trip():
    from sleep_jax.mesh import RULES

    assert dict(rules_from_section(rules_section(RULES))) == dict(RULES)
    table = dict(rules_from_section(_cfg("--config.rules.embed=", "--config.rules.mlp=fsdp,tensor"
                                         ).rules))
    assert table["embed"] is None and table["mlp"] == ("fsdp", "tensor")
    with pytest.raises(ConfigError, match=r"rules.embed='fsdb'.*allowed: data, fsdp, tensor"):
        rules_from_section({"embed": "fsdb"})


def test_changed_config_refused_with_diff(tmp_path):
    write_run_config(str(tmp_path), _cfg())
    write_run_config(str(tmp_path), _cfg())  # the same config resumes
    with pytest.raises(ConfigError, match=r"train.steps: 200 -> 50(.|\n)*--allow_config_change"):
        write_run_config(str(tmp_path), _cfg("--config.train.steps=50"))
    write_run_config(str(tmp_path), _cfg("--config.train.steps=50"), allow_change=True)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["train"]["steps"] == 50
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["  a.c: '<absent>' -> 2"]


def test_cli_errors(tmp_path, capsys):
    from sleep_jax.train.cli import main

    w = str(tmp_path / "run")
    base = ["--config", f"{TRAIN_PY}:tiny", "--workdir", w]
    assert main(base + ["--config.data.source=jsonl", "--config.data.path=/no/such.jsonl"]) == 2
    assert "data file '/no/such.jsonl' not found" in capsys.readouterr().err
    assert not os.path.exists(w)  # nothing written on bad input
    assert main(base + ["--config.train.bogus=1"]) == 2
    assert "unknown config key in --config.train.bogus" in capsys.readouterr().err
    assert main(base + ["--config.data.source=web"]) == 2
    assert "data.source='web'; allowed: builtin, jsonl, tfds" in capsys.readouterr().err
    assert main(base + ["--config.rules.embed=fsdb"]) == 2
    assert "config.rules.embed='fsdb': unknown mesh axis" in capsys.readouterr().err
    assert main(base + ["--config.mesh=data=3"]) == 2  # 8 devices: not a divisor
    assert "config.mesh='data=3'" in capsys.readouterr().err
    assert not os.path.exists(w)


def test_sleep_cli_checks_every_option_before_work(tmp_path, capsys):
    from sleep_jax.distill.cli import main as sleep_main

    w = tmp_path / "run"
    base = ["--checkpoint", str(tmp_path / "nope"), "--memories", str(tmp_path / "m.jsonl"),
            "--probes", str(tmp_path / "p.jsonl"), "--workdir", str(w)]
    assert sleep_main(base + ["--config.sleep.prompt_format=q: {qestion} a:"]) == 2
    assert "sleep.prompt_format='q: {qestion} a:'" in capsys.readouterr().err
    assert sleep_main(base + ["--config.seeding.lam=1.5"]) == 2
    assert "lam=1.5 must be in [0, 1]" in capsys.readouterr().err
    assert sleep_main(base + ["--config.replay.fractoin=0.1"]) == 2
    assert "unknown config key in --config.replay.fractoin" in capsys.readouterr().err
    assert sleep_main(base + ["--config.sleep.optim.lr=abc"]) == 2
    assert "sleep.optim.lr=abc" in capsys.readouterr().err
    assert sleep_main(base + ["--config.mesh=data=3"]) == 2  # 8 devices: not a divisor
    assert "config.mesh='data=3'" in capsys.readouterr().err
    assert sleep_main(base + ["--config.teacher_mesh=fsdp=2,tensr=4"]) == 2
    assert "config.teacher_mesh='fsdp=2,tensr=4'" in capsys.readouterr().err
    assert sleep_main(base) == 2  # the memories file does not exist
    assert "m.jsonl" in capsys.readouterr().err
    assert not w.exists()  # nothing written for a run that did not start
