"""Evaluate a model on question probes (greedy answers scored by EM/F1) and KL to a base model.

Closed book: the prompt is the question alone. Open book: the memory is given in context (the
teacher's level). Shapes are padded to fixed sizes so each model compiles once per shape.

Every prompt's token ids and the bos/eos/pad ids are checked on the host against the model's
vocabulary (`model.config.vocab`, else the tokenizer's size): an id outside [0, vocab) raises
`TokenIdError` naming the prompt, the id and the vocabulary size (on the device it would make the
row's logits NaN and the greedy answer silently token 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sleep_jax.data.tokenizers import (
    check_token_ids,
    check_vocab_size,
    pad_rows,
    tokenizer_vocab_size,
)
from sleep_jax.eval import qa
from sleep_jax.runtime import host_read
from sleep_jax.sampling import generate


def _round_up(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)


def model_vocab(model, tokenizer=None) -> int | None:
    """The vocabulary size ids must fit: ``model.config.vocab`` when the model has one, else the
    tokenizer's size (None when neither is known)."""
    vocab = getattr(getattr(model, "config", None), "vocab", None)
    if vocab is not None:
        return check_vocab_size(vocab, "model.config.vocab")
    return None if tokenizer is None else tokenizer_vocab_size(tokenizer)


def check_special_ids(vocab: int, **ids: int | None) -> None:
    """Raises TokenIdError for a special id (bos_id=..., eos_id=..., pad_id=...) outside
    [0, vocab); None values are skipped."""
    for name, i in ids.items():
        if i is not None:
            check_token_ids(i, vocab, where=name)


def encode_prompts(tokenizer, prompts: Sequence[str], *, bos_id: int | None, pad_id: int,
                   length: int | None = None, vocab: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompt tokens [B,P] and lengths [B] (P rounded up to a multiple of 16).

    Every id (bos, pad, each prompt's tokens) must lie in [0, vocab) (default: the tokenizer's
    size); one outside raises `TokenIdError` naming the prompt, the id and vocab.
    """
    if not prompts:
        raise ValueError("no prompts to encode (got an empty list)")
    vocab = tokenizer_vocab_size(tokenizer) if vocab is None else check_vocab_size(vocab)
    check_special_ids(vocab, bos_id=bos_id, pad_id=pad_id)
    ids = [([] if bos_id is None else [bos_id]) + tokenizer.encode(p).ids for p in prompts]
    for i, x in enumerate(ids):
        check_token_ids(x, vocab, where=f"prompt {i} {prompts[i][:60]!r}")
    return pad_rows(ids, pad_id=pad_id, width=length or None, multiple=16, where="prompt")


def _split_one_device(model):
    """``nnx.split(model)`` with every array that lives on one device as a committed
    single-device array on that device (the same buffer: no copy). Models that differ only in
    how their one-device arrays are placed (a one-device mesh, committed or not, as after
    training under a mesh or a fresh copy) then share each compiled evaluation program instead
    of compiling it again. Arrays over several devices are left as they are."""
    graphdef, state = nnx.split(model)

    def plain(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) == 1:
            (device,) = x.sharding.device_set
            return jax.device_put(x, jax.sharding.SingleDeviceSharding(device))
        return x

    return graphdef, jax.tree.map(plain, state)


@jax.jit(static_argnums=(0, 4, 5, 6))
def _greedy(graphdef, state, tokens, lengths, max_new_tokens, eos_id, pad_id):
    model = nnx.merge(graphdef, state)
    out = generate(model, tokens, lengths, jax.random.key(0), max_new_tokens=max_new_tokens,
                   temperature=0.0, eos_id=eos_id, pad_id=pad_id)
    return out.tokens, out.mask


def answer(model, tokenizer, prompts: Sequence[str], *, bos_id: int | None, eos_id: int,
           pad_id: int = 0, batch_size: int = 256, max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (decoded, EOS dropped) to ``prompts``, in order.

    Token ids are checked against ``model.config.vocab`` first (`TokenIdError`, see the module
    docstring).
    """
    vocab = model_vocab(model, tokenizer)
    check_special_ids(vocab, eos_id=eos_id)
    tokens, lengths = encode_prompts(tokenizer, prompts, bos_id=bos_id, pad_id=pad_id,
                                     vocab=vocab)
    graphdef, state = _split_one_device(model)
    n = len(prompts)
    B = min(batch_size, _round_up(n, 8))
    answers = []
    for i in range(0, n, B):
        t, ln = tokens[i:i + B], lengths[i:i + B]
        if len(t) < B:  # pad the last batch so the shape (and the compiled program) is shared
            t = np.concatenate([t, np.repeat(t[:1], B - len(t), 0)])
            ln = np.concatenate([ln, np.repeat(ln[:1], B - len(ln), 0)])
        out, mask = _greedy(graphdef, state, jnp.asarray(t), jnp.asarray(ln), max_new_tokens,
                            eos_id, pad_id)
        out, mask = host_read((out, mask))  # also when the model spans processes
        for row, m in zip(out, mask):
            ids = [int(x) for x, k in zip(row, m) if k and x != eos_id]
            answers.append(tokenizer.decode(ids))
    return answers[:n]


def qa_scores(model, tokenizer, prompts: Sequence[str], golds: Sequence[Sequence[str]],
              cut: str = "none", **kw) -> dict:
    """{"em", "f1", "n", "predictions"} of greedy answers against gold answer lists; ``cut``:
    the part of each answer scored (``qa.cut_answer``; the predictions are the cut ones)."""
    preds = [qa.cut_answer(p, cut) for p in answer(model, tokenizer, prompts, **kw)]
    out = qa.score(preds, golds)
    out["predictions"] = preds
    return out


@jax.jit(static_argnums=(0, 2))
def _kl_sum(base_graphdef, base_state, graphdef, state, tokens, positions, mask):
    base = nnx.merge(base_graphdef, base_state)
    model = nnx.merge(graphdef, state)
    lp = jax.nn.log_softmax(base(tokens, positions, mask=mask)[0], -1)
    lq = jax.nn.log_softmax(model(tokens, positions, mask=mask)[0], -1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
    m = mask.astype(jnp.float32)
    return jnp.sum(kl * m), jnp.sum(m)


def kl_to_base(model, base, tokenizer, texts: Sequence[str], *, bos_id: int | None,
               pad_id: int = 0, batch_size: int = 128) -> float:
    """Mean per-token KL(base || model) of next-token distributions on ``texts``.

    Token ids are checked against both models' ``config.vocab`` first (`TokenIdError`).
    """
    vocabs = [v for v in (model_vocab(model), model_vocab(base)) if v is not None]
    vocab = min(vocabs) if vocabs else None
    tokens, lengths = encode_prompts(tokenizer, texts, bos_id=bos_id, pad_id=pad_id,
                                     vocab=vocab)
    bg, bs = _split_one_device(base)
    g, s = _split_one_device(model)
    n, T = tokens.shape
    total, count = 0.0, 0.0
    for i in range(0, n, batch_size):
        t = tokens[i:i + batch_size]
        ln = lengths[i:i + batch_size]
        if len(t) < batch_size:
            pad = batch_size - len(t)
            t = np.concatenate([t, np.zeros((pad, T), np.int32)])
            ln = np.concatenate([ln, np.zeros(pad, np.int32)])
        mask = np.arange(T)[None] < ln[:, None]
        pos = np.broadcast_to(np.arange(T, dtype=np.int32), t.shape)
        a, c = _kl_sum(bg, bs, g, s, jnp.asarray(t), jnp.asarray(pos), jnp.asarray(mask))
        total, count = total + float(a), count + float(c)
    return total / max(count, 1.0)
