"""Check a ``--device`` value before any work: a typo or a missing GPU is one line, not a CUDA traceback."""

from __future__ import annotations

from typing import Optional

import torch

from utils.errors import UsageError

__all__ = ["resolve_device"]


def resolve_device(name: Optional[str], flag: str = "--device") -> torch.device:
    """``torch.device(name)`` after checking that it exists here; ``None`` picks CUDA when available, else CPU.

    Raises :class:`UsageError` naming ``flag`` for an unknown device string, a CUDA
    device on a machine without one (or an index past the last GPU), and an
    unavailable MPS device.
    """
    if name is None or str(name).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name).strip())
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{flag} {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); use {flag} cpu or run on a GPU machine")
        if device.index is not None and device.index >= count:
            raise UsageError(f"{flag} {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"{flag} {name}: MPS is not available here; use {flag} cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {name}: only cpu, cuda and mps are supported")
    return device
