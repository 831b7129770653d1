"""Seed lists and per-seed random generators (EDM2 semantics).

Each seed owns a ``torch.Generator``; every random draw for a batch is made
seed by seed from those generators, so a seed yields the same image whatever
batch, rank or world size it lands in.  Draw order per seed, as in EDM2:
initial noise, then the random class label, then the sampler's churn noise.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch

from utils.errors import UsageError

__all__ = ["parse_int_list", "StackedRandomGenerator"]

_RANGE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*$")


def parse_int_list(text, what: str = "--seeds") -> list[int]:
    """Parse ``'1,2,5-10'`` into ``[1, 2, 5, 6, ..., 10]`` (ranges inclusive, order kept).

    Lists of ints pass through.  Malformed input raises :class:`UsageError`.
    """
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    if isinstance(text, int):
        return [text]
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise UsageError(f"{what}: empty item in {text!r}; use e.g. '0-49999' or '1,2,5-10'")
        m = _RANGE.match(part)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise UsageError(f"{what}: range {part!r} is decreasing; write it as '{hi}-{lo}'")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UsageError(f"{what}: cannot parse {part!r} in {text!r}; use e.g. '0-49999' or '1,2,5-10'") from None
    return out


class StackedRandomGenerator:
    """One generator per seed; draws are stacked along the batch axis."""

    def __init__(self, device, seeds: Iterable[int]):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(device).manual_seed(s % (1 << 32)) for s in self.seeds]

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Standard normal ``[len(seeds), *size[1:]]``."""
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, *args, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Integers as ``torch.randint(*args)``, one draw block per seed."""
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, **kwargs) for g in self.generators])
