"""Guidance rules: how one term turns the positive and a negative prediction into a direction.

A guided prediction is ``D = D_pos + sum_j w_j * rule_j(D_pos, D_neg_j) [* m_j]``
(:class:`guidance.methods.Term`).  Each rule here is one small class with its
equation; ``rule(pos, neg, step)`` returns the direction before the weight.
``step`` is the sampler step index (None when the sampler does not say), used
by rules with state (APG's momentum).  Norms, projections and the optimised
scale are per sample, over every other axis.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["Rule", "Linear", "APG", "ZeroStar", "LowPass", "HighPass", "Tangential", "low_frequencies"]


def _dims(x: torch.Tensor) -> list:
    return list(range(1, x.ndim))


def _project(v: torch.Tensor, onto: torch.Tensor):
    """``(v_par, v_orth)``: ``v`` split into parts parallel and orthogonal to ``onto`` (per sample, float64)."""
    v64 = v.double()
    u = F.normalize(onto.double(), dim=_dims(v))
    par = (v64 * u).sum(dim=_dims(v), keepdim=True) * u
    return par.to(v.dtype), (v64 - par).to(v.dtype)


class Rule(abc.ABC):
    """Base class: ``rule(pos, neg, step) -> direction``.

    ``per_channel``: each output channel depends only on the same channel of the inputs, so
    restricting guidance to some channels may happen after the rule (else before it).
    """

    per_channel = False

    @abc.abstractmethod
    def __call__(self, pos: torch.Tensor, neg: torch.Tensor, step: Optional[int] = None) -> torch.Tensor:
        """The guidance direction of this rule."""


@dataclasses.dataclass
class Linear(Rule):
    """``rule = D_pos - D_neg`` (CFG, autoguidance, SWG)."""

    per_channel = True

    def __call__(self, pos, neg, step=None):
        return pos - neg


@dataclasses.dataclass
class APG(Rule):
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation and artifacts of high guidance scales").

    ``d = D_pos - D_neg``; with momentum ``beta``: ``d <- d + beta d_prev``, a running sum over the
    sampler steps of one trajectory (``d_prev``: the sum at the previous step's last call; both calls of
    a Heun step use the same ``d_prev``; restarted when the step index goes back; per call when the
    sampler gives no steps); norm capped: ``d <- d min(1, r / ||d||)`` (``r = 0``: no cap);
    ``rule = d_orth + eta d_par`` with ``d_par`` the part of ``d`` parallel to ``D_pos``.
    """

    eta: float = 0.0
    norm_threshold: float = 0.0
    momentum: float = 0.0

    def __post_init__(self):
        self._avg = self._prev = self._step = None

    def __call__(self, pos, neg, step=None):
        d = pos - neg
        if self.momentum != 0:
            if (self._avg is None or self._avg.shape != d.shape
                    or (step is not None and self._step is not None and step < self._step)):
                self._avg = self._prev = None                      # a new trajectory
            elif step is None or step != self._step:
                self._prev = self._avg                             # a new step: carry the last sum
            self._avg = d if self._prev is None else d + self.momentum * self._prev
            self._step = step
            d = self._avg
        if self.norm_threshold > 0:
            norm = d.norm(p=2, dim=_dims(d), keepdim=True)
            d = d * torch.minimum(torch.ones_like(d), self.norm_threshold / norm)
        par, orth = _project(d, pos)
        return orth + self.eta * par


@dataclasses.dataclass
class ZeroStar(Rule):
    """CFG-Zero*'s optimised scale (Fan et al. 2025): ``rule = D_pos - s* D_neg``, ``s* = <D_pos, D_neg> / ||D_neg||^2``.

    ``s*`` is one number per sample.  (The zero output of the first steps is the method's, not the rule's:
    :class:`guidance.methods.CFGZeroStar`.)
    """

    def __call__(self, pos, neg, step=None):
        p, n = pos.flatten(1).float(), neg.flatten(1).float()
        s = ((p * n).sum(1, keepdim=True) / ((n * n).sum(1, keepdim=True) + 1e-8)).to(pos.dtype)
        return pos - s.view(-1, *([1] * (pos.ndim - 1))) * neg


_KERNEL_1D = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """5x5 binomial blur ``[1 4 6 4 1]^2 / 256``, reflect-padded, per channel."""
    k = torch.tensor(_KERNEL_1D, dtype=x.dtype, device=x.device)
    k2 = (k[:, None] * k[None, :]) / 256.0
    c = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k2.expand(c, 1, 5, 5), groups=c)


def low_frequencies(x: torch.Tensor) -> torch.Tensor:
    """The low band of a two-level Laplacian pyramid: ``up(down(x))``.

    ``down``: blur, then bilinear to half size; ``up``: bilinear to double size, then blur (Burt and
    Adelson's pyramid as diffusers' FDG builds it).  Odd sides are reflect-padded by one pixel and
    cropped back.  ``x - low_frequencies(x)`` is the high band.
    """
    h, w = x.shape[-2:]
    pad = (0, w % 2, 0, h % 2)
    xp = F.pad(x, pad, mode="reflect") if any(pad) else x
    hp, wp = xp.shape[-2:]
    down = F.interpolate(_blur(xp), size=(hp // 2, wp // 2), mode="bilinear", align_corners=False)
    up = _blur(F.interpolate(down, size=(hp, wp), mode="bilinear", align_corners=False))
    return up[..., :h, :w]


@dataclasses.dataclass
class LowPass(Rule):
    """Frequency-decoupled guidance, low band (Sadat et al. 2025): ``rule = L(D_pos - D_neg)``, ``L`` = up(down(.))."""

    per_channel = True

    def __call__(self, pos, neg, step=None):
        return low_frequencies(pos - neg)


@dataclasses.dataclass
class HighPass(Rule):
    """Frequency-decoupled guidance, high band: ``rule = (D_pos - D_neg) - L(D_pos - D_neg)``."""

    per_channel = True

    def __call__(self, pos, neg, step=None):
        d = pos - neg
        return d - low_frequencies(d)


@dataclasses.dataclass
class Tangential(Rule):
    """Tangential damping CFG (Kwon et al. 2025): ``rule = D_pos - P D_neg``.

    ``P`` projects onto the first right singular vector of the per-sample 2 x N matrix
    ``[D_pos; D_neg]`` (flattened), removing the negative's component tangential to the pair.
    """

    def __call__(self, pos, neg, step=None):
        stack = torch.stack([pos, neg], dim=1).float().flatten(2)
        _, _, vh = torch.linalg.svd(stack, full_matrices=False)
        v1 = vh[:, :1]                                             # [B, 1, N]
        n = neg.reshape(neg.shape[0], 1, -1).float()
        projected = (n @ v1.transpose(-2, -1)) @ v1
        return pos - projected.reshape(neg.shape).to(pos.dtype)
