"""Guidance methods: one small class per method, each with its equation.

Every method is a composition of terms (:class:`Term`):

    D = D_pos + sum_j w_j * rule_j(D_pos, D_neg_j) [* m_j]

each term active only inside its own interval (sampler steps and/or noise levels
``lo < sigma <= hi``).  A term names its negative (:class:`Uncond`, :class:`Weak`,
:class:`Windows`, :class:`Perturbed`), its rule (:mod:`guidance.rules`: linear,
APG, CFG-Zero*'s scale, a frequency band, tangential) and whether the M-SWG mask
``m = [count > 1]`` multiplies it.

A method receives an :class:`Evaluation`, which computes (once, lazily) the
predictions its terms ask for: the positive ``pos()``, the negative network
``neg(labels=...)``, the sliding-window prediction ``windows(labels=...)`` with
its coverage count and perturbed passes ``perturbed(p)``; it counts the network
evaluations.  ``term(delta)`` restricts a guidance term to the guided output channels.

What each method is called, its weights and parameters are declared once, in
:data:`guidance.table.METHODS`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Hashable, Optional, Tuple

import torch

from .rules import APG, HighPass, Linear, LowPass, Rule, Tangential, ZeroStar
from .windows import WindowGrid, sliding_window_predict

__all__ = ["Evaluation", "Guider", "Composite", "Term", "Uncond", "Weak", "Windows", "Perturbed",
           "NoGuidance", "CFG", "WMG", "SWG", "NegSWG", "APGuidance", "CFGZeroStar", "FDG", "TCFG", "PlusSWG",
           "PerturbedGuidance"]


class Evaluation:
    """The predictions one guided call may need, each computed at most once, and their cost.

    ``evals`` counts network evaluations (samples through a network; one window is one
    evaluation), ``cost`` the same weighted by input area relative to ``x`` (a 40x40 window
    of a 64x64 latent costs 0.39).  ``step`` is the sampler step (None if unknown);
    ``perturb(p)`` returns the positive network run under perturbation ``p`` as ``D(x, sigma, labels)``;
    ``still(x)`` is the prediction that holds ``x`` in place (None: zeros); ``sigma_of(sigma)`` turns the
    sampler's time into a noise level for sigma intervals (DiT: timestep -> sqrt(1 / alpha_bar - 1)).
    """

    def __init__(self, pos_fn: Callable, neg_fn: Optional[Callable], x: torch.Tensor, sigma, labels,
                 window_size=None, window_steps=None, max_window_batch: Optional[int] = None,
                 channels: Optional[slice] = None, step: Optional[int] = None,
                 perturb: Optional[Callable[[Hashable], Callable]] = None, still: Optional[Callable] = None,
                 sigma_of: Optional[Callable] = None):
        self.pos_fn, self.neg_fn = pos_fn, neg_fn
        self.x, self.sigma, self.labels = x, sigma, labels
        self.window_size, self.window_steps = window_size, window_steps
        self.max_window_batch = max_window_batch
        self.channels = channels
        self.step, self.perturb, self.still_fn, self.sigma_of = step, perturb, still, sigma_of
        self.evals = 0.0
        self.cost = 0.0
        self._cache: Dict[Tuple, torch.Tensor] = {}

    def _count(self, n: int, area: float = 1.0) -> None:
        self.evals += n
        self.cost += n * area

    def pos(self) -> torch.Tensor:
        """``D_pos(x; sigma, c)``."""
        if "pos" not in self._cache:
            self._cache["pos"] = self.pos_fn(self.x, self.sigma, self.labels)
            self._count(self.x.shape[0])
        return self._cache["pos"]

    def neg(self, labels: bool = True) -> torch.Tensor:
        """The negative network, with the class labels or without (``labels=None``)."""
        key = ("neg", labels)
        if key not in self._cache:
            self._cache[key] = self.neg_fn(self.x, self.sigma, self.labels if labels else None)
            self._count(self.x.shape[0])
        return self._cache[key]

    def windows(self, labels: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sliding-window prediction of the positive network and its coverage count ``[1, 1, H, W]``."""
        key = ("win", labels)
        if key not in self._cache:
            grid = WindowGrid.create(self.x.shape[-2], self.x.shape[-1], self.window_size, self.window_steps)
            self._cache[key] = sliding_window_predict(
                self.pos_fn, self.x, self.sigma, self.labels if labels else None, grid, self.max_window_batch)
            self._count(self.x.shape[0] * grid.num_windows, grid.kh * grid.kw / (grid.height * grid.width))
        return self._cache[key]

    def perturbed(self, perturbation: Hashable) -> torch.Tensor:
        """The positive network under ``perturbation`` (PAG, SEG, SLG ...), with the class labels."""
        key = ("perturbed", perturbation)
        if key not in self._cache:
            if self.perturb is None:
                raise RuntimeError("this guided denoiser was built without `perturb`; perturbed passes need "
                                   "the positive network's perturbation interface")
            self._cache[key] = self.perturb(perturbation)(self.x, self.sigma, self.labels)
            self._count(self.x.shape[0])
        return self._cache[key]

    def still(self, like: torch.Tensor) -> torch.Tensor:
        """The prediction that leaves the sample in place: zeros (velocity / noise predictions) or ``still(x)``."""
        return torch.zeros_like(like) if self.still_fn is None else self.still_fn(self.x).to(like.dtype)

    def noise_level(self) -> torch.Tensor:
        """The noise level of every sample, float64 ``[N]`` (what sigma intervals compare)."""
        n = self.x.shape[0]
        s = self.sigma if self.sigma_of is None else self.sigma_of(self.sigma)
        return torch.as_tensor(s, device=self.x.device, dtype=torch.float64).reshape(-1).expand(n)

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


# ----------------------------------------------------------------------------
# Negatives: ``negative(ev) -> (D_neg, coverage count or None)``.

@dataclasses.dataclass(frozen=True)
class Uncond:
    """The negative network without class labels (CFG's unconditional prediction)."""

    def __call__(self, ev: Evaluation):
        return ev.neg(labels=False), None


@dataclasses.dataclass(frozen=True)
class Weak:
    """The negative network with the class labels (a weaker network: autoguidance)."""

    def __call__(self, ev: Evaluation):
        return ev.neg(labels=True), None


@dataclasses.dataclass(frozen=True)
class Windows:
    """The positive network on sliding windows, averaged where they overlap (SWG); gives the coverage count."""

    labels: bool = True

    def __call__(self, ev: Evaluation):
        return ev.windows(labels=self.labels)


@dataclasses.dataclass(frozen=True)
class Perturbed:
    """The positive network itself under a perturbation (``ev.perturbed(perturbation)``: PAG, SEG, SLG)."""

    perturbation: Hashable

    def __call__(self, ev: Evaluation):
        return ev.perturbed(self.perturbation), None


# ----------------------------------------------------------------------------
# Terms and their sum.

def _in(value, lo_hi, lo_open: bool) -> torch.Tensor:
    lo, hi = lo_hi
    return ((value > lo) if lo_open else (value >= lo)) & (value <= hi)


@dataclasses.dataclass
class Term:
    """One guidance term ``w * rule(D_pos, D_neg) [* m]``.

    Active at sampler steps ``first <= i <= last`` (``steps``) and noise levels ``lo < sigma <= hi``
    (``sigmas``, the EDM2 guidance-interval form), per sample; elsewhere it adds nothing and its
    negative is not evaluated.  ``masked`` multiplies by the M-SWG mask when the negative
    gives a coverage count (a window term without ``masked`` is multiplied by 1).
    """

    w: float
    negative: Callable
    rule: Rule = dataclasses.field(default_factory=Linear)
    masked: bool = False
    steps: Optional[Tuple[int, int]] = None
    sigmas: Optional[Tuple[float, float]] = None

    def active(self, ev: Evaluation):
        """True (every sample), False (none) or a per-sample boolean tensor."""
        on = True
        if self.steps is not None:
            if ev.step is None:
                raise RuntimeError("a term's step interval needs a sampler that calls begin_step(i); "
                                   "use a sigma interval with other samplers")
            on = bool(self.steps[0] <= ev.step <= self.steps[1])
        if on and self.sigmas is not None:
            inside = _in(ev.noise_level(), self.sigmas, lo_open=True)
            on = True if bool(inside.all()) else False if not bool(inside.any()) else inside
        return on

    def delta(self, ev: Evaluation, pos: torch.Tensor) -> torch.Tensor:
        neg, count = self.negative(ev)
        if ev.channels is not None and not self.rule.per_channel:
            # A rule over whole samples (norms, projections) sees only the guided channels.
            d = torch.zeros_like(pos)
            d[:, ev.channels] = self.rule(pos[:, ev.channels], neg[:, ev.channels], ev.step)
            return d
        d = self.rule(pos, neg, ev.step)
        if count is not None:
            d = _mask(count, self.masked) * d
        return ev.term(d)


@dataclasses.dataclass
class Guider:
    """Base class: a guidance equation over the predictions of an :class:`Evaluation`."""

    def __call__(self, ev: Evaluation) -> torch.Tensor:  # pragma: no cover - abstract
        raise TypeError("Guider is abstract; see guidance.table.METHODS")


@dataclasses.dataclass
class Composite(Guider):
    """``D = D_pos + sum_j w_j * rule_j(D_pos, D_neg_j) [* m_j]`` over :meth:`build`'s terms (built once)."""

    def build(self) -> Tuple[Term, ...]:
        return ()

    @property
    def terms(self) -> Tuple[Term, ...]:
        if "_terms" not in self.__dict__:
            self.__dict__["_terms"] = tuple(self.build())
        return self.__dict__["_terms"]

    def limit(self, *, sigmas=None, steps=None, windows: bool = False) -> "Composite":
        """Restrict the window terms (``windows=True``) or the other terms to a sigma / step interval."""
        self.__dict__["_terms"] = tuple(
            dataclasses.replace(t, sigmas=sigmas if sigmas is not None else t.sigmas,
                                steps=steps if steps is not None else t.steps)
            if isinstance(t.negative, Windows) == windows else t for t in self.terms)
        return self

    def zero_until(self) -> int:
        """Sampler steps ``i < zero_until()`` output the prediction that holds the sample in place (CFG-Zero*)."""
        return 0

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        pos = ev.pos()
        if ev.step is not None and ev.step < self.zero_until():
            return pos - ev.term(pos - ev.still(pos))
        out = pos
        for t in self.terms:
            on = t.active(ev) if t.w != 0 else False  # a zero weight adds nothing: its negative is not evaluated
            if on is False:
                continue
            new = out + t.w * t.delta(ev, pos)
            out = new if on is True else torch.where(on[:, None, None, None], new, out)
        return out


# ----------------------------------------------------------------------------
# The methods.

@dataclasses.dataclass
class NoGuidance(Composite):
    """``D = D_pos``."""


@dataclasses.dataclass
class CFG(Composite):
    """Classifier-free guidance: ``D = D_pos + w (D_pos - D_neg(x; sigma))`` with an unconditional negative."""

    w: float = 0.0

    def build(self):
        return (Term(self.w, Uncond()),)


@dataclasses.dataclass
class WMG(Composite):
    """Weak-model guidance (autoguidance): ``D = D_pos + w (D_pos - D_weak(x; sigma, c))``."""

    w: float = 0.0

    def build(self):
        return (Term(self.w, Weak()),)


@dataclasses.dataclass
class SWG(Composite):
    """Sliding window guidance: ``D = D_pos + w m (D_pos - D_win)``.

    ``D_win`` averages the positive network's predictions on overlapping windows;
    ``m = [count > 1]`` for M-SWG (``masked``), ``m = 1`` otherwise.
    """

    w: float = 0.0
    masked: bool = True

    def build(self):
        return (Term(self.w, Windows(labels=True), masked=self.masked),)


@dataclasses.dataclass
class NegSWG(Composite):
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

    def build(self):
        return (Term(self.w_neg, Weak() if self.neg_labels else Uncond()),
                Term(self.w_swg, Windows(labels=self.neg_labels or not self.reference_quirks),
                     masked=self.masked and not self.reference_quirks))


@dataclasses.dataclass
class APGuidance(Composite):
    """Adaptive projected guidance: ``D = D_pos + w (d_orth + eta d_par)``, ``d = D_pos - D_uncond``.

    ``d`` optionally accumulated with momentum ``beta`` and capped at norm ``r`` (:class:`guidance.rules.APG`).
    """

    w: float = 0.0
    eta: float = 0.0
    norm_threshold: float = 0.0
    momentum: float = 0.0

    def build(self):
        return (Term(self.w, Uncond(), APG(self.eta, self.norm_threshold, self.momentum)),)


@dataclasses.dataclass
class CFGZeroStar(Composite):
    """CFG-Zero*: ``D = D_pos + w (D_pos - s* D_uncond)``, ``s* = <D_pos, D_uncond> / ||D_uncond||^2`` per sample.

    For the first ``zero_steps`` sampler steps the output is zero, as in the paper and diffusers (for an
    EDM denoiser ``D = 0``), or the guided denoiser's ``still(x)`` when it has one.
    """

    w: float = 0.0
    zero_steps: int = 0

    def build(self):
        return (Term(self.w, Uncond(), ZeroStar()),)

    def zero_until(self) -> int:
        return int(self.zero_steps)


@dataclasses.dataclass
class FDG(Composite):
    """Frequency-decoupled guidance: ``D = D_pos + w_low L(D_pos - D_uncond) + w_high H(D_pos - D_uncond)``.

    ``L`` is the low band of a two-level Laplacian pyramid, ``H = 1 - L`` (:mod:`guidance.rules`).
    """

    w_low: float = 0.0
    w_high: float = 0.0

    def build(self):
        return (Term(self.w_low, Uncond(), LowPass()), Term(self.w_high, Uncond(), HighPass()))


@dataclasses.dataclass
class TCFG(Composite):
    """Tangential damping CFG: ``D = D_pos + w (D_pos - P D_uncond)`` (:class:`guidance.rules.Tangential`)."""

    w: float = 0.0

    def build(self):
        return (Term(self.w, Uncond(), Tangential()),)


@dataclasses.dataclass
class PerturbedGuidance(Composite):
    """PAG, SEG, SLG: ``D = D_pos + w (D_pos - D_pert)``, ``D_pert`` the positive network perturbed.

    ``kind`` names the perturbed pass (:mod:`guidance.perturb`: ``pag`` identity self-attention,
    ``seg`` blurred queries, ``slg`` skipped blocks); the guided denoiser's ``perturb`` runs it.
    """

    w: float = 0.0
    kind: str = "pag"

    def build(self):
        return (Term(self.w, Perturbed(self.kind)),)


@dataclasses.dataclass
class PlusSWG(Composite):
    """Any method plus (M-)SWG: ``D = [base terms] + w_swg m (D_pos - D_win)``."""

    base: Composite = dataclasses.field(default_factory=NoGuidance)
    w_swg: float = 0.0
    masked: bool = True

    def build(self):
        return (*self.base.terms, Term(self.w_swg, Windows(labels=True), masked=self.masked))

    def zero_until(self) -> int:
        return self.base.zero_until()
