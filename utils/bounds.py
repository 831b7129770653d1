"""Integer bounds declared once, beside a setting's default.

    steps: int = bounded(32, lo=1)

The settings check them (:func:`check_bounds`, one message for every bounded field)
and the command lines' click types read them (:func:`utils.cli.int_range`), so a
flag out of range is refused while the flags are parsed, before anything runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

from utils.errors import UsageError

__all__ = ["bounded", "bounds", "check_bounds"]

Bounds = Tuple[Optional[int], Optional[int]]


def bounded(default: Any = dataclasses.MISSING, *, lo: Optional[int] = None, hi: Optional[int] = None):
    """A dataclass field whose integer value must lie in ``lo..hi`` (None: unbounded on that side)."""
    return dataclasses.field(default=default, metadata={"bounds": (lo, hi)})


def bounds(cls, name: str) -> Bounds:
    """``(lo, hi)`` of the field ``name`` of the dataclass ``cls`` (``(None, None)`` if it has none)."""
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if field is None:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    return field.metadata.get("bounds", (None, None))


def _describe(lo: Optional[int], hi: Optional[int]) -> str:
    if hi is None:
        return f"must be >= {lo}"
    if lo is None:
        return f"must be <= {hi}"
    return f"must lie in {lo}..{hi}"


def check_bounds(cls, values: Mapping[str, Any]) -> None:
    """Refuse a value of ``values`` (a field name -> value mapping) outside the bounds of its field of ``cls``;
    None is left alone (an unset option).  Changes nothing."""
    for field in dataclasses.fields(cls):
        lo_hi = field.metadata.get("bounds")
        value = values.get(field.name)
        if lo_hi is None or value is None:
            continue
        lo, hi = lo_hi
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise UsageError(f"`{field.name}` {_describe(lo, hi)}, got {value}")
