"""Perturbed passes of the positive network: the negatives of PAG, SEG and SLG.

Each is the positive network itself, run once more with some blocks changed
(the network's block-edit interface, :mod:`networks.edits`; this module only
names blocks by index and never imports a network)::

    D_pert(x; sigma, c) = D(x; sigma, c | blocks B changed)

- ``pag`` -- perturbed-attention guidance (Ahn et al., ECCV 2024): the
  self-attention map of each block in ``B`` is the identity matrix, so the
  attention output is the value ``V`` (edit ``identity``).
- ``seg`` -- smoothed energy guidance (Hong, NeurIPS 2024): the queries of the
  self-attention of each block in ``B`` are blurred over the token grid with a
  Gaussian of width ``seg_sigma`` tokens; ``seg_sigma = inf`` replaces them by the
  mean query (edit ``blur``).
- ``slg`` -- skip-layer guidance (Stability AI, SD 3.5): each block in ``B`` is
  skipped, its output is its input (edit ``skip``).

A guidance term extrapolates away from it, ``D = D_pos + w (D_pos - D_pert)``,
at one network evaluation per step.

Default blocks (``blocks=None``), from the published settings:

- transformer (DiT, a stack of ``depth`` blocks): PAG and SEG on the middle block
  ``depth // 2`` (block 14 of DiT-XL/2's 28, diffusers' PAG example for the
  28-block PixArt-Sigma); SLG on ``floor(depth * k / 24)`` for ``k = 7, 8, 9``
  (Stability's layers 7, 8, 9 of SD 3.5 Medium's 24, scaled to the depth:
  8, 9, 10 for DiT-XL/2).
- U-Net (EDM2, encoder and decoder blocks): the U-Net's middle block, the
  decoder's first block at the lowest resolution (``dec.8x8_in0`` of the
  released networks), for all three: PAG's and SEG's default is SD's mid block
  (``"mid"``), the U-Net's lowest-resolution attention, and it is the one
  block with attention there whose output keeps its input's shape.
- ``seg_sigma``: ``inf`` (diffusers' ``SmoothedEnergyGuidance`` default; the
  SEG authors' README: "greater than 9999 results in infinite blur").

Validation is two-step and happens before any image: :func:`perturbation` checks
the values (no network), :meth:`Perturbation.resolve` checks the blocks against
the loaded network and names the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence, Tuple

from utils.errors import UsageError

__all__ = ["KINDS", "EDITS", "kind_options", "Perturbation", "PerturbationError", "PerturbedDenoiser", "perturbation",
           "perturbed", "perturber", "default_blocks", "parse_blocks"]

# kind -> the network's block edit that makes its perturbed pass.
EDITS = {"pag": "identity", "seg": "blur", "slg": "skip"}
KINDS = tuple(EDITS)


def kind_options(kind: str) -> dict:
    """The options of a perturbed pass and their defaults, as the command lines show them."""
    return {"perturb_blocks": "default", **({"seg_sigma": "inf"} if EDITS[kind] == "blur" else {})}
_NEEDS = {"identity": "has self-attention", "blur": "has self-attention",
          "skip": "keeps its input's shape (can be skipped)"}


class PerturbationError(UsageError, ValueError):
    """A perturbation that cannot run on this network (unknown kind, block without attention, bad sigma)."""


def parse_blocks(text) -> Optional[Tuple[int, ...]]:
    """``"13,14"`` / ``[13, 14]`` / ``14`` -> ``(13, 14)``; ``None``, ``""`` or ``"default"`` -> None."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "default", "none")):
        return None
    items = text if isinstance(text, (list, tuple)) else (str(text).split(",") if isinstance(text, str) else (text,))
    try:
        blocks = tuple(int(str(b).strip()) for b in items)
    except ValueError:
        raise PerturbationError(f"`perturb_blocks`: cannot parse {text!r}; give block indices separated by a "
                                f"comma, e.g. 13,14 (or default)") from None
    if any(b < 0 for b in blocks):
        raise PerturbationError(f"`perturb_blocks`: block indices are >= 0, got {text!r}")
    return tuple(sorted(set(blocks)))


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """Which perturbed pass: ``kind`` (pag, seg, slg), ``blocks`` (None: the network's default), ``seg_sigma``.

    A resolved perturbation (:meth:`resolve`) is also the network's block edit: it has
    ``op``, ``blocks`` and ``sigma``, the attributes :mod:`networks.edits` reads.
    """

    kind: str
    blocks: Optional[Tuple[int, ...]] = None
    seg_sigma: float = math.inf

    @property
    def op(self) -> str:
        return EDITS[self.kind]

    @property
    def sigma(self) -> float:
        return self.seg_sigma

    def resolve(self, net) -> "Perturbation":
        """This perturbation with its blocks filled in and checked against ``net`` (its ``edit_blocks``)."""
        valid = net.edit_blocks(self.op)
        blocks = default_blocks(self.kind, net) if self.blocks is None else self.blocks
        bad = [b for b in blocks if b not in valid]
        if bad:
            names = net.block_names()
            missing = [b for b in bad if not 0 <= b < len(names)]
            if missing:
                raise PerturbationError(
                    f"`perturb_blocks`: this network has no block {', '.join(map(str, missing))} (its blocks run "
                    f"0-{len(names) - 1}); valid blocks are {_ranges(valid)} ({_named(valid)})")
            what = ", ".join(f"{b} ({names[b]})" for b in bad)
            raise PerturbationError(
                f"`perturb_blocks`: block {what} cannot be used by {self.kind}: it needs a block that "
                f"{_NEEDS[self.op]}; valid blocks are {_ranges(valid)} ({_named(valid)})")
        return dataclasses.replace(self, blocks=tuple(blocks))

    def describe(self) -> str:
        """``pag on blocks 14`` / ``seg (sigma inf) on blocks 14``."""
        sigma = f" (sigma {self.seg_sigma:g})" if self.kind == "seg" else ""
        blocks = "default blocks" if self.blocks is None else "blocks " + ",".join(map(str, self.blocks))
        return f"{self.kind}{sigma} on {blocks}"


def perturbation(kind: str, blocks=None, seg_sigma=None) -> Perturbation:
    """A :class:`Perturbation` from user values, checked without a network."""
    key = str(kind).strip().lower()
    if key not in EDITS:
        raise PerturbationError(f"unknown perturbation {kind!r}; use one of {', '.join(KINDS)}")
    sigma = math.inf if seg_sigma is None else seg_sigma
    try:
        sigma = float(sigma)
    except (TypeError, ValueError):
        raise PerturbationError(f"`seg_sigma`: cannot parse {seg_sigma!r}; give a width in tokens > 0, "
                                f"or inf for the mean query") from None
    if not sigma > 0 or math.isnan(sigma):
        raise PerturbationError(f"`seg_sigma` must be > 0 (inf: the mean query), got {seg_sigma!r}")
    if key != "seg" and seg_sigma is not None and not math.isinf(sigma):
        raise PerturbationError(f"`seg_sigma` is the query blur of seg; {key} does not use it, drop it")
    return Perturbation(kind=key, blocks=parse_blocks(blocks), seg_sigma=sigma)


def default_blocks(kind: str, net) -> Tuple[int, ...]:
    """The published default blocks of ``kind`` on ``net`` (see the module docstring)."""
    names = net.block_names()
    if any(n.startswith("dec.") for n in names):                 # U-Net: the decoder's first block
        return (next(i for i, n in enumerate(names) if n.startswith("dec.")),)
    depth = len(names)
    if kind == "slg":
        return tuple(sorted({depth * k // 24 for k in (7, 8, 9)}))
    return (depth // 2,)


class PerturbedDenoiser:
    """``D_pert(x, sigma, labels) = denoiser(x, sigma, labels, edit=perturbation)``: one network evaluation."""

    def __init__(self, denoiser: Callable, perturbation: Perturbation):
        if perturbation.blocks is None:
            raise PerturbationError("resolve the perturbation against the network first (Perturbation.resolve)")
        self.denoiser, self.perturbation = denoiser, perturbation

    def __call__(self, x, sigma, labels=None):
        return self.denoiser(x, sigma, labels, edit=self.perturbation)

    def __repr__(self) -> str:
        return f"PerturbedDenoiser({self.perturbation.describe()})"


def perturbed(denoiser: Callable, net, perturbation: Perturbation) -> PerturbedDenoiser:
    """The perturbed positive network: ``perturbation`` resolved on ``net``; ``denoiser`` passes ``edit`` to ``net``."""
    return PerturbedDenoiser(denoiser, perturbation.resolve(net))


def perturber(denoiser: Callable, net, kinds: Sequence[str], blocks=None,
              seg_sigma=None) -> Callable[[object], PerturbedDenoiser]:
    """``key -> D_pert``: what a guided denoiser's ``perturb`` needs (:class:`guidance.methods.Perturbed`).

    Every kind in ``kinds`` is built and checked against ``net`` now (before any image), with
    ``blocks`` and ``seg_sigma`` (None: the defaults); ``key`` is such a kind (``"pag"``) or a
    :class:`Perturbation` of its own.
    """
    made = {k: perturbed(denoiser, net, perturbation(k, blocks, seg_sigma if k == "seg" else None)) for k in kinds}

    def get(key) -> PerturbedDenoiser:
        if isinstance(key, Perturbation):
            if key not in made:
                made[key] = perturbed(denoiser, net, key)
            return made[key]
        if key not in made:
            raise PerturbationError(f"no perturbed pass {key!r} was prepared; prepared: {', '.join(map(str, made))}")
        return made[key]
    return get


def _ranges(blocks: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    out, run = [], []
    for b in sorted(blocks):
        if run and b == run[-1] + 1:
            run.append(b)
        else:
            if run:
                out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = [b]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _named(valid: dict) -> str:
    """``"8 enc.16x16_block0, ..."``, shortened for long stacks (``blocks.0 .. blocks.27``)."""
    items = sorted(valid.items())
    if len(items) > 16:
        return f"{items[0][1]} .. {items[-1][1]}"
    return ", ".join(f"{i} {n}" for i, n in items)
