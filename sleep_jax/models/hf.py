"""Import and export Hugging Face Llama folders (config.json + *.safetensors + tokenizer.json).

HF stores each projection as a torch Linear weight, numpy (out, in), with Q/K rows already in the
rotate-half RoPE layout our decoder uses, so the mapping is reshapes and transposes only::

  model.embed_tokens.weight                    [V, D]    -> embed [V,D]
  model.layers.{l}.self_attn.q_proj.weight     [N*H, D]  -> blocks.q [L,D,N,H]
  model.layers.{l}.self_attn.k_proj/v_proj     [K*H, D]  -> blocks.k / blocks.v [L,D,K,H]
  model.layers.{l}.self_attn.o_proj.weight     [D, N*H]  -> blocks.o [L,N,H,D]
  model.layers.{l}.mlp.gate_proj/up_proj       [F, D]    -> blocks.gate / blocks.up [L,D,F]
  model.layers.{l}.mlp.down_proj.weight        [D, F]    -> blocks.down [L,F,D]
  model.layers.{l}.input_layernorm / post_attention_layernorm [D] -> blocks.attn_norm / mlp_norm
  model.norm.weight [D] -> final_norm;  lm_head.weight [V, D] -> unembed [D,V] (untied only)

Expert slots (a model that slept) are written beside the Llama tensors, per layer, under names
transformers does not use, with their shape in config.json's ``sleep_jax_experts`` ({"slots":
E, "rank": R, "router": bool})::

  model.layers.{l}.mlp.sleep_jax_expert_a     [E, D, R] -> blocks.expert_a [L,E,D,R]
  model.layers.{l}.mlp.sleep_jax_expert_b     [E, R, D] -> blocks.expert_b [L,E,R,D]
  model.layers.{l}.mlp.sleep_jax_expert_mask  [E]       -> blocks.expert_mask [L,E] (1 = on)
  model.layers.{l}.mlp.sleep_jax_expert_router / _router_bias [E, D] / [E] (with a router)

``import_hf`` reads them back to the same logits; transformers' ``LlamaForCausalLM`` loads the
folder as the model without its slots (it warns that those weights are unused): the slots'
``silu(h A) B`` branch has no Llama equivalent to merge into.

Config fields that would change the math and that the decoder does not implement (biases,
sliding windows, QK norm, other activations, RoPE scalings other than llama3, ...) are refused by
name rather than silently ignored. Safetensors are read with a small memory-mapped reader (so
bfloat16 files need no torch) and written with ``safetensors.numpy``.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from typing import Any

import ml_dtypes
import numpy as np

from sleep_jax.models.config import ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama",)
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}
# Config keys that change the forward pass when set to anything but the value given here.
_REFUSED = {"attention_bias": False, "mlp_bias": False, "sliding_window": None,
            "use_sliding_window": False, "use_qk_norm": False, "qk_norm": False,
            "qk_layernorm": False, "partial_rotary_factor": 1.0}


class HFFormatError(ValueError):
    """An HF folder this importer cannot read faithfully (the message names the value)."""


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF LlamaConfig dict (transformers v4 or v5 layout).

    Raises HFFormatError naming the first unsupported or missing field.
    """
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise HFFormatError(f"{where}: model_type={mt!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFFormatError(f"{where}: hidden_act={act!r} is not supported; only 'silu' "
                            f"(SwiGLU)")
    for key, ok in _REFUSED.items():
        if key in hf and hf[key] not in (ok, None):
            raise HFFormatError(f"{where}: {key}={hf[key]!r} is not supported (the decoder "
                                f"implements {key}={ok!r})")

    def need(key):
        if key not in hf:
            raise HFFormatError(f"{where}: required field {key!r} is missing")
        return hf[key]

    rp = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta", rp.get("rope_theta", 10_000.0)))
    scaling = hf.get("rope_scaling")
    if scaling is None and rp.get("rope_type", "default") != "default":
        scaling = rp
    rope = None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "llama3":
            try:
                rope = RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                   float(scaling["high_freq_factor"]),
                                   int(scaling["original_max_position_embeddings"]))
            except KeyError as e:
                raise HFFormatError(f"{where}: llama3 rope_scaling lacks {e.args[0]!r}") from None
        elif kind != "default":
            raise HFFormatError(f"{where}: rope_scaling type {kind!r} is not supported; "
                                f"supported: 'llama3' (or none)")
    D, N = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = hf.get("head_dim") or D // N
    try:
        return ModelConfig(
            vocab=int(need("vocab_size")), embed=D, mlp=int(need("intermediate_size")),
            layers=int(need("num_hidden_layers")), heads=N,
            kv_heads=int(hf.get("num_key_value_heads") or N), head_dim=int(head_dim),
            rope_theta=theta, rope_scaling=rope, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)))
    except ValueError as e:
        raise HFFormatError(f"{where}: {e}") from None


def _experts_from_hf(hf: dict, cfg: ModelConfig, where: str) -> ModelConfig:
    ex = hf.get("sleep_jax_experts")
    if not ex:
        return cfg
    try:
        return cfg.replace(expert_slots=int(ex["slots"]), expert_rank=int(ex["rank"]),
                           expert_router=bool(ex.get("router", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise HFFormatError(f"{where}: sleep_jax_experts={ex!r} is not valid ({e!r}); "
                            "expected {'slots': E, 'rank': R, 'router': bool}") from None


def config_to_hf(cfg: ModelConfig, tokens: dict | None = None) -> dict:
    """HF LlamaConfig dict for ``cfg`` (legacy rope keys, read by transformers v4 and v5);
    expert slots as ``sleep_jax_experts`` (module docstring)."""
    tokens = tokens or {}
    rope = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab, "hidden_size": cfg.embed, "intermediate_size": cfg.mlp,
            "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "hidden_act": "silu", "rope_theta": cfg.rope_theta, "rope_scaling": rope,
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_seq_len, "attention_bias": False,
            "mlp_bias": False, "torch_dtype": "float32",
            "bos_token_id": tokens.get("bos_id"), "eos_token_id": tokens.get("eos_id"),
            "pad_token_id": tokens.get("pad_id"),
            **({"sleep_jax_experts": {"slots": cfg.expert_slots, "rank": cfg.expert_rank,
                                      "router": cfg.expert_router}}
               if cfg.expert_slots else {})}


_EXPERT = "mlp.sleep_jax_expert_"


def _expert_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    E, R, D = cfg.expert_slots, cfg.expert_rank, cfg.embed
    if not E:
        return {}
    parts = {"a": (E, D, R), "b": (E, R, D), "mask": (E,)}
    if cfg.expert_router:
        parts.update({"router": (E, D), "router_bias": (E,)})
    return {f"model.layers.{i}.{_EXPERT}{k}": v for i in range(cfg.layers)
            for k, v in parts.items()}


# ----------------------------------------------------------------------------- safetensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of one .safetensors file (F32/F16/BF16/ints; no torch needed)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HFFormatError(f"{path}: not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise HFFormatError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}; "
                                f"supported: {', '.join(_ST_DTYPES)}")
        a, b = info["data_offsets"]
        out[name] = data[a:b].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _hf_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    L, D, F, N, K, H, V = (cfg.layers, cfg.embed, cfg.mlp, cfg.heads, cfg.kv_heads,
                           cfg.head_dim, cfg.vocab)
    names = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(L):
        p = f"model.layers.{i}."
        names.update({p + "input_layernorm.weight": (D,),
                      p + "post_attention_layernorm.weight": (D,),
                      p + "self_attn.q_proj.weight": (N * H, D),
                      p + "self_attn.k_proj.weight": (K * H, D),
                      p + "self_attn.v_proj.weight": (K * H, D),
                      p + "self_attn.o_proj.weight": (D, N * H),
                      p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                      p + "mlp.down_proj.weight": (D, F)})
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = (V, D)
    names.update(_expert_names(cfg))
    return names


def params_from_hf_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig,
                           where: str = "safetensors") -> dict:
    """Our nested fp32 params from HF tensor names (see the module docstring's table)."""
    expected = _hf_names(cfg)
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    for name in tensors:
        if name not in expected and name not in ignorable and not name.endswith(
                "rotary_emb.inv_freq"):
            raise HFFormatError(f"{where}: unexpected tensor {name!r} (not part of a Llama "
                                f"model with this config)")
    for name, shape in expected.items():
        if name not in tensors:
            raise HFFormatError(f"{where}: tensor {name!r} is missing (expected shape {shape})")
        if tuple(tensors[name].shape) != shape:
            raise HFFormatError(f"{where}: tensor {name!r} has shape "
                                f"{tuple(tensors[name].shape)}, expected {shape}")

    L, D, N, K, H = cfg.layers, cfg.embed, cfg.heads, cfg.kv_heads, cfg.head_dim

    def t(name):
        return np.asarray(tensors[name], np.float32)

    def stack(fn):
        return np.ascontiguousarray(np.stack([fn(f"model.layers.{i}.") for i in range(L)]))

    params = {
        "embed": t("model.embed_tokens.weight"),
        "blocks": {
            "attn_norm": stack(lambda p: t(p + "input_layernorm.weight")),
            "q": stack(lambda p: t(p + "self_attn.q_proj.weight").reshape(N, H, D)
                       .transpose(2, 0, 1)),
            "k": stack(lambda p: t(p + "self_attn.k_proj.weight").reshape(K, H, D)
                       .transpose(2, 0, 1)),
            "v": stack(lambda p: t(p + "self_attn.v_proj.weight").reshape(K, H, D)
                       .transpose(2, 0, 1)),
            "o": stack(lambda p: t(p + "self_attn.o_proj.weight").T.reshape(N, H, D)),
            "mlp_norm": stack(lambda p: t(p + "post_attention_layernorm.weight")),
            "gate": stack(lambda p: t(p + "mlp.gate_proj.weight").T),
            "up": stack(lambda p: t(p + "mlp.up_proj.weight").T),
            "down": stack(lambda p: t(p + "mlp.down_proj.weight").T),
        },
        "final_norm": t("model.norm.weight"),
    }
    if not cfg.tie_embeddings:
        params["unembed"] = np.ascontiguousarray(t("lm_head.weight").T)
    if cfg.expert_slots:
        ex = lambda k: stack(lambda p: t(p + _EXPERT + k))
        params["blocks"].update(expert_a=ex("a"), expert_b=ex("b"), expert_mask=ex("mask"))
        if cfg.expert_router:
            params["blocks"]["expert_router"] = ex("router")[..., None]
            params["blocks"]["expert_router_bias"] = ex("router_bias")[..., None]
    return params


def hf_tensors_from_params(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Inverse of ``params_from_hf_tensors``: HF names -> contiguous fp32 arrays."""
    L, D, N, K, H = cfg.layers, cfg.embed, cfg.heads, cfg.kv_heads, cfg.head_dim
    b = {k: np.asarray(v, np.float32) for k, v in params["blocks"].items()}
    out = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
           "model.norm.weight": np.asarray(params["final_norm"], np.float32)}
    for i in range(L):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = b["attn_norm"][i]
        out[p + "post_attention_layernorm.weight"] = b["mlp_norm"][i]
        out[p + "self_attn.q_proj.weight"] = b["q"][i].transpose(1, 2, 0).reshape(N * H, D)
        out[p + "self_attn.k_proj.weight"] = b["k"][i].transpose(1, 2, 0).reshape(K * H, D)
        out[p + "self_attn.v_proj.weight"] = b["v"][i].transpose(1, 2, 0).reshape(K * H, D)
        out[p + "self_attn.o_proj.weight"] = b["o"][i].reshape(N * H, D).T
        out[p + "mlp.gate_proj.weight"] = b["gate"][i].T
        out[p + "mlp.up_proj.weight"] = b["up"][i].T
        out[p + "mlp.down_proj.weight"] = b["down"][i].T
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["unembed"], np.float32).T
    if cfg.expert_slots:
        parts = {"a": b["expert_a"], "b": b["expert_b"], "mask": b["expert_mask"]}
        if cfg.expert_router:
            parts.update(router=b["expert_router"][..., 0],
                         router_bias=b["expert_router_bias"][..., 0])
        for i in range(L):
            out.update({f"model.layers.{i}.{_EXPERT}{k}": v[i] for k, v in parts.items()})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- folders


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path}: not valid JSON ({e})") from None


def _tokens_from_hf(folder: str, hf: dict, tokenizer) -> dict:
    tc_path = os.path.join(folder, "tokenizer_config.json")
    tc = _read_json(tc_path) if os.path.isfile(tc_path) else {}
    template = tc.get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        with open(jinja) as f:
            template = f.read()

    def tid(key, tok_key):
        v = hf.get(key)
        if isinstance(v, list):  # several EOS ids: the first is the end-of-turn one we stop on
            v = v[0] if v else None
        if v is None and tokenizer is not None and isinstance(tc.get(tok_key), str):
            v = tokenizer.token_to_id(tc[tok_key])
        return None if v is None else int(v)

    return {"bos_id": tid("bos_token_id", "bos_token"), "eos_id": tid("eos_token_id", "eos_token"),
            "pad_id": tid("pad_token_id", "pad_token"), "unk_id": tid("unk_token_id", "unk_token"),
            "add_bos": bool(tc.get("add_bos_token", False)),
            "chat_template": template if isinstance(template, str) else None}


def import_hf(folder: str | os.PathLike):
    """Read an HF Llama folder into (cfg, params, tokenizer_or_None, tokens, extra).

    Args:
      folder: holds config.json, model.safetensors (or shards listed by
        model.safetensors.index.json, or any *.safetensors), optionally tokenizer.json,
        tokenizer_config.json / chat_template.jinja.
    Returns:
      cfg: ModelConfig; params: nested fp32 numpy dict in our layout; tokenizer:
      tokenizers.Tokenizer or None; tokens: special ids + chat template; extra: provenance.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"HF folder {folder!r} does not exist")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path!r} is missing: not an HF model folder")
    hf = _read_json(cfg_path)
    cfg = _experts_from_hf(hf, config_from_hf(hf, cfg_path), cfg_path)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
        files = [os.path.join(folder, f) for f in files]
    else:
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder!r} (.bin/pickle checkpoints "
                                f"are not read; convert them with save_pretrained("
                                f"safe_serialization=True))")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"safetensors shard {f!r} listed in the index is missing")
        tensors.update(read_safetensors(f))
    params = params_from_hf_tensors(tensors, cfg, where=folder)
    tokenizer = None
    tok_path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(tok_path)
    tokens = _tokens_from_hf(folder, hf, tokenizer)
    extra = {"source": folder, "source_format": "hf"}
    return cfg, params, tokenizer, tokens, extra


def export_hf(model, tokenizer, out_dir: str | os.PathLike, *, tokens: dict | None = None) -> str:
    """Write ``model`` as an HF folder loadable by ``LlamaForCausalLM.from_pretrained``.

    Writes model.safetensors (fp32), config.json, and with a tokenizer tokenizer.json and
    tokenizer_config.json (special tokens, chat template). Atomic (temp dir, then rename).

    Args:
      model: a Decoder (its expert slots are written as in the module docstring).
      tokenizer: tokenizers.Tokenizer or None.
      out_dir: the folder to create (an existing one is replaced).
      tokens: special ids and chat template (``meta["tokens"]`` of ``load_checkpoint``).
    Returns:
      The absolute folder path.
    """
    from flax import nnx
    from safetensors.numpy import save_file

    cfg = model.config
    hf = config_to_hf(cfg, tokens)
    params = nnx.to_pure_dict(nnx.state(model))
    tensors = hf_tensors_from_params(params, cfg)
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
            t = tokens or {}

            def spell(key):
                i = t.get(key)
                return None if i is None else tokenizer.id_to_token(i)

            tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spell("bos_id"),
                  "eos_token": spell("eos_id"), "pad_token": spell("pad_id"),
                  "unk_token": spell("unk_id"), "add_bos_token": bool(t.get("add_bos")),
                  "chat_template": t.get("chat_template")}
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump({k: v for k, v in tc.items() if v is not None}, f, indent=2)
        if os.path.exists(out_dir):
            trash = tmp + ".old"
            os.rename(out_dir, trash)
            os.rename(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
