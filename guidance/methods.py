"""Guidance methods: one small class per method, each with its equation.

Every method extrapolates away from one or two worse predictions:

    D = D_pos + sum_j w_j * m_j * (D_pos - D_neg_j)

A method receives an :class:`Evaluation`, which computes (once, lazily) the
predictions it asks for: the positive ``pos()``, the negative network
``neg(labels=...)`` and the sliding-window prediction ``windows(labels=...)``
with its coverage count.  ``term(delta)`` restricts a guidance term to the
guided output channels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch

from .windows import WindowGrid, sliding_window_predict

__all__ = ["Evaluation", "Guider", "NoGuidance", "CFG", "WMG", "SWG", "NegSWG"]


class Evaluation:
    """The predictions one guided call may need, each computed at most once."""

    def __init__(self, pos_fn: Callable, neg_fn: Optional[Callable], x: torch.Tensor, sigma, labels,
                 window_size=None, window_steps=None, max_window_batch: Optional[int] = None,
                 channels: Optional[slice] = None):
        self.pos_fn, self.neg_fn = pos_fn, neg_fn
        self.x, self.sigma, self.labels = x, sigma, labels
        self.window_size, self.window_steps = window_size, window_steps
        self.max_window_batch = max_window_batch
        self.channels = channels
        self._cache: Dict[Tuple, torch.Tensor] = {}

    def pos(self) -> torch.Tensor:
        """``D_pos(x; sigma, c)``."""
        if "pos" not in self._cache:
            self._cache["pos"] = self.pos_fn(self.x, self.sigma, self.labels)
        return self._cache["pos"]

    def neg(self, labels: bool = True) -> torch.Tensor:
        """The negative network, with the class labels or without (``labels=None``)."""
        key = ("neg", labels)
        if key not in self._cache:
            self._cache[key] = self.neg_fn(self.x, self.sigma, self.labels if labels else None)
        return self._cache[key]

    def windows(self, labels: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sliding-window prediction of the positive network and its coverage count ``[1, 1, H, W]``."""
        key = ("win", labels)
        if key not in self._cache:
            grid = WindowGrid.create(self.x.shape[-2], self.x.shape[-1], self.window_size, self.window_steps)
            self._cache[key] = sliding_window_predict(
                self.pos_fn, self.x, self.sigma, self.labels if labels else None, grid, self.max_window_batch)
        return self._cache[key]

    def term(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero a guidance term outside the guided channels."""
        if self.channels is None:
            return delta
        keep = torch.zeros(delta.shape[1], dtype=torch.bool, device=delta.device)
        keep[self.channels] = True
        return delta * keep[None, :, None, None].to(delta.dtype)


def _mask(count: torch.Tensor, masked: bool) -> torch.Tensor:
    """M-SWG mask: 1 where more than one window covers the pixel (or everywhere when unmasked)."""
    return (count > 1).to(count.dtype) if masked else torch.ones_like(count)


@dataclasses.dataclass
class Guider:
    """Base class: a guidance equation over the predictions of an :class:`Evaluation`.

    What each method is called, how many weights it takes and which networks it needs is
    declared once, in :data:`guidance.table.METHODS`.
    """

    def __call__(self, ev: Evaluation) -> torch.Tensor:  # pragma: no cover - abstract
        raise TypeError("Guider is abstract; see guidance.table.METHODS")


@dataclasses.dataclass
class NoGuidance(Guider):
    """``D = D_pos``."""


    def __call__(self, ev: Evaluation) -> torch.Tensor:
        return ev.pos()


@dataclasses.dataclass
class CFG(Guider):
    """Classifier-free guidance: ``D = D_pos + w (D_pos - D_neg(x; sigma))`` with an unconditional negative."""

    w: float = 0.0

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        pos = ev.pos()
        return pos + self.w * ev.term(pos - ev.neg(labels=False))


@dataclasses.dataclass
class WMG(Guider):
    """Weak-model guidance (autoguidance): ``D = D_pos + w (D_pos - D_weak(x; sigma, c))``."""

    w: float = 0.0

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        pos = ev.pos()
        return pos + self.w * ev.term(pos - ev.neg(labels=True))


@dataclasses.dataclass
class SWG(Guider):
    """Sliding window guidance: ``D = D_pos + w m (D_pos - D_win)``.

    ``D_win`` averages the positive network's predictions on overlapping windows;
    ``m = [count > 1]`` for M-SWG (``masked``), ``m = 1`` otherwise.
    """

    w: float = 0.0
    masked: bool = True

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        pos = ev.pos()
        win, count = ev.windows(labels=True)
        return pos + self.w * ev.term(_mask(count, self.masked) * (pos - win))


@dataclasses.dataclass
class NegSWG(Guider):
    """A negative network plus SWG: ``D = D_pos + w1 (D_pos - D_neg) + w2 m (D_pos - D_win)``.

    ``D_neg`` is the weaker network with the labels (``wmg-swg``) or the unconditional
    network (``cfg-swg``, ``neg_labels=False``).  ``reference_quirks`` reproduces the EDM2
    reference code: the mask is never applied (``m = 1``) and, for ``cfg-swg``, the windows
    are evaluated without class labels.
    """

    w_neg: float = 0.0
    w_swg: float = 0.0
    masked: bool = True
    reference_quirks: bool = False
    neg_labels: bool = True

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        pos = ev.pos()
        win, count = ev.windows(labels=self.neg_labels or not self.reference_quirks)
        m = _mask(count, self.masked and not self.reference_quirks)
        return (pos + self.w_neg * ev.term(pos - ev.neg(labels=self.neg_labels))
                + self.w_swg * ev.term(m * (pos - win)))
