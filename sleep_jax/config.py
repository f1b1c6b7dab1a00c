"""Config files, command-line overrides, the run folder's config.json, and typed views.

big_vision style: a config is a Python file with ``get_config(arg) -> ConfigDict``, named on the
command line as ``path.py:arg``; single values change with ``--config.a.b=value``. Overrides are
checked against the file's keys and value types (unknown keys and wrong types fail, naming the
key and what is allowed). The resolved config is written to the run folder as ``config.json``; a
re-run in the same folder with a different config is refused unless explicitly allowed.

Library code never sees the ConfigDict: ``optim_config``, ``train_config``, ``data_config`` and
``model_config`` convert it into small frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from sleep_jax.models.config import ModelConfig, get_preset


class ConfigError(ValueError):
    """A config file, key or value that cannot be used (the message says what is allowed)."""


# ---------------------------------------------------------------------------------------------
# Typed views used by library code.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes batches (see sleep_jax.data)."""

    source: str = "builtin"  # builtin | jsonl | tfds
    path: str = ""  # JSONL file {"text": ...} (source=jsonl); data_dir for tfds
    tfds_name: str = ""
    split: str = "train"
    tokenizer: str = "byte"  # byte | word
    pack: bool = True
    eval_fraction: float = 0.05
    builtin_sentences: int = 2000


def _dataclass_from(cls, cd: ml_collections.ConfigDict | dict, where: str):
    d = dict(cd)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + '.' + k for k in unknown)}; "
                          f"allowed under {where!r}: {', '.join(sorted(known))}")
    return cls(**d)


def optim_config(config: ml_collections.ConfigDict):
    from sleep_jax.train.optim import OptimConfig

    return _dataclass_from(OptimConfig, config.optim, "optim")


def train_config(config: ml_collections.ConfigDict):
    from sleep_jax.train.trainer import TrainConfig

    return _dataclass_from(TrainConfig, config.train, "train")


def data_config(config: ml_collections.ConfigDict) -> DataConfig:
    return _dataclass_from(DataConfig, config.data, "data")


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The preset named by ``config.model.preset`` with the other ``config.model`` keys applied."""
    d = dict(config.model)
    preset = d.pop("preset")
    base = get_preset(preset)
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"rope_scaling"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown model key(s) {unknown}; allowed: preset, "
                          f"{', '.join(sorted(known))}")
    try:
        return base.replace(**d)
    except ValueError as e:  # ModelConfig validates values (e.g. remat, attention)
        raise ConfigError(f"config.model: {e}") from None


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
    """A ``config.model`` section holding every field of the preset (so overrides type-check)."""
    cfg = get_preset(preset, **overrides)
    d = {k: v for k, v in cfg.to_dict().items() if k != "rope_scaling"}
    return ml_collections.ConfigDict({"preset": preset, **d})


def section(cls, **overrides) -> ml_collections.ConfigDict:
    """A ConfigDict with the dataclass ``cls``'s defaults and ``overrides``."""
    d = dataclasses.asdict(cls())
    unknown = sorted(set(overrides) - set(d))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(d)}")
    d.update(overrides)
    return ml_collections.ConfigDict(d)


# ---------------------------------------------------------------------------------------------
# Loading a config file and applying overrides.
# ---------------------------------------------------------------------------------------------


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load ``path.py[:arg]`` by calling the file's ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (from --config {spec!r}); give a "
                          f"Python file with get_config(arg), e.g. configs/train.py:tiny")
    mod_spec = importlib.util.spec_from_file_location(
        f"_sleep_jax_config_{abs(hash(os.path.abspath(path)))}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config(arg) function")
    cfg = mod.get_config(arg or None)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}:get_config returned {type(cfg).__name__}, not a ConfigDict")
    return cfg


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _parse_value(key: str, text: str, current: Any) -> Any:
    """``text`` converted to the type of ``current`` (the value the config file set)."""
    kind = type(current)
    try:
        if isinstance(current, bool):
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if current is None:
            # An unset optional: take JSON when it parses (numbers, null), else the string.
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return text
        if isinstance(current, (list, tuple)):
            v = json.loads(text)
            if not isinstance(v, list):
                raise ValueError
            return kind(v)
    except ValueError:
        pass
    allowed = "true/false" if kind is bool else kind.__name__
    raise ConfigError(f"--config.{key}={text!r}: expected a value of type {allowed} "
                      f"(current value {current!r})")


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set ``config.<key>`` (dotted) from the command-line string ``text``, type-checked."""
    parts = key.split(".")
    node = config
    for i, name in enumerate(parts):
        where = ".".join(parts[:i]) or "<top level>"
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key}: {where!r} is a value, not a section")
        if name not in node:
            raise ConfigError(f"unknown config key {key!r}: no {name!r} under {where}; "
                              f"allowed: {', '.join(sorted(node.keys()))}")
        if i < len(parts) - 1:
            node = node[name]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key} names a section; set one of its keys: "
                          f"{', '.join(sorted(current.keys()))}")
    with node.ignore_type():
        node[parts[-1]] = _parse_value(key, text, current)


def parse_config_args(argv: Sequence[str], default: str | None = None
                      ) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Split ``--config FILE:ARG`` and ``--config.key=value`` out of ``argv``.

    Returns (resolved config, remaining arguments). Overrides apply in order after the file.
    """
    spec, overrides, rest = default, [], []
    it = iter(argv)
    for a in it:
        if a == "--config":
            spec = next(it, None)
            if spec is None:
                raise ConfigError("--config needs a value, e.g. --config configs/train.py:tiny")
        elif a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a.startswith("--config."):
            body = a[len("--config."):]
            if "=" in body:
                k, v = body.split("=", 1)
            else:
                k, v = body, next(it, None)
                if v is None:
                    raise ConfigError(f"--config.{k} needs a value (--config.{k}=VALUE)")
            overrides.append((k, v))
        else:
            rest.append(a)
    if spec is None:
        raise ConfigError("no config given: pass --config path/to/config.py:ARG")
    config = load_config_file(spec)
    for k, v in overrides:
        apply_override(config, k, v)
    return config, rest


# ---------------------------------------------------------------------------------------------
# The run folder's config.json.
# ---------------------------------------------------------------------------------------------


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """JSON-ready plain dict (tuples become lists, as they would after a JSON round trip)."""
    return json.loads(config.to_json(sort_keys=True))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """Lines ``key: old -> new`` for every key that differs (missing keys shown as <absent>)."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            lines.append(f"  {k}: {va!r} -> {vb!r}")
    return lines


def write_run_config(workdir: str, config: ml_collections.ConfigDict,
                     allow_change: bool = False) -> None:
    """Write ``config.json`` to ``workdir``; refuse a different config already saved there.

    Raises:
      ConfigError: the saved config differs and ``allow_change`` is False (lists the changes).
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    new = to_dict(config)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = config_diff(old, new)
        if diff and not allow_change:
            raise ConfigError(
                f"{path} holds a different config than this run (saved -> new):\n"
                + "\n".join(diff)
                + "\nuse the same config to resume, another --workdir for a new run, or "
                  "--allow_config_change to resume with the new one")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
