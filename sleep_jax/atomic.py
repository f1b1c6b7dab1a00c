"""Atomic file writes: a reader (or a re-run after a crash) sees the old file or the whole new one.

Every output file of the package (reports, config.json, JSONL exports, plots, checkpoint
metadata) goes through ``atomic_open``: the content is written to a temporary file in the same
directory, flushed to disk, then renamed over the target with ``os.replace`` (atomic on POSIX
file systems). On any exception the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"
                ) -> Iterator[IO]:
    """``open(path, mode)`` that only replaces ``path`` when the block ends without error.

    Args:
      path: the target file; its directory is created when missing.
      mode: "w" (text) or "wb" (bytes).
      encoding: text encoding (ignored for "wb").
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode={mode!r}; allowed: 'w', 'wb'")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_open(path) as f:
        f.write(text)
    return os.fspath(path)


def write_json(path: str | os.PathLike, obj: Any, **kw) -> str:
    """``json.dump(obj)`` to ``path`` atomically (indent 2 unless given); returns the path."""
    kw.setdefault("indent", 2)
    with atomic_open(path) as f:
        json.dump(obj, f, **kw)
        f.write("\n")
    return os.fspath(path)
