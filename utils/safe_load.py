"""Read tensor files with ``torch.load(weights_only=True)`` and explain a failure in one line of our own.

torch's own messages for a damaged file are long, and for some truncated files
they advise re-running with ``weights_only=False``, which would execute code
from the file: we never pass that advice on.  :func:`load_error_kind` sorts a
failure into

* ``"truncated"``: the file ends early or its archive is damaged (an interrupted
  download or copy): delete it and download it again;
* ``"unsafe"``: the file is complete but asks for Python objects other than
  tensors and containers: refused, as loading it could run code;
* ``"unreadable"``: anything else (not a PyTorch file at all).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
import pickle
import re
import warnings
from typing import Any, Iterable

from utils.errors import UsageError

__all__ = ["global_exists", "load_error_kind", "load_weights", "quiet_torch_load", "REASONS"]

_TRUNCATED = re.compile(r"unexpected EOF|truncated|central directory|failed reading zip archive|"
                        r"file might be corrupted|Ran out of input|unpack requires a buffer|"
                        r"index out of range|invalid load key|Invalid argument", re.I)
_UNSAFE = re.compile(r"Unsupported global|not an allowed global|GLOBAL ", re.I)
_GLOBAL = re.compile(r"GLOBAL (\S*) was not")

REASONS = {
    "truncated": "the file is truncated or corrupt (an interrupted download or copy?)",
    "unsafe": "the file holds Python objects other than tensors, and loading it could run code",
    "unreadable": "not a PyTorch tensor file",
}


def global_exists(qualname: str) -> bool:
    """Whether ``module.name`` names something real, judged without importing anything new.

    A legacy (non-zip) file cut inside a GLOBAL record asks for a clipped name
    (``collections.OrderedDic``, ``c.``): that is truncation, not an unsafe file.
    """
    import _compat_pickle
    import importlib.util
    import sys

    module, _, name = qualname.rpartition(".")
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))  # Python 2 names,
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)                      # as pickle maps them
    if not module and name:  # torch writes builtins without their module: "GLOBAL print"
        import builtins

        return hasattr(builtins, name)
    if not module or not name:
        return False
    if module in sys.modules:
        return hasattr(sys.modules[module], name.split(".")[0])
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def load_error_kind(exc: BaseException) -> str:
    """``"truncated"``, ``"unsafe"`` or ``"unreadable"`` for an exception raised while loading a file."""
    if isinstance(exc, (EOFError, MemoryError, OverflowError)):
        return "truncated"
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and _UNSAFE.search(text) and not _TRUNCATED.search(text):
        named = _GLOBAL.search(text)
        return "unsafe" if named is None or global_exists(named.group(1)) else "truncated"
    if _TRUNCATED.search(text) or isinstance(exc, (OSError, pickle.UnpicklingError, IndexError)):
        return "truncated"
    return "unreadable"


@contextlib.contextmanager
def quiet_torch_load():
    """Hide torch's warnings that advise ``weights_only=False`` (never follow that advice for downloads)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*weights_only")
        yield


def load_weights(path: str | os.PathLike, *, what: str, fix: str, safe_globals: Iterable = (),
                 mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a failure is one :class:`UsageError` line.

    ``what`` names the file for the user ("DiT checkpoint"), ``fix`` is said for an
    unreadable file; a truncated one is told to be downloaded again, an unsafe one refused.
    ``mmap`` memory-maps a zip-format file instead of reading it (no second copy of a large checkpoint).
    """
    import torch

    path = os.fspath(path)
    try:
        with quiet_torch_load(), torch.serialization.safe_globals(list(safe_globals)):
            mapped = mmap and zipfile.is_zipfile(path)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found; {fix}") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a folder; {fix}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        kind = load_error_kind(exc)
        if kind == "truncated":
            raise UsageError(f"cannot read {what} {path}: {REASONS[kind]}; delete it and download it again") from None
        if kind == "unsafe":
            raise UsageError(f"refusing to load {what} {path}: {REASONS[kind]}; {fix}") from None
        raise UsageError(f"cannot read {what} {path}: {REASONS[kind]}; {fix}") from None
