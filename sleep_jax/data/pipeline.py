"""Token batches for language-model training: a grain pipeline from texts or (prompt, completion).

Stages (all deterministic given `seed`; the iterator's state round-trips for exact resume):

  source -> shard per process -> shuffle(seed, reshuffled each epoch) -> repeat(num_epochs)
         -> encode (tokenize, inputs/targets/loss_mask) -> pack into rows of T, or pad to T
         -> batch(B)

Encoding one example (a "segment"): seq = [bos] + tokens + [eos] (bos optional), then
inputs = seq[:-1], targets = seq[1:] (next-token prediction). A plain text puts loss on every
target; a (prompt, completion) pair only on targets that are completion tokens (the completion's
tokens and the final eos), so the model learns p(completion | prompt) and not the prompt.

Packing puts several segments in one row, first-fit over B rows at a time (grain's
`FirstFitPackIterDataset`, bins not shuffled). `segment_ids` number the segments of a row 1, 2, 3,
... (0 marks padding) and `positions` restart at 0 at each segment start, so a model that masks
attention with `segment_ids` sees each document alone, exactly as if it were padded to its own row.

Each batch is a dict of numpy arrays:

  inputs [B,T] int32       token ids fed to the model (0 in padding)
  targets [B,T] int32      next-token ids (0 in padding)
  positions [B,T] int32    position within the segment
  segment_ids [B,T] int32  1.. per segment, 0 in padding
  mask [B,T] bool          real tokens (segment_ids > 0)
  loss_mask [B,T] bool     targets that count in the loss

Multi-host: each process (jax.process_index() of jax.process_count()) reads examples
`i::count`, a disjoint slice; slices differ by at most one example and packing can give hosts
different numbers of rows, so lockstep training should use num_epochs=None and stop by steps.

Token ids: every encoded example is checked to lie in [0, vocab) on the host (`vocab` = the
model's vocabulary size; by default the tokenizer's own size), so a tokenizer larger than the
model stops the pipeline with a `TokenIdError` naming the example, the id and the vocabulary
size, instead of NaN logits for the rows that hold it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import grain
import numpy as np
from tokenizers import Tokenizer

from sleep_jax.data.tokenizers import (
    DEFAULT_SPECIALS,
    check_token_ids,
    check_vocab_size,
    special_ids,
    tokenizer_vocab_size,
)

logger = logging.getLogger(__name__)

Example = str | tuple[str, str] | Mapping[str, Any]
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "mask", "loss_mask")


def _as_str(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(f"{what} must be str or bytes, got {type(value).__name__}: {value!r}")


def split_example(example: Example) -> tuple[str, str | None]:
    """Returns (text, None) for a plain text, (prompt, completion) for a pair.

    Accepted examples: a str; a (prompt, completion) tuple or list; a mapping with "text" (e.g. a
    tfds record, bytes decoded as UTF-8) or with "prompt" and "completion"; an object with a
    `.text` attribute (`jsonl.Text`, `jsonl.Memory`).
    """
    if isinstance(example, (str, bytes)):
        return _as_str(example, "text"), None
    if isinstance(example, (tuple, list)) and len(example) == 2:
        return _as_str(example[0], "prompt"), _as_str(example[1], "completion")
    if isinstance(example, Mapping):
        if "prompt" in example and "completion" in example:
            return _as_str(example["prompt"], "prompt"), _as_str(example["completion"],
                                                                 "completion")
        if "text" in example:
            return _as_str(example["text"], "text"), None
    if hasattr(example, "text"):
        return _as_str(example.text, "text"), None
    raise TypeError("an example must be a str, a (prompt, completion) pair, or a mapping with "
                    f"'text' or 'prompt'+'completion'; got {type(example).__name__}: {example!r}")


class Encode:
    """Tokenizes one example into inputs/targets/loss_mask of length n <= seq_len (a grain map).

    Sequences longer than seq_len + 1 tokens (n > seq_len) are cut to their first seq_len + 1
    tokens (too_long="truncate", logged with a running count) or raise (too_long="error").
    Every id must lie in [0, vocab) (`vocab`: the model's vocabulary size, default the
    tokenizer's size); one outside raises `TokenIdError` naming the example, the id and vocab.
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, *, add_bos: bool = True,
                 too_long: Literal["truncate", "error"] = "truncate",
                 specials: Sequence[str] = DEFAULT_SPECIALS, vocab: int | None = None):
        if too_long not in ("truncate", "error"):
            raise ValueError(f"too_long must be 'truncate' or 'error', got {too_long!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        ids = special_ids(tokenizer, specials)
        self.vocab = (tokenizer_vocab_size(tokenizer) if vocab is None
                      else check_vocab_size(vocab))
        self.tokenizer, self.seq_len, self.too_long = tokenizer, seq_len, too_long
        self.bos, self.eos = (ids["bos"] if add_bos else None), ids["eos"]
        check_token_ids([ids["bos"], ids["eos"]], self.vocab,
                        where=f"special ids (bos {specials[1]!r}, eos {specials[2]!r})")
        self.num_truncated = 0

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, example: Example) -> dict[str, np.ndarray]:
        text, completion = split_example(example)
        head = [] if self.bos is None else [self.bos]
        if completion is None:
            seq = head + self._ids(text) + [self.eos]
            prompt_len = 1  # every target counts
        else:
            prompt = head + self._ids(text)
            seq = prompt + self._ids(completion) + [self.eos]
            prompt_len = len(prompt)
        if len(seq) < 2:
            raise ValueError(f"example {example!r} encodes to {seq}: nothing to predict "
                             "(use add_bos=True or a non-empty text)")
        if len(seq) - 1 > self.seq_len:
            if self.too_long == "error":
                raise ValueError(f"example of {len(seq) - 1} tokens exceeds seq_len="
                                 f"{self.seq_len}: {str(example)[:80]!r}... (raise seq_len or "
                                 "pass too_long='truncate')")
            self.num_truncated += 1
            if self.num_truncated & (self.num_truncated - 1) == 0:  # 1, 2, 4, 8, ...
                logger.warning("truncated %d example(s) so far to seq_len=%d (latest had %d "
                               "tokens)", self.num_truncated, self.seq_len, len(seq) - 1)
            seq = seq[: self.seq_len + 1]
        seq = np.asarray(seq, np.int32)
        check_token_ids(seq, self.vocab, where=f"example {str(example)[:80]!r}")
        # Target j is seq[j + 1]; it is a completion token when j + 1 >= prompt_len.
        loss_mask = (np.arange(1, len(seq)) >= prompt_len).astype(np.int32)
        return {"inputs": seq[:-1], "targets": seq[1:], "loss_mask": loss_mask}


def pad_batch(segments: Sequence[dict[str, np.ndarray]], length: int, *,
              vocab: int | None = None) -> dict[str, np.ndarray]:
    """Right-pads encoded examples to one row each (B = len(segments), T = length).

    Args:
      segments: dicts with "inputs", "targets", "loss_mask" (as `Encode` returns).
      length: T; every segment must fit.
      vocab: when given, every input and target id must lie in [0, vocab) (`TokenIdError`
        naming the segment, the id and vocab otherwise); segments from `Encode` are already
        checked.

    Returns:
      The batch dict (see the module docstring), one segment per row.
    """
    b = len(segments)
    for row, seg in enumerate(segments):
        if len(seg["inputs"]) > length:
            raise ValueError(f"segment {row} has {len(seg['inputs'])} tokens > length {length}")
        if vocab is not None:
            for k in ("inputs", "targets"):
                check_token_ids(seg[k], vocab, where=f"segment {row} {k}")
    out = {k: np.zeros((b, length), np.int32) for k in ("inputs", "targets", "positions",
                                                         "segment_ids", "loss_mask")}
    for row, seg in enumerate(segments):
        n = len(seg["inputs"])
        for k in ("inputs", "targets", "loss_mask"):
            out[k][row, :n] = seg[k]
        out["positions"][row, :n] = np.arange(n)
        out["segment_ids"][row, :n] = 1
    return _finish(out)


def _finish(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mask = row["segment_ids"] > 0
    return {"inputs": row["inputs"], "targets": row["targets"], "positions": row["positions"],
            "segment_ids": row["segment_ids"], "mask": mask,
            "loss_mask": row["loss_mask"].astype(bool) & mask}


def _finish_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _finish({"inputs": row["inputs"], "targets": row["targets"],
                    "positions": row["inputs_positions"], "segment_ids": row["inputs_segment_ids"],
                    "loss_mask": row["loss_mask"]})


@dataclasses.dataclass(frozen=True)
class _PadToBucket:
    """Pads a batch to the smallest bucket length that holds its longest example."""

    buckets: tuple[int, ...]

    def __call__(self, segments: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        longest = max(len(s["inputs"]) for s in segments)
        return pad_batch(segments, next(b for b in self.buckets if b >= longest))


def make_dataset(
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    pack: bool = True,
    shuffle: bool = True,
    num_epochs: int | None = None,
    add_bos: bool = True,
    too_long: Literal["truncate", "error"] = "truncate",
    buckets: Sequence[int] | None = None,
    drop_remainder: bool = True,
    shard: tuple[int, int] | None = None,
    specials: Sequence[str] = DEFAULT_SPECIALS,
    read_options: grain.ReadOptions | None = None,
    vocab: int | None = None,
) -> grain.IterDataset:
    """Builds the batch pipeline described in the module docstring.

    Args:
      examples: a random-access sequence (list, tfds data source) of texts, (prompt, completion)
        pairs or mappings (see `split_example`).
      tokenizer: a `tokenizers.Tokenizer` holding the `specials`.
      seq_len: T, the row length.
      batch_size: B, rows per batch.
      seed: shuffling seed (each epoch is reshuffled from it).
      pack: pack several examples per row (True) or one example per padded row (False).
      shuffle: shuffle examples; False keeps the given order.
      num_epochs: passes over the examples; None repeats forever.
      add_bos: start every example with `<bos>`.
      too_long: "truncate" (with a logged count) or "error" for examples longer than T.
      buckets: padding mode only: pad each batch to the smallest of these lengths (and T) that
        holds its longest example, so jit sees a few fixed shapes instead of one long one.
      drop_remainder: drop a last incomplete batch (keeps shapes fixed).
      shard: (index, count) of this reader; default (jax.process_index(), jax.process_count()).
      specials: the tokenizer's (pad, bos, eos, unk) strings.
      read_options: grain's reader threads and prefetch buffer; the default (1 thread, 16
        elements ahead) suits small in-memory data; raise both for large sources.
      vocab: the model's vocabulary size V: every token id must lie in [0, V) (`TokenIdError`
        naming the example, the id and V otherwise). Default: the tokenizer's own size; pass the
        model's `config.vocab` so a tokenizer larger than the model is caught.

    Returns:
      A `grain.IterDataset` of batch dicts: inputs, targets, positions, segment_ids [B,T] int32;
      mask, loss_mask [B,T] bool (T is the bucket length when `buckets` is given).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    if buckets is not None and pack:
        raise ValueError("buckets apply to padding only; pass pack=False or buckets=None")
    if shard is None:
        import jax

        shard = (jax.process_index(), jax.process_count())
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}), got {index}")
    if read_options is None:
        # grain's default (16 threads, 500 elements ahead) would tokenize hundreds of batches
        # on every new iterator, which costs more than it saves for small data.
        read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)
    encode = Encode(tokenizer, seq_len, add_bos=add_bos, too_long=too_long, specials=specials,
                    vocab=vocab)

    ds = grain.MapDataset.source(examples)
    if count > 1:
        ds = ds[index::count]
    if len(ds) == 0:
        raise ValueError(f"no examples for shard {index} of {count} ({len(examples)} in total)")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(encode)

    if pack:
        length = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
        packed = grain.experimental.FirstFitPackIterDataset(
            ds.to_iter_dataset(read_options), length_struct=length, num_packing_bins=batch_size,
            shuffle_bins=False)
        return packed.map(_finish_packed).batch(batch_size, drop_remainder=drop_remainder)

    lengths = sorted({seq_len, *(buckets or ())})
    if lengths[-1] > seq_len or lengths[0] < 1:
        raise ValueError(f"buckets must lie in [1, seq_len={seq_len}], got {sorted(buckets)}")
    batches = ds.batch(batch_size, drop_remainder=drop_remainder,
                       batch_fn=_PadToBucket(tuple(lengths)))
    return batches.to_iter_dataset(read_options)


def make_iterator(ds: grain.IterDataset) -> grain.DatasetIterator:
    """An iterator over `ds` with `get_state()`/`set_state(state)` for exact resume.

    Save `it.get_state()` (or `grain.checkpoint.CheckpointSave(it)` in an orbax Composite) with
    the model; `make_iterator(ds).set_state(state)` then yields exactly the batches that followed.
    """
    return iter(ds)
