"""Config files for every command: ml_collections ``config_flags`` plus typed views.

big_vision style: a config is a Python file with ``get_config(arg) -> ConfigDict``, named on the
command line as ``--config path.py:arg``; single values change with ``--config.a.b=value``.
Parsing, type checks of overrides and unknown-key errors are ml_collections' ``config_flags``
(on a private absl ``FlagValues``, so commands and tests can parse many times); this module only
turns its errors into one ``ConfigError`` with the offending value, prints ``--help`` with the
resolved defaults, and writes/compares the run folder's ``config.json``.

Library code never sees the ConfigDict: ``from_section(SomeConfig, config.section)`` builds the
frozen dataclass that sits next to the code using it (``train/optim.OptimConfig``,
``train/trainer.TrainConfig``, ``distill/seeding.SeedingConfig``...), and ``section(SomeConfig)``
builds a config-file section holding every field of it, so every option is reachable from the
config file and typed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Sequence
from typing import Any

import ml_collections

from sleep_jax.atomic import write_json
from sleep_jax.models.config import ModelConfig, get_preset


class ConfigError(ValueError):
    """A config file, key or value that cannot be used (the message says what is allowed)."""


# ---------------------------------------------------------------------------------------------
# Sections <-> frozen dataclasses.
# ---------------------------------------------------------------------------------------------


def _field_types(cls) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: fall back to the default's type
        hints = {}
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


def _placeholder_type(hint) -> type:
    """The type a ``None`` default of annotation ``hint`` takes on the command line."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = typing.get_origin(args[0]) or args[0] if args else str
    return base if base in (int, float, str, bool, tuple) else str


def section(cls, **overrides) -> ml_collections.ConfigDict:
    """A config section with every field of the dataclass ``cls`` (defaults, then ``overrides``).

    ``None`` defaults become typed placeholders, so ``--config.x=value`` type-checks them too.
    """
    d = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - set(d))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(d)}")
    d.update(overrides)
    types = _field_types(cls)
    out = ml_collections.ConfigDict()
    for k, v in d.items():
        if v is None:
            v = ml_collections.config_dict.placeholder(_placeholder_type(types[k]))
        elif dataclasses.is_dataclass(v):
            v = section(type(v), **{f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
        out[k] = v
    return out


def from_section(cls, cd: ml_collections.ConfigDict | dict | None, where: str = ""):
    """The frozen dataclass ``cls`` built from a config section (unknown keys fail).

    Lists (a JSON round trip) become tuples where the dataclass default is a tuple; nested
    sections become the nested dataclass of the field's default.
    """
    where = where or cls.__name__
    d = dict(cd or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + '.' + k for k in unknown)}; "
                          f"allowed under {where!r}: {', '.join(sorted(known))}")
    default = cls()
    for k, v in d.items():
        dv = getattr(default, k)
        if isinstance(v, ml_collections.ConfigDict):
            v = v.to_dict()
        if dataclasses.is_dataclass(dv) and isinstance(v, dict):
            d[k] = from_section(type(dv), v, f"{where}.{k}")
        elif isinstance(dv, tuple) and isinstance(v, list):
            d[k] = tuple(v)
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:  # the dataclass validates its values
        raise ConfigError(f"config.{where}: {e}") from None


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


def rules_section(rules) -> ml_collections.ConfigDict:
    """The logical-axis rules table as a section: logical name -> "mesh,axes" ("" replicated)."""
    out = ml_collections.ConfigDict()
    for name, axes in rules:
        out[name] = "" if axes is None else axes if isinstance(axes, str) else ",".join(axes)
    return out


def rules_from_section(cd: ml_collections.ConfigDict) -> tuple:
    """The rules table (``sleep_jax.mesh.RULES`` format) from a ``rules_section``."""
    from sleep_jax.mesh import MESH_AXES

    out = []
    for name, text in dict(cd).items():
        axes = tuple(a.strip() for a in str(text).split(",") if a.strip())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(f"config.rules.{name}={text!r}: unknown mesh axis {bad}; "
                              f"allowed: {', '.join(MESH_AXES)} (comma-separated, '' = "
                              "replicated)")
        out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The command line: --config FILE:ARG, --config.a.b=VALUE, and a command's own flags.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag of a command besides its config (e.g. ``--workdir``)."""

    name: str
    kind: type = str  # str | int | bool
    default: Any = None
    help: str = ""
    required: bool = False


# Per-process flags of every command that runs on many processes (sleep_jax.runtime): they
# differ between processes, so they are flags, not part of the run's config.json.
RUNTIME_FLAGS = (
    Flag("distributed", str, "auto", help="auto (from the environment) | none | jax "
         "(jax.distributed.initialize() without arguments, e.g. Cloud TPU VM pods)"),
    Flag("coordinator_address", str, "", help="host:port of process 0 (many processes)"),
    Flag("num_processes", int, 0, help="process count (0: from the environment)"),
    Flag("process_id", int, -1, help="this process's id (-1: from the environment)"),
    Flag("local_device_ids", str, "", help="this process's local devices, e.g. 0,1"),
    Flag("init_timeout_s", int, 0, help="seconds to wait for every process to connect "
         "(0: SLEEP_JAX_INIT_TIMEOUT, else 300)"),
)


def runtime_config(args: dict):
    """The ``sleep_jax.runtime.RuntimeConfig`` of parsed ``RUNTIME_FLAGS`` values."""
    from sleep_jax.runtime import RuntimeConfig

    return RuntimeConfig(**{f.name: args[f.name] for f in RUNTIME_FLAGS})


def default_config_path(name: str) -> str:
    """``configs/<name>`` of this source tree (next to the package), else of the working dir."""
    file, _, arg = name.partition(":")
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        file)
    path = here if os.path.isfile(here) else os.path.join("configs", file)
    return f"{path}:{arg}" if arg else path


def _clean(e: Exception) -> str:
    """absl/ml_collections error text without the traceback they sometimes embed."""
    text = str(e).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's repr
        text = text[1:-1].replace("\\n", "\n").replace("\\'", "'")
    if "Traceback" in text:  # a config file's get_config raised: keep its last line
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        head = lines[0].split(":")[0] if lines else ""
        text = f"{head}: {lines[-1]}" if lines else text
    return " ".join(text.split())


def _help(prog: str, doc: str, flag_specs: Sequence[Flag], default: str) -> str:
    lines = [doc.strip(), "", f"usage: {prog} [--config FILE.py[:ARG]] [--config.KEY=VALUE ...]"
             + "".join(f" --{f.name}" + ("" if f.kind is bool else "=VALUE") for f in flag_specs),
             "", "flags:", f"  --config FILE.py[:ARG]   config file (default {default})",
             "  --config.KEY=VALUE       override one config value (typed; unknown keys fail)"]
    for f in flag_specs:
        dflt = " (required)" if f.required else f" (default {f.default!r})"
        lines.append(f"  --{f.name:<22} {f.help}{dflt}")
    try:
        cfg = _load(default)
        lines += ["", f"defaults ({default}):", str(cfg)]
    except ConfigError as e:
        lines += ["", f"(defaults unavailable: {e})"]
    return "\n".join(lines)


def _load(spec: str) -> ml_collections.ConfigDict:
    config, _ = parse_command([], default=spec)
    return config


def parse_command(argv: Sequence[str], *, default: str, flags: Sequence[Flag] = (),
                  prog: str = "sleep-jax", doc: str = ""
                  ) -> tuple[ml_collections.ConfigDict | None, dict[str, Any]]:
    """Parse a command's arguments: its config (file + overrides) and its own flags.

    Args:
      argv: the arguments after the command name.
      default: the config used without ``--config`` (e.g. ``default_config_path("train.py")``).
      flags: the command's other flags.
      prog, doc: for ``--help``, which prints the flags and the resolved default config.
    Returns:
      (config, {flag name: value}); (None, {}) after printing ``--help``.
    Raises:
      ConfigError naming the offending file, key or value (unknown keys, wrong types, a config
      file that fails, a missing required flag, an unknown flag or a stray argument).
    """
    from absl import flags as absl_flags
    from ml_collections import config_flags

    argv = list(argv)
    spec = default
    for i, a in enumerate(argv):  # which config file: the override flags are defined from it
        if a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif a.startswith("--config="):
            spec = a.split("=", 1)[1]
    if any(a in ("-h", "--help", "-help") for a in argv):
        print(_help(prog, doc, flags, spec))
        return None, {}
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (from --config {spec!r}); give a "
                          f"Python file with get_config(arg), e.g. {default}")
    fv = absl_flags.FlagValues()
    full = [prog] + argv
    try:
        config_flags.DEFINE_config_file("config", default=default, flag_values=fv,
                                        lock_config=True, sys_argv=full)
        for f in flags:
            define = {str: absl_flags.DEFINE_string, int: absl_flags.DEFINE_integer,
                      bool: absl_flags.DEFINE_bool}[f.kind]
            define(f.name, f.default, f.help, flag_values=fv)
        rest = fv(full, known_only=False)
    except (absl_flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        msg = _clean(e)
        if "Did you mean" in msg or isinstance(e, (AttributeError, KeyError)):
            bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
            msg = f"unknown config key in {', '.join(bad) or 'overrides'}: {msg}"
        raise ConfigError(msg) from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected argument(s) {rest[1:]}; flags: --config, "
                          f"--config.KEY=VALUE, " + ", ".join(f"--{f.name}" for f in flags))
    values = {f.name: fv[f.name].value for f in flags}
    missing = [f"--{f.name}" for f in flags if f.required and values[f.name] in (None, "")]
    if missing:
        raise ConfigError(f"missing required flag(s) {', '.join(missing)}")
    config = fv.config
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}:get_config returned {type(config).__name__}, not a ConfigDict")
    return config, values


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


def check_run_config(workdir: str, config: ml_collections.ConfigDict,
                     allow_change: bool = False) -> None:
    """Refuse a run whose ``workdir/config.json`` holds a different config (writes nothing).

    Raises:
      ConfigError: the saved config differs and ``allow_change`` is False (lists the changes).
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = config_diff(old, to_dict(config))
    if diff and not allow_change:
        raise ConfigError(
            f"{path} holds a different config than this run (saved -> new):\n"
            + "\n".join(diff)
            + "\nuse the same config to resume, another --workdir for a new run, or "
              "--allow_config_change to resume with the new one")


def write_run_config(workdir: str, config: ml_collections.ConfigDict,
                     allow_change: bool = False) -> None:
    """Write ``config.json`` to ``workdir`` (atomically); refuse a different saved config.

    Raises:
      ConfigError: see ``check_run_config``.
    """
    check_run_config(workdir, config, allow_change)
    write_json(os.path.join(workdir, "config.json"), to_dict(config), sort_keys=True)
