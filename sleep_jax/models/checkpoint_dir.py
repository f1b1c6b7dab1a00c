"""The one checkpoint directory format every command reads and writes.

A checkpoint directory holds::

  config.json     {"format_version": 1, "architecture": "llama",
                   "model": {every ModelConfig field},
                   "tokens": {"bos_id", "eos_id", "pad_id", "unk_id", "add_bos", "chat_template"},
                   "extra": {free-form provenance, e.g. "source", "grown_from"}}
  tokenizer.json  the HF ``tokenizers`` tokenizer (absent when the model has none)
  params/         orbax (StandardCheckpointer): every model variable (nnx.Param, SlotMask, ...) as
                  the plain nested dict ``nnx.to_pure_dict(nnx.state(model))`` of [L, ...] arrays
  train/          optional, owned by ``sleep_jax.checkpoint.Checkpointer`` (full train state);
                  kept untouched when the directory is written again

Writes are atomic: everything goes to a sibling temporary directory that is renamed into place,
so a killed process leaves either the old checkpoint or the new one, never half of one (and the
JSON files are written with ``sleep_jax.atomic``). Loading checks every array's shape against
the config before restoring, refuses a tokenizer with more tokens than ``model.vocab`` and
special-token ids outside [0, model.vocab) (saving refuses them too), and with a mesh each array is
restored straight onto its shard (an abstract tree of ``jax.ShapeDtypeStruct`` with the
``NamedSharding`` the logical-axis rules give), so a model larger than one device never exists
whole on one host. No pickle anywhere: JSON, tokenizer JSON and orbax's tensorstore files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from sleep_jax.atomic import write_json, write_text
from sleep_jax.models.config import ModelConfig
from sleep_jax.models.llama import Decoder
from sleep_jax.models.sharding import state_shardings

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
PARAMS_DIR = "params"
TRAIN_DIR = "train"
ARCHITECTURE = "llama"
TOKEN_FIELDS = ("bos_id", "eos_id", "pad_id", "unk_id", "add_bos", "chat_template")
# Special-token spellings looked up when the caller gives no ``tokens``: ours
# (sleep_jax.data.tokenizers) first, then common Llama-family ones.
_SPECIAL_SPELLINGS = {
    "bos_id": ("<bos>", "<s>", "<|begin_of_text|>"),
    "eos_id": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>"),
    "pad_id": ("<pad>",),
    "unk_id": ("<unk>",),
}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, malformed or does not match its config."""


# ----------------------------------------------------------------------------- params <-> model


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def abstract_params(cfg: ModelConfig, *, mesh: Mesh | None = None, rules=None,
                    dtype: str | None = None):
    """(graphdef, abstract nnx.State) of a Decoder for ``cfg``; leaves are ShapeDtypeStructs.

    With ``mesh`` each leaf carries the NamedSharding its logical axes map to under ``rules``;
    without, the first local device. ``dtype`` overrides the floating dtype of every variable.
    """
    from sleep_jax.mesh import RULES

    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shard = state_shardings(state, mesh, rules or RULES)
        shard_leaves = jax.tree.leaves(shard)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shard_leaves = [one] * len(jax.tree.leaves(state))
    leaves, treedef = jax.tree.flatten(state)
    new = []
    for x, s in zip(leaves, shard_leaves):
        dt = x.dtype
        if dtype is not None and jax.numpy.issubdtype(dt, jax.numpy.floating):
            dt = jax.numpy.dtype(dtype)
        new.append(jax.ShapeDtypeStruct(x.shape, dt, sharding=s))
    return graphdef, jax.tree.unflatten(treedef, new)


def check_param_shapes(expected: Mapping, got: Mapping, where: str) -> None:
    """Raise CheckpointError naming the first missing/unexpected/mis-shaped array.

    Args:
      expected, got: nested dicts whose leaves have ``.shape``.
      where: what ``got`` came from (a path), for the message.
    """
    e, g = _flatten(expected), _flatten(got)
    missing, unexpected = sorted(set(e) - set(g)), sorted(set(g) - set(e))
    if missing:
        raise CheckpointError(f"{where}: missing parameter(s) {missing} (the config expects "
                              f"{sorted(e)})")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected parameter(s) {unexpected} not in the "
                              f"config's model (expected {sorted(e)})")
    for name in e:
        if tuple(e[name].shape) != tuple(g[name].shape):
            raise CheckpointError(f"{where}: parameter {name!r} has shape "
                                  f"{tuple(g[name].shape)} but the config expects "
                                  f"{tuple(e[name].shape)}")


def model_from_params(cfg: ModelConfig, params: Mapping, *, mesh: Mesh | None = None,
                      rules=None, where: str = "params") -> Decoder:
    """A Decoder for ``cfg`` holding the arrays ``params`` (shape-checked, cast to param_dtype).

    Args:
      cfg: the model config.
      params: nested dict like ``nnx.to_pure_dict(nnx.state(model))`` of numpy/jax arrays, e.g.
        {"embed": [V,D], "blocks": {"q": [L,D,N,H], ...}, "final_norm": [D]}.
      mesh, rules: put each array on its shard (default: the first device).
      where: named in error messages.
    Returns:
      The Decoder.
    """
    graphdef, abstract = abstract_params(cfg, mesh=mesh, rules=rules)
    expected = nnx.to_pure_dict(abstract)
    check_param_shapes(expected, params, where)
    arrays = jax.tree.map(lambda a, s: jax.device_put(np.asarray(a, s.dtype), s.sharding),
                          params, expected)
    nnx.replace_by_pure_dict(abstract, arrays)
    return nnx.merge(graphdef, abstract)


# ----------------------------------------------------------------------------- tokens


def infer_tokens(tokenizer) -> dict:
    """Special-token ids found in ``tokenizer`` by their usual spellings (None when absent)."""
    out = {k: None for k in TOKEN_FIELDS}
    out["add_bos"] = False
    if tokenizer is None:
        return out
    for field, spellings in _SPECIAL_SPELLINGS.items():
        for s in spellings:
            i = tokenizer.token_to_id(s)
            if i is not None:
                out[field] = int(i)
                break
    return out


def _check_tokens(tokens: Mapping, where: str, vocab: int | None = None) -> dict:
    unknown = sorted(set(tokens) - set(TOKEN_FIELDS))
    if unknown:
        raise CheckpointError(f"{where}: unknown token field(s) {unknown}; allowed: "
                              f"{list(TOKEN_FIELDS)}")
    out = {k: tokens.get(k) for k in TOKEN_FIELDS}
    out["add_bos"] = bool(out["add_bos"])
    for k in ("bos_id", "eos_id", "pad_id", "unk_id"):
        v = out[k]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise CheckpointError(f"{where}: tokens.{k}={v!r} must be a non-negative integer "
                                  f"or null")
        if v is not None and vocab is not None and v >= vocab:
            raise CheckpointError(f"{where}: tokens.{k}={v} is outside the model's vocabulary "
                                  f"(model.vocab={vocab}; allowed ids 0..{vocab - 1})")
    if out["chat_template"] is not None and not isinstance(out["chat_template"], str):
        raise CheckpointError(f"{where}: tokens.chat_template must be a string or null, got "
                              f"{type(out['chat_template']).__name__}")
    return out


# ----------------------------------------------------------------------------- save


def _write_json(path: str, obj) -> None:
    write_json(path, obj, indent=2, sort_keys=True)


def check_tokenizer_fits(tokenizer, vocab: int, where: str) -> None:
    """CheckpointError unless every id ``tokenizer`` can produce is < ``vocab`` (model.vocab).

    A model may have more rows than its tokenizer has tokens (padded vocabularies), not fewer:
    an id >= vocab would read no embedding row (NaN logits on the device).
    """
    if tokenizer is None:
        return
    from sleep_jax.data.tokenizers import tokenizer_vocab_size

    n = tokenizer_vocab_size(tokenizer)
    if n > vocab:
        raise CheckpointError(f"{where}: the tokenizer has {n} tokens (ids 0..{n - 1}) but the "
                              f"model's config.vocab={vocab}; ids {vocab}..{n - 1} would have "
                              f"no embedding row (the tokenizer size must be <= config.vocab)")


def save_checkpoint(directory: str | os.PathLike, model: Decoder, tokenizer=None, *,
                    extra: Mapping | None = None, tokens: Mapping | None = None) -> str:
    """Write ``model`` (+ tokenizer) as a checkpoint directory, atomically.

    Args:
      directory: the checkpoint directory (created; an existing one is replaced, its ``train/``
        kept).
      model: a Decoder (sharded or not; sharded arrays are written shard by shard).
      tokenizer: a ``tokenizers.Tokenizer`` or None.
      extra: JSON-serialisable provenance stored under ``"extra"``.
      tokens: special-token ids / chat template (fields ``TOKEN_FIELDS``); default: looked up in
        the tokenizer by the usual spellings (pass ``meta["tokens"]`` from ``load_checkpoint`` to
        carry them over).
    Returns:
      The absolute directory path.
    """
    if not isinstance(model, Decoder):
        raise TypeError(f"save_checkpoint needs a sleep_jax Decoder, got {type(model).__name__}")
    directory = os.path.abspath(os.fspath(directory))
    vocab = model.config.vocab
    tok = _check_tokens(tokens if tokens is not None else infer_tokens(tokenizer),
                        "save_checkpoint", vocab)
    check_tokenizer_fits(tokenizer, vocab, "save_checkpoint")
    config = {"format_version": FORMAT_VERSION, "architecture": ARCHITECTURE,
              "model": model.config.to_dict(), "tokens": tok, "extra": dict(extra or {})}
    json.dumps(config)  # fail before writing anything if extra is not JSON
    parent = os.path.dirname(directory)
    # One temp name for all processes (multi-host: every process writes its shards there);
    # process 0 alone does the file-system bookkeeping.
    tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp")
    lead = jax.process_index() == 0
    if lead:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
        os.makedirs(tmp)
    _sync("sleep_jax_ckpt_tmp")
    try:
        params = nnx.to_pure_dict(nnx.state(model))
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
        ckptr.wait_until_finished()
        if lead:
            if tokenizer is not None:
                write_text(os.path.join(tmp, TOKENIZER_FILE), tokenizer.to_str(pretty=True))
            # config.json last: its presence marks a complete directory.
            _write_json(os.path.join(tmp, CONFIG_FILE), config)
            _swap_into_place(tmp, directory)
        _sync("sleep_jax_ckpt_done")
    finally:
        if lead and os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _swap_into_place(tmp: str, directory: str) -> None:
    """Rename ``tmp`` to ``directory``; entries we do not own (train/) move over first."""
    if not os.path.exists(directory):
        os.rename(tmp, directory)
        return
    ours = {CONFIG_FILE, TOKENIZER_FILE, PARAMS_DIR}
    for name in os.listdir(directory):
        if name not in ours:
            os.rename(os.path.join(directory, name), os.path.join(tmp, name))
    trash = tmp + ".old"
    os.rename(directory, trash)
    os.rename(tmp, directory)
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------- load


def read_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """Parse and validate ``<directory>/config.json``; returns (ModelConfig, meta dict).

    ``meta`` has keys format_version, architecture, model (dict), tokens (dict), extra (dict).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is missing: {directory!r} is not a sleep_jax "
                                f"checkpoint directory (expected {CONFIG_FILE}, {PARAMS_DIR}/)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: top level must be an object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version={version!r}; this code reads "
                              f"format_version={FORMAT_VERSION}")
    arch = meta.get("architecture", ARCHITECTURE)
    if arch != ARCHITECTURE:
        raise CheckpointError(f"{path}: architecture={arch!r}; supported: {ARCHITECTURE!r}")
    model = meta.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: field 'model' must be an object of ModelConfig fields, "
                              f"got {model!r:.80}")
    try:
        cfg = ModelConfig.from_dict(model)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: field 'model' is not a valid ModelConfig: {e}") from None
    tokens = meta.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise CheckpointError(f"{path}: field 'tokens' must be an object, got {tokens!r:.80}")
    meta["tokens"] = _check_tokens(tokens, path, cfg.vocab)
    meta.setdefault("extra", {})
    meta["architecture"] = arch
    return cfg, meta


def load_checkpoint(directory: str | os.PathLike, *, mesh: Mesh | None = None, rules=None,
                    dtype: str | None = None):
    """Load a checkpoint directory.

    Args:
      directory: written by ``save_checkpoint``.
      mesh: restore every array straight onto its shard of ``mesh`` (default: one device).
      rules: logical-axis rules (default ``sleep_jax.mesh.RULES``).
      dtype: parameter dtype to restore into (e.g. "bfloat16"; sets ``param_dtype``).
    Returns:
      (model: Decoder, tokenizer: tokenizers.Tokenizer or None, meta: dict) with meta as in
      ``read_config``.
    """
    cfg, meta = read_config(directory)
    directory = os.path.abspath(os.fspath(directory))
    if dtype is not None:
        cfg = cfg.replace(param_dtype=str(jax.numpy.dtype(dtype)))
    params_dir = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir!r} is missing: the checkpoint has no parameters")
    tokenizer = None
    tok_path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(tok_path)
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise CheckpointError(f"{tok_path}: not a valid tokenizer file ({e})") from None
        check_tokenizer_fits(tokenizer, cfg.vocab, tok_path)
    ckptr = ocp.StandardCheckpointer()
    saved = ckptr.metadata(params_dir).item_metadata.tree
    graphdef, abstract = abstract_params(cfg, mesh=mesh, rules=rules, dtype=dtype)
    target = nnx.to_pure_dict(abstract)
    check_param_shapes(target, saved, params_dir)
    restored = ckptr.restore(params_dir, target)
    nnx.replace_by_pure_dict(abstract, restored)
    model = nnx.merge(graphdef, abstract)
    return model, tokenizer, meta
