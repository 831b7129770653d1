"""Per-call edits of chosen blocks: the interface that :mod:`networks.edm2` and :mod:`networks.dit` expose.

A network of this project can run one call with some of its blocks changed.  It says
which blocks exist and which of them each change applies to, and takes the change as
a keyword of its ``forward``; nothing is stored on the network, so an unedited call
runs exactly the code it always ran (``edit=None``, the default)::

    net.block_names()          # every block, in call order; a block's index is its position
    net.edit_blocks(op)        # {index: name} of the blocks where ``op`` applies
    net(x, ..., edit=e)        # one call with edit ``e``

An edit is any object with three attributes (duck-typed, so that callers need not
import this package):

``op``
    ``"identity"``: the self-attention map of each chosen block is the identity
    matrix, so the attention output is the value ``V`` (then the block's output
    projection, as always).  ``"blur"``: the queries of each chosen block's
    self-attention are blurred over the token grid with a Gaussian of width
    ``sigma`` tokens (:func:`blur_tokens`); ``sigma = inf`` replaces every query by
    the mean query.  ``"skip"``: each chosen block is skipped (its output is its
    input), so only blocks whose output has the shape of their input qualify.
``blocks``
    the chosen block indices (a collection of ints).
``sigma``
    the blur width in tokens (``op="blur"`` only).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

__all__ = ["EDIT_OPS", "blur_tokens", "blur_kernel_size", "check_edit"]

EDIT_OPS = ("identity", "blur", "skip")


def check_edit(edit, valid: Callable[[str], Mapping[int, str]]) -> tuple:
    """``(op, blocks, sigma)`` of ``edit`` after checking it against ``valid(op)`` (index -> name); ValueError if not."""
    op = getattr(edit, "op", None)
    if op not in EDIT_OPS:
        raise ValueError(f"unknown block edit {op!r}; use one of {', '.join(EDIT_OPS)}")
    blocks = frozenset(int(b) for b in edit.blocks)
    allowed = valid(op)
    bad = sorted(blocks - set(allowed))
    if not blocks or bad:
        raise ValueError(f"block edit {op!r} on blocks {bad or '(none)'}: not applicable; "
                         f"valid blocks are {', '.join(map(str, allowed))}")
    sigma = float(getattr(edit, "sigma", math.inf))
    if op == "blur" and not sigma > 0:
        raise ValueError(f"query blur width must be > 0 (inf: mean query), got {sigma}")
    return op, blocks, sigma


def blur_kernel_size(sigma: float, size: int) -> int:
    """Odd Gaussian kernel length for width ``sigma`` on an axis of ``size`` tokens.

    ``ceil(6 sigma) + 1`` rounded up to odd, at most ``size + 1`` (even ``size``) or
    ``size`` (odd ``size``) so that the reflected border never exceeds the grid: the
    rule of the SEG authors' implementation (SEG-SDXL ``pipeline_seg.py``).
    """
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    return min(k, size - (size % 2 - 1))


def _gaussian(k: int, sigma: float) -> torch.Tensor:
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, steps=k, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def blur_tokens(q: torch.Tensor, grid_h: int, grid_w: int, sigma: float) -> torch.Tensor:
    """Blur ``q`` ``[..., N, C]`` (``N = grid_h * grid_w`` row-major tokens) over the token grid.

    Each channel is convolved with the normalised 2-D Gaussian ``g(i) g(j)``,
    ``g(i) ~ exp(-i^2 / (2 sigma^2))`` on ``|i| <= (k - 1) / 2`` (:func:`blur_kernel_size`),
    with reflected borders; ``sigma = inf`` gives the mean over all tokens (Hong 2024,
    Smoothed Energy Guidance: the limit of the blur, uniform attention weights).
    """
    *lead, n, c = q.shape
    if n != grid_h * grid_w:
        raise ValueError(f"{n} tokens do not form a {grid_h}x{grid_w} grid")
    if math.isinf(sigma):
        return q.mean(dim=-2, keepdim=True).expand_as(q)
    kh, kw = blur_kernel_size(sigma, grid_h), blur_kernel_size(sigma, grid_w)
    kernel = torch.outer(_gaussian(kh, sigma), _gaussian(kw, sigma)).to(device=q.device, dtype=q.dtype)
    img = q.reshape(-1, grid_h, grid_w, c).permute(0, 3, 1, 2)                  # [B, C, h, w]
    img = F.pad(img, [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
    img = F.conv2d(img, kernel.expand(c, 1, kh, kw), groups=c)
    return img.permute(0, 2, 3, 1).reshape(*lead, n, c)
