"""The saved dream generator: the adapter leaves of a trained generator beside a checkpoint.

``sleep-jax dream`` (``dream.cli``) writes DIR/model: the grown checkpoint (both dreaming slots
on, the generator slot's B = 0, so it computes what its input did) with ``GENERATOR_FILE``
beside it (npz, one array per adapter leaf, keys the dotted leaf paths of
``train.adapters.extract_adapter``: ``blocks.expert_a`` [L,D,R], ``blocks.expert_b`` [L,R,D],
router leaves when the model has one) and ``extra["dream"]`` in config.json (the slots, the
dream template, the DreamConfig and RLConfig it trained with). The sleep pipeline reads it
back (``read_generator_adapter``: no model weights loaded) to dream about new memories
(``dream.rehearse``).
"""

from __future__ import annotations

import os

GENERATOR_FILE = "dream_generator.npz"  # beside the model: the generator adapter's leaves


def save_generator(directory: str, params) -> str:
    """The generator adapter's leaves as ``directory/GENERATOR_FILE`` (npz, keys the leaf
    paths); returns the path."""
    import numpy as np

    from sleep_jax.atomic import atomic_open

    arrays = {k: np.asarray(v[...]) for k, v in params.items()}
    path = os.path.join(directory, GENERATOR_FILE)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _adapter_and_info(directory: str, meta: dict):
    import numpy as np

    info = meta.get("extra", {}).get("dream")
    path = os.path.join(os.fspath(directory), GENERATOR_FILE)
    if info is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} holds no dream generator (expected "
                                f"{GENERATOR_FILE} and extra.dream in config.json: the "
                                f"model/ folder that `sleep-jax dream` writes)")
    with np.load(path) as z:
        adapter = {k: z[k] for k in z.files}
    return adapter, info


def read_generator(directory: str):
    """(model, tokenizer, generator adapter {leaf path: array}, dream meta) of a checkpoint
    written by ``sleep-jax dream``."""
    from sleep_jax.models.checkpoint_dir import load_checkpoint

    model, tok, meta = load_checkpoint(directory)
    adapter, info = _adapter_and_info(directory, meta)
    return model, tok, adapter, info


def read_generator_adapter(directory: str):
    """(ModelConfig, generator adapter {leaf path: array}, dream meta, tokenizer vocab or None)
    of a ``sleep-jax dream`` output, without loading the model's weights."""
    from sleep_jax.models.checkpoint_dir import TOKENIZER_FILE, read_config

    cfg, meta = read_config(directory)
    adapter, info = _adapter_and_info(directory, meta)
    vocab = None
    tok_path = os.path.join(os.fspath(directory), TOKENIZER_FILE)
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(tok_path).get_vocab()
    return cfg, adapter, info, vocab
