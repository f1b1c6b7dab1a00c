"""Tokenizers built with HF `tokenizers`: a word-level one for the demo, a byte-level one for tests.

Both are plain `tokenizers.Tokenizer` objects saved and loaded as one `tokenizer.json` (the
checkpoint directory format). Neither adds special tokens by itself: the data pipeline adds
`<bos>`/`<eos>` explicitly, so what a loss sees is decided in one place. Special tokens take the
first ids in the order (pad, bos, eos, unk), so `<pad>` is 0.

Word level: the pre-tokenizer marks word starts with "▁" (SentencePiece's Metaspace) and splits
punctuation into its own tokens, so `decode(encode(x)) == x` for ordinary single-spaced text
("Where is Paris?" -> ["▁Where", "▁is", "▁Paris", "?"]). Newlines are tokens of their own. Words
not seen when the vocabulary was built map to `<unk>`.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

DEFAULT_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_SPECIAL_ROLES = ("pad", "bos", "eos", "unk")
_SPACE = "\u2581"  # "▁", SentencePiece's word-start marker.
TOKENIZER_FILE = "tokenizer.json"


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
    tok: Tokenizer, texts: Sequence[str], *, bos: int | None = None, eos: int | None = None
) -> list[np.ndarray]:
    """Encodes texts to int32 id arrays, optionally framed by `bos`/`eos` ids.

    Args:
      tok: the tokenizer.
      texts: B strings.
      bos: id prepended to every sequence, or None.
      eos: id appended to every sequence, or None.

    Returns:
      B int32 arrays of varying length.
    """
    encodings = tok.encode_batch(list(texts), add_special_tokens=False)
    head = [] if bos is None else [bos]
    tail = [] if eos is None else [eos]
    return [np.asarray(head + e.ids + tail, np.int32) for e in encodings]


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> str:
    """Saves `tok` as `path` (a .json file) or as `path/tokenizer.json` (a directory).

    Returns:
      The file written.
    """
    path = os.fspath(path)
    if not path.endswith(".json"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, TOKENIZER_FILE)
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the old file, not half of a new one
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a tokenizer.json file or a directory holding one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer file at {path!r} (expected a tokenizer.json file "
                                "or a directory containing one)")
    return Tokenizer.from_file(path)
