"""Data: tokenizers, JSONL memories/probes/texts, grain batch pipelines, tfds array_record sources.

`tfds_source` is not imported here (tensorflow-datasets is a heavier import): use
`from sleep_jax.data.tfds_source import build_text_dataset, tfds_text_source`.
"""

from sleep_jax.data.jsonl import (
    JsonlError,
    Memory,
    Probe,
    Text,
    read_memories,
    read_probes,
    read_texts,
    write_jsonl,
)
from sleep_jax.data.pipeline import BATCH_KEYS, Encode, make_dataset, make_iterator, pad_batch
from sleep_jax.data.tokenizers import (
    DEFAULT_SPECIALS,
    byte_level_tokenizer,
    encode_batch,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    word_level_tokenizer,
)

__all__ = [
    "BATCH_KEYS", "DEFAULT_SPECIALS", "Encode", "JsonlError", "Memory", "Probe", "Text",
    "byte_level_tokenizer", "encode_batch", "load_tokenizer", "make_dataset", "make_iterator",
    "pad_batch", "read_memories", "read_probes", "read_texts", "save_tokenizer", "special_ids",
    "word_level_tokenizer", "write_jsonl",
]
