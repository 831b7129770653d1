"""Atomic file writes: readers see either the old file or the complete new one, never half of one.

Everything is written to a uniquely named temporary file in the destination's
folder (same file system) and renamed over the destination when complete; on
any error the temporary file is removed and the destination is untouched.

The finished file has the permissions a plain ``open(path, "w")`` would give:
``0666 & ~umask`` for a new file (``tempfile.mkstemp`` would give 0600, which
hides metrics and references from colleagues on a shared cluster), the old
file's mode when one is replaced.  An :class:`OSError` on the way (disk full,
read-only folder) is raised as :class:`utils.errors.OutputError` naming the
destination.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import secrets
from typing import Any, Iterator

from utils.errors import OutputError

__all__ = ["check_output_dir", "ensure_dir", "atomic_path", "create_temp", "write_bytes_atomic", "write_text_atomic",
           "write_json_atomic"]


def check_output_dir(path: os.PathLike | str, flag: str = "output folder") -> pathlib.Path:
    """Check, before any work, that the folder ``path`` can be created and written; leave no trace.

    Missing folders are created to prove it (a read-only or pseudo file system
    refuses only then) and removed again, so a command that fails later on
    another input leaves nothing behind.  Raises :class:`OutputError` naming ``flag``.
    """
    path = pathlib.Path(path).expanduser()
    missing, existing = [], path
    while not os.path.lexists(existing) and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    created = []
    try:
        if not existing.is_dir():
            raise OutputError(path, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), flag)
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(path, PermissionError(errno.EACCES, os.strerror(errno.EACCES)), flag)
    except OSError as exc:
        raise OutputError(path, exc, flag) from exc
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return path


def ensure_dir(path: os.PathLike | str, flag: str = "output folder") -> pathlib.Path:
    """Create the output folder ``path`` (and its parents) and check that it is writable, before any work.

    Raises :class:`OutputError` naming ``path``, the cause and ``flag`` (the option that chose it),
    so that a run stops at once instead of after computing everything.
    """
    path = pathlib.Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(path, exc, flag) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(path, PermissionError(errno.EACCES, os.strerror(errno.EACCES)), flag)
    return path


def create_temp(folder: os.PathLike | str, prefix: str, suffix: str, mode: int = 0o666) -> pathlib.Path:
    """Create a new empty file ``folder/<prefix><random><suffix>`` (``O_EXCL``) with ``mode & ~umask``.

    Unlike ``tempfile.mkstemp`` (always 0600) the kernel applies the umask, as for ``open()``.
    ``O_EXCL`` keeps the name unique even for processes on other hosts sharing the folder.
    """
    folder = pathlib.Path(folder)
    while True:
        path = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str, suffix: str = ".tmp", flag: str = "output folder") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    ``suffix`` lets writers that pick a format from the extension (``np.savez``,
    ``savefig``) see the right one, e.g. ``suffix=".tmp.npz"``.  ``flag`` names
    the option that chose the folder, for the fix in an :class:`OutputError`.
    """
    path = pathlib.Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = create_temp(path.parent, f".{path.name}.", suffix)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)  # replacing a file keeps its mode, as open() does
        yield str(tmp)
        os.replace(tmp, path)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(path, exc, flag) from exc
    finally:
        if tmp is not None and os.path.lexists(tmp):
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
