"""Tokenizers built with HF `tokenizers`: a word-level one for the demo, a byte-level one for tests.

Both are plain `tokenizers.Tokenizer` objects saved and loaded as one `tokenizer.json` (the
checkpoint directory format). Neither adds special tokens by itself: the data pipeline adds
`<bos>`/`<eos>` explicitly, so what a loss sees is decided in one place. Special tokens take the
first ids in the order (pad, bos, eos, unk), so `<pad>` is 0.

Word level: the pre-tokenizer marks word starts with "▁" (SentencePiece's Metaspace) and splits
punctuation into its own tokens, so `decode(encode(x)) == x` for ordinary single-spaced text
("Where is Paris?" -> ["▁Where", "▁is", "▁Paris", "?"]). Newlines are tokens of their own. Words
not seen when the vocabulary was built map to `<unk>`.

Token ids outside [0, vocab) are refused on the host, where data enters (`check_token_ids`):
on the device an id >= vocab reads a NaN embedding row (`jnp.take` fills out-of-range reads)
and an id < 0 wraps around, both silently. The pipeline, probe evaluation, the CLI prompts and
checkpoint loading all call it.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from sleep_jax.atomic import write_text

DEFAULT_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_SPECIAL_ROLES = ("pad", "bos", "eos", "unk")
_SPACE = "\u2581"  # "▁", SentencePiece's word-start marker.
TOKENIZER_FILE = "tokenizer.json"


class TokenIdError(ValueError):
    """A token id outside [0, vocab); names where it was found, the id and the vocabulary size."""

    def __init__(self, where: str, token_id: int, index, vocab: int):
        self.where, self.token_id, self.index, self.vocab = where, token_id, index, vocab
        why = ("negative ids are never valid" if token_id < 0 else
               f"the largest valid id is {vocab - 1}; was the text encoded with a tokenizer "
               "larger than the model's vocabulary?")
        at = "" if index is None else f" at index {index}"
        super().__init__(f"{where}: token id {token_id}{at} is outside the vocabulary of size "
                         f"{vocab} (allowed: 0 <= id < {vocab}; {why})")


def check_vocab_size(vocab, what: str = "vocab") -> int:
    """`vocab` as an int after checking it is a positive integer (ValueError otherwise)."""
    if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or vocab < 1:
        raise ValueError(f"{what} must be a positive integer (the vocabulary size), got "
                         f"{vocab!r}")
    return int(vocab)


def pad_rows(rows: Sequence[Sequence[int]], *, pad_id: int = 0, width: int | None = None,
             multiple: int = 1, min_len: int = 0, where: str = "row"
             ) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token-id lists into one host array: (tokens [N,W] int32, lengths [N] int32).

    The one host-side row padding (prompts, judge rows, completions, seeding prefixes).

    Args:
      rows: N token-id lists.
      pad_id: the id written after each row.
      width: W; default the longest row rounded up to ``multiple``.
      multiple: round the default width up to a multiple of this (jit shape buckets).
      min_len: refuse rows shorter than this (e.g. 1: a prompt needs a token to predict from).
      where: the rows' name in error messages.
    Raises:
      ValueError: a row longer than ``width`` or shorter than ``min_len`` (named by index).
    """
    lens = np.array([len(r) for r in rows], np.int32)
    if width is None:
        width = -(-max(int(lens.max()) if len(rows) else 0, 1) // multiple) * multiple
    out = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        if not min_len <= len(r) <= width:
            raise ValueError(f"{where} {i} has {len(r)} tokens; allowed {min_len}..{width}")
        out[i, :len(r)] = r
    return out, lens


def check_token_ids(ids, vocab: int, *, where: str = "token ids") -> None:
    """Raises `TokenIdError` unless every id in `ids` lies in [0, vocab).

    Call it on the host wherever token ids enter (encoded text, prompts, special ids): inside a
    jitted model an id >= vocab gives NaN logits and an id < 0 wraps around, without an error.

    Args:
      ids: an int, a sequence of ints, an integer array of any shape, or a sequence of such
        sequences (ragged rows are checked row by row).
      vocab: the vocabulary size V of the model the ids are for.
      where: what the ids are (e.g. "prompt 3 'Where ...'"), named in the error.

    Raises:
      TokenIdError (a ValueError) naming `where`, the first offending id, its index and V;
      TypeError when `ids` are not integers; ValueError when `vocab` is not a positive int.
    """
    vocab = check_vocab_size(vocab)
    try:
        arr = np.asarray(ids)
    except ValueError:  # ragged nested sequences (numpy >= 1.24 refuses them)
        arr = None
    if arr is None or arr.dtype == object:
        for i, row in enumerate(ids):
            check_token_ids(row, vocab, where=f"{where}[{i}]")
        return
    if arr.size == 0:
        return
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{where}: token ids must be integers, got dtype {arr.dtype} "
                        f"(e.g. {arr.reshape(-1)[0]!r})")
    bad = (arr < 0) | (arr >= vocab)
    if bad.any():
        flat = int(np.argmax(bad.reshape(-1)))
        index = (flat if arr.ndim == 1 else None if arr.ndim == 0 else
                 tuple(int(i) for i in np.unravel_index(flat, arr.shape)))
        raise TokenIdError(where, int(arr.reshape(-1)[flat]), index, vocab)


def tokenizer_vocab_size(tok: Tokenizer) -> int:
    """The number of ids `tok` can produce (its vocabulary including added tokens)."""
    return int(tok.get_vocab_size(with_added_tokens=True))


def _word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Split("\n", behavior="isolated"),
    ])


def _check_specials(specials: Sequence[str]) -> tuple[str, ...]:
    specials = tuple(specials)
    if len(specials) != 4 or len(set(specials)) != 4 or not all(specials):
        raise ValueError(
            f"specials must be 4 distinct non-empty strings (pad, bos, eos, unk), got {specials!r}")
    return specials


def word_level_tokenizer(
    corpus: Iterable[str],
    *,
    specials: Sequence[str] = DEFAULT_SPECIALS,
    lowercase: bool = False,
    min_count: int = 1,
) -> Tokenizer:
    """Builds a word-level tokenizer whose vocabulary is every word of `corpus`.

    Ids: specials first (pad, bos, eos, unk -> 0..3), then words by decreasing count, ties broken
    alphabetically, so the same corpus always gives the same ids.

    Args:
      corpus: texts to collect the vocabulary from.
      specials: the (pad, bos, eos, unk) token strings.
      lowercase: lowercase text before splitting (decoding then returns lowercase text).
      min_count: words seen fewer times map to `<unk>`.

    Returns:
      A `tokenizers.Tokenizer` (WordLevel model, Metaspace + punctuation pre-tokenizer, Metaspace
      decoder) with vocabulary size V = 4 + number of distinct words.
    """
    specials = _check_specials(specials)
    pre = _word_pre_tokenizer()
    norm = normalizers.Lowercase() if lowercase else None
    counts: collections.Counter[str] = collections.Counter()
    for text in corpus:
        if not isinstance(text, str):
            raise TypeError(f"corpus items must be str, got {type(text).__name__}: {text!r}")
        if norm is not None:
            text = norm.normalize_str(text)
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in specials),
                   key=lambda w: (-counts[w], w))
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({w: len(specials) + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[3]))
    if norm is not None:
        tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)
    tok.add_special_tokens(list(specials))
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel expects)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_level_tokenizer(*, specials: Sequence[str] = DEFAULT_SPECIALS) -> Tokenizer:
    """A tokenizer with one token per byte of UTF-8 text; needs no training.

    Ids: specials 0..3 (pad, bos, eos, unk), then byte b -> id 4 + b (V = 260). Any text that
    does not spell a special token ("<eos>") round-trips exactly; `<unk>` is never produced.

    Returns:
      A `tokenizers.Tokenizer` (BPE with no merges over ByteLevel characters).
    """
    specials = _check_specials(specials)
    byte_chars = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({byte_chars[b]: len(specials) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[3]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return tok


def special_ids(tok: Tokenizer, specials: Sequence[str] = DEFAULT_SPECIALS) -> dict[str, int]:
    """Ids of the (pad, bos, eos, unk) tokens, looked up by their strings.

    Args:
      tok: the tokenizer.
      specials: the (pad, bos, eos, unk) strings the tokenizer was built with.

    Returns:
      {"pad": int, "bos": int, "eos": int, "unk": int}.
    """
    specials = _check_specials(specials)
    ids = {role: tok.token_to_id(s) for role, s in zip(_SPECIAL_ROLES, specials)}
    missing = [s for s, i in zip(specials, ids.values()) if i is None]
    if missing:
        raise ValueError(f"tokenizer has no token(s) {missing}; pass the specials it was built "
                         f"with (pad, bos, eos, unk), e.g. specials={DEFAULT_SPECIALS!r}")
    return ids


def encode_batch(
    tok: Tokenizer, texts: Sequence[str], *, bos: int | None = None, eos: int | None = None,
    vocab: int | None = None,
) -> list[np.ndarray]:
    """Encodes texts to int32 id arrays, optionally framed by `bos`/`eos` ids.

    Args:
      tok: the tokenizer.
      texts: B strings.
      bos: id prepended to every sequence, or None.
      eos: id appended to every sequence, or None.
      vocab: the model's vocabulary size; every id must lie in [0, vocab) (`TokenIdError`
        otherwise). Default: the tokenizer's own size.

    Returns:
      B int32 arrays of varying length.
    """
    vocab = tokenizer_vocab_size(tok) if vocab is None else check_vocab_size(vocab)
    texts = list(texts)
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    head = [] if bos is None else [bos]
    tail = [] if eos is None else [eos]
    check_token_ids(head + tail, vocab, where="encode_batch bos/eos ids")
    out = []
    for i, e in enumerate(encodings):
        check_token_ids(e.ids, vocab, where=f"text {i} {texts[i][:60]!r}")
        out.append(np.asarray(head + e.ids + tail, np.int32))
    return out


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> str:
    """Saves `tok` as `path` (a .json file) or as `path/tokenizer.json` (a directory).

    Returns:
      The file written.
    """
    path = os.fspath(path)
    if not path.endswith(".json"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, TOKENIZER_FILE)
    # Atomic: a crash mid-save leaves the old file, not half of a new one. Same bytes as
    # tok.save(path).
    return write_text(path, tok.to_str(pretty=True))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a tokenizer.json file or a directory holding one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer file at {path!r} (expected a tokenizer.json file "
                                "or a directory containing one)")
    return Tokenizer.from_file(path)
