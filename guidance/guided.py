"""Turn any denoiser ``D(x, sigma, labels)`` into a guided one.

>>> guided = guide(net, method="swg", weight=0.2, window_size=40, window_steps=2)
>>> x0 = edm_sampler(guided, noise, labels)
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple, Union

import torch

from .methods import Evaluation, Guider
from .table import NEGATIVES, GuidanceError, method_names, method_spec
from .windows import WindowError

__all__ = ["GuidanceError", "GuidedDenoiser", "guide", "method_names"]


class GuidedDenoiser:
    """A denoiser with guidance: ``D(x, sigma, labels)`` delegating the equation to a :class:`Guider`.

    Outside the guidance interval (sampler steps ``steps=(first, last)``,
    inclusive, and/or noise levels ``sigma_range=(lo, hi)``) it returns the
    positive prediction alone and evaluates no negative.

    It counts what it costs: :meth:`cost` gives the network evaluations per image
    per guided call and per sampler step (counted, windows included).
    """

    def __init__(self, denoiser: Callable, guider: Guider, neg_denoiser: Optional[Callable] = None,
                 window_size=None, window_steps=2, steps: Optional[Tuple[int, int]] = None,
                 sigma_range: Optional[Tuple[float, float]] = None, channels: Optional[slice] = None,
                 max_window_batch: Optional[int] = None, perturb: Optional[Callable[[Hashable], Callable]] = None,
                 still: Optional[Callable] = None, sigma_of: Optional[Callable] = None):
        self.denoiser, self.guider, self.neg_denoiser = denoiser, guider, neg_denoiser
        self.sigma_of = sigma_of
        self.window_size, self.window_steps = window_size, window_steps
        self.steps, self.sigma_range = steps, sigma_range
        self.channels, self.max_window_batch = channels, max_window_batch
        self.perturb, self.still = perturb, still
        self.step: Optional[int] = None
        self._new_step = False
        self.counts: Dict[str, float] = {"calls": 0.0, "steps": 0.0, "evals": 0.0, "cost": 0.0}

    def begin_step(self, i: int) -> None:
        """Called by the sampler at the start of step ``i`` (both Heun evaluations belong to it)."""
        self.step = int(i)
        self._new_step = True

    def cost(self) -> Dict[str, Optional[float]]:
        """Counted network evaluations per image: ``evals_per_call``, ``evals_per_step`` (None without
        steps), and the same weighted by input area (``cost_per_*``: a window of a quarter of the
        input counts 0.25)."""
        c = self.counts
        per = lambda key, by: round(c[key] / c[by], 4) if c[by] else None  # noqa: E731
        return {"evals_per_call": per("evals", "calls"), "evals_per_step": per("evals", "steps"),
                "cost_per_call": per("cost", "calls"), "cost_per_step": per("cost", "steps")}

    def _active(self, sigma, batch: int, device) -> torch.Tensor:
        """Per-sample boolean: is guidance on for this call?"""
        on = torch.ones(batch, dtype=torch.bool, device=device)
        if self.steps is not None:
            if self.step is None:
                raise RuntimeError("a step interval needs a sampler that calls begin_step(i); "
                                   "use sigma_range with other samplers")
            first, last = self.steps
            on &= bool(first <= self.step <= last)
        if self.sigma_range is not None:
            lo, hi = self.sigma_range
            s = torch.as_tensor(sigma, device=device, dtype=torch.float64).reshape(-1).expand(batch)
            on &= (s >= lo) & (s <= hi)
        return on

    def __call__(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        n = x.shape[0]
        self.counts["calls"] += n
        if self._new_step:
            self.counts["steps"] += n
            self._new_step = False
        on = self._active(sigma, n, x.device)
        if not on.any():
            self.counts["evals"] += n
            self.counts["cost"] += n
            return self.denoiser(x, sigma, labels)
        ev = Evaluation(self.denoiser, self.neg_denoiser, x, sigma, labels, self.window_size,
                        self.window_steps, self.max_window_batch, self.channels, step=self.step,
                        perturb=self.perturb, still=self.still, sigma_of=self.sigma_of)
        out = self.guider(ev)
        if not on.all():
            out = torch.where(on[:, None, None, None], out, ev.pos())
        self.counts["evals"] += ev.evals
        self.counts["cost"] += ev.cost
        return out


def guide(
    denoiser:           Callable,                       # D_pos(x, sigma, labels).
    method:             str = "swg",                    # A name of guidance.table.METHODS (cfg, swg, apg-swg ...).
    weight:             Union[float, Sequence[float], None] = 0.0,  # w, or (w_neg, w_swg) for combinations.
    neg_denoiser:       Optional[Callable] = None,      # D_neg(x, sigma, labels) for cfg / wmg and combinations.
    window_size=None,                                   # k or (k_h, k_w) for the SWG methods.
    window_steps=2,                                     # n or (n_h, n_w) windows per axis.
    masked:             bool = True,                    # M-SWG: guide only where coverage > 1.
    steps:              Optional[Tuple[int, int]] = None,   # Inclusive sampler-step interval.
    sigma_range:        Optional[Tuple[float, float]] = None,  # Inclusive noise-level interval.
    channels:           Optional[slice] = None,         # Guided output channels (None = all).
    reference_quirks:   bool = False,                   # EDM2 reference behaviour of wmg-swg / cfg-swg.
    max_window_batch:   Optional[int] = None,           # Cap on one window call's batch.
    sigma_interval:     Optional[Tuple[float, float]] = None,  # Negative's terms only where lo < sigma <= hi.
    swg_sigma_interval: Optional[Tuple[float, float]] = None,  # Window term only where lo < sigma <= hi.
    perturb:            Optional[Callable[[Hashable], Callable]] = None,  # perturbation -> D_perturbed(x, sigma, c).
    still:              Optional[Callable] = None,      # x -> the prediction that holds x in place (None: zeros).
    sigma_of:           Optional[Callable] = None,      # sampler time -> noise level, for the sigma intervals.
    **params,                                           # The method's parameters (guidance.table: eta, ...).
) -> GuidedDenoiser:
    """Wrap ``denoiser`` with a guidance method; the result has the same call signature.

    Equations (``m`` is the M-SWG mask ``[count > 1]`` when ``masked``, else 1):

    - ``none``:    ``D = D_pos``
    - ``cfg``:     ``D = D_pos + w (D_pos - D_neg(x, sigma, None))``
    - ``wmg``:     ``D = D_pos + w (D_pos - D_neg(x, sigma, c))``
    - ``swg``:     ``D = D_pos + w m (D_pos - D_win)``
    - ``wmg-swg``: ``D = D_pos + w1 (D_pos - D_neg(c)) + w2 m (D_pos - D_win)``
    - ``cfg-swg``: ``D = D_pos + w1 (D_pos - D_neg(None)) + w2 m (D_pos - D_win)``

    ``D_win`` is the positive network run on every window on its own, averaged where
    windows overlap.  ``reference_quirks=True`` reproduces the EDM2 reference code in the
    combined methods (mask never applied; ``cfg-swg`` windows without labels).

    Every method of :data:`guidance.table.METHODS` is accepted (APG, CFG-Zero*, FDG, TCFG and
    their ``-swg`` pairings ...); its parameters (``eta=0.0``, ``zero_steps=1`` ...) are keywords.
    """
    spec = method_spec(method)
    name = spec.name
    if weight is None:
        weight = ()
    ws = tuple(weight) if isinstance(weight, (list, tuple)) else (weight,)
    if spec.num_weights == 0:
        ws = ()
    params = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(params) - {p.name for p in spec.params})
    if unknown:
        known = ", ".join(p.name for p in spec.params) or "none"
        raise GuidanceError(f"method {name!r} has no parameter {', '.join(unknown)} (its parameters: {known})")
    guider = spec.make(ws, masked=masked, reference_quirks=reference_quirks, sigma_interval=sigma_interval,
                       swg_sigma_interval=swg_sigma_interval, **params)
    if spec.perturbation and perturb is None:
        raise GuidanceError(f"method {name!r} runs the positive network perturbed ({spec.perturbation}); pass "
                            f"`perturb` (guidance.perturb.perturber(denoiser, net, [{spec.perturbation!r}]))")
    if spec.needs_neg and neg_denoiser is None:
        raise GuidanceError(f"method {name!r} needs a negative network ({NEGATIVES[spec.negative]}); "
                            f"pass `neg_denoiser`")
    if spec.windows:
        if window_size is None:
            raise GuidanceError(f"method {name!r} needs a window size; pass `window_size`")
        # Validate the numbers early (sizes are checked against the input at call time).
        for k in (window_size if isinstance(window_size, (list, tuple)) else (window_size,)):
            if int(k) <= 0:
                raise WindowError(f"window size must be positive, got {k}; use `window_size` > 0")
        for n in (window_steps if isinstance(window_steps, (list, tuple)) else (window_steps,)):
            if int(n) < 1:
                raise WindowError(f"need at least one window per axis, got {n}; use `window_steps` >= 1")
    for lo_hi, what in ((steps, "steps"), (sigma_range, "sigma_range")):
        if lo_hi is not None and (len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]):
            raise GuidanceError(f"{what} interval must be (first, last) with first <= last, got {lo_hi!r}")
    return GuidedDenoiser(denoiser, guider, neg_denoiser if spec.needs_neg else None, window_size, window_steps,
                          steps, sigma_range, channels, max_window_batch, perturb=perturb, still=still,
                          sigma_of=sigma_of)
