"""Atomic file writes: readers see either the old file or the complete new one, never half of one.

Everything is written to a uniquely named temporary file in the destination's
folder (same file system) and renamed over the destination when complete; on
any error the temporary file is removed and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any, Iterator

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic", "write_json_atomic"]


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    ``suffix`` lets writers that pick a format from the extension (``np.savez``,
    ``savefig``) see the right one, e.g. ``suffix=".tmp.npz"``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: os.PathLike | str, data: bytes) -> pathlib.Path:
    with atomic_path(path) as tmp:
        pathlib.Path(tmp).write_bytes(data)
    return pathlib.Path(path)


def write_text_atomic(path: os.PathLike | str, text: str) -> pathlib.Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(text)
    return pathlib.Path(path)


def write_json_atomic(path: os.PathLike | str, obj: Any, indent: int = 4) -> pathlib.Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
