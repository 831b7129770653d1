"""Seed lists, per-seed random generators and the per-seed draw every tool uses.

Each seed owns a ``torch.Generator``; every random draw for a batch is made
seed by seed from those generators, so a seed yields the same image whatever
batch, rank or world size it lands in.  Draw order per seed: initial noise,
then the random class label, then the sampler's per-step noise.

Two generator families, one per model family's reference:

* EDM2 (:class:`StackedRandomGenerator`, :func:`draw_edm2`): a generator on
  the sampling device seeded with the seed, as EDM2's ``generate_images.py``;
* DiT (:class:`ImageGenerators`, :func:`draw_dit`): a CPU generator seeded with
  ``global_seed * 2**32 + index``, so images do not depend on the device type.

The samplers (:mod:`sampling.edm2_run`, :mod:`sampling.dit_run`), the figure
grids (:mod:`results.grid`), the demo and ``training.eval_denoiser`` draw
through these two functions, so a seed means the same image everywhere.
"""

from __future__ import annotations

import re
import dataclasses
from typing import Any, Iterable, Optional, Sequence

import torch

from utils.errors import UsageError

__all__ = ["parse_int_list", "StackedRandomGenerator", "ImageGenerators", "image_seeds", "make_labels",
           "draw_edm2", "draw_dit"]

_RANGE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*$")


def _check_bounds(values, what: str, lo: Optional[int], hi: Optional[int], text) -> None:
    if (lo is not None and min(values) < lo) or (hi is not None and max(values) > hi):
        raise UsageError(f"{what} must lie in {lo}..{hi} (image files are named by a 7-digit seed), got {text!r}")


def parse_int_list(text, what: str = "--seeds", lo: Optional[int] = None, hi: Optional[int] = None) -> list[int]:
    """Parse ``'1,2,5-10'`` into ``[1, 2, 5, 6, ..., 10]`` (ranges inclusive, order kept).

    Lists of ints pass through.  Malformed input raises :class:`UsageError`, and so
    does a value outside ``lo..hi``, checked before a range is expanded.
    """
    if isinstance(text, (list, tuple)):
        values = [int(v) for v in text]
        if values:
            _check_bounds(values, what, lo, hi, text)
        return values
    if isinstance(text, int):
        _check_bounds([text], what, lo, hi, text)
        return [text]
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise UsageError(f"{what}: empty item in {text!r}; use e.g. '0-49999' or '1,2,5-10'")
        m = _RANGE.match(part)
        try:
            if m:
                first, last = int(m.group(1)), int(m.group(2))
                if last < first:
                    raise UsageError(f"{what}: range {part!r} is decreasing; write it as '{last}-{first}'")
                _check_bounds([first, last], what, lo, hi, text)
                out.extend(range(first, last + 1))
            else:
                out.append(int(part))
                _check_bounds(out[-1:], what, lo, hi, text)
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


class ImageGenerators:
    """One CPU ``torch.Generator`` per image, seeded with ``global_seed * 2**32 + index`` (64-bit, no collisions).

    Same interface as :class:`StackedRandomGenerator`; draws are stacked along
    the batch axis, each sample from its own generator, and moved to
    ``device``.  Drawing on the CPU makes the noise, and so the images up to
    floating-point rounding, the same on every device type (DiT's rule here).
    """

    def __init__(self, device, indices: Sequence[int], global_seed: int = 0):
        self.device = torch.device(device)
        self.seeds = image_seeds(indices, global_seed)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]

    def randn(self, size: Sequence[int], dtype=torch.float32, device=None, **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        draws = torch.stack([torch.randn(list(size[1:]), generator=g, dtype=dtype) for g in self.generators])
        return draws.to(device if device is not None else self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, high: int, size: Sequence[int], device=None) -> torch.Tensor:
        assert size[0] == len(self.generators)
        draws = torch.stack([torch.randint(high, list(size[1:]), generator=g) for g in self.generators])
        return draws.to(device if device is not None else self.device)


def image_seeds(indices: Sequence[int], global_seed: int = 0) -> list[int]:
    """Generator seed of each DiT image: ``global_seed * 2**32 + index``."""
    return [int(global_seed) * (1 << 32) + int(i) for i in indices]


@dataclasses.dataclass
class Draw:
    """One batch's per-seed randomness: initial noise, the labels to condition on, the classes drawn,
    and the generator the sampler continues with (``rnd.randn_like``)."""

    seeds: list
    noise: torch.Tensor
    labels: Optional[torch.Tensor]
    classes: Optional[torch.Tensor]
    rnd: Any


def _class_list(classes, n: int, num_classes: int) -> Optional[list]:
    """``None`` (keep the drawn classes), one class for all, or one per seed -> a list of ``n`` or None."""
    if classes is None:
        return None
    out = [int(classes)] * n if isinstance(classes, int) else [int(c) for c in classes]
    if len(out) == 1:
        out = out * n
    if len(out) != n:
        raise UsageError(f"{len(out)} classes for {n} seeds; give one class per seed, one for all, or none")
    if min(out) < 0 or max(out) >= num_classes:
        raise UsageError(f"classes must lie in 0..{num_classes - 1} for this network, got {out}")
    return out


def make_labels(rnd, label_dim: int, classes, n: int, device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """EDM2 labels: draw each seed's class (always, so later draws do not depend on ``classes``),
    then one-hot of ``classes`` when given, else of the drawn class.  Returns ``(one_hot, drawn)``."""
    if label_dim <= 0:
        return None, None
    drawn = rnd.randint(label_dim, size=[n], device=device)
    eye = torch.eye(label_dim, device=device)
    fixed = _class_list(classes, n, label_dim)
    labels = eye[drawn] if fixed is None else eye[torch.tensor(fixed, device=device)]
    return labels, drawn


def draw_edm2(seeds: Sequence[int], shape: Sequence[int], label_dim: int, device, classes=None) -> Draw:
    """EDM2's per-seed draw: noise ``[N, *shape]``, then a random class per seed (when ``label_dim > 0``).

    ``classes`` (one int, or one per seed) replaces the drawn classes in the labels; the draw still
    happens, so a seed's noise and churn noise are the same with and without it.
    """
    seeds = [int(s) for s in seeds]
    rnd = StackedRandomGenerator(device, seeds)
    noise = rnd.randn([len(seeds), *shape], device=device)
    labels, drawn = make_labels(rnd, label_dim, classes, len(seeds), device)
    return Draw(seeds, noise, labels, drawn, rnd)


def draw_dit(seeds: Sequence[int], shape: Sequence[int], num_classes: int, device, global_seed: int = 0,
             uncond: bool = False, classes=None) -> Draw:
    """DiT's per-image draw on CPU generators: noise ``[N, *shape]``, then a class index per image.

    ``uncond`` conditions on the null class ``num_classes`` without drawing a class (as the sampler
    always did); ``classes`` replaces the drawn classes (the draw still happens).
    """
    seeds = [int(s) for s in seeds]
    gen = ImageGenerators(device, seeds, global_seed)
    noise = gen.randn([len(seeds), *shape])
    if uncond:
        return Draw(seeds, noise, torch.full((len(seeds),), num_classes, dtype=torch.long, device=noise.device),
                    None, gen)
    drawn = gen.randint(num_classes, size=[len(seeds)])
    fixed = _class_list(classes, len(seeds), num_classes)
    labels = drawn if fixed is None else torch.tensor(fixed, dtype=torch.long, device=noise.device)
    return Draw(seeds, noise, labels, drawn, gen)
