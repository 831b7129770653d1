"""Integer lists written as ranges: ``[0, 1, 2, 5]`` <-> ``'0-2,5'`` (seed lists in settings and state files)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["compact_ranges"]


def compact_ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2,5'``: runs of consecutive integers as ``first-last``, order kept."""
    parts, start, prev = [], None, None
    for v in values:
        if start is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = v
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)
