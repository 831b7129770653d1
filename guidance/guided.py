"""Turn any denoiser ``D(x, sigma, labels)`` into a guided one.

>>> guided = guide(net, method="swg", weight=0.2, window_size=40, window_steps=2)
>>> x0 = edm_sampler(guided, noise, labels)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

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
    """

    def __init__(self, denoiser: Callable, guider: Guider, neg_denoiser: Optional[Callable] = None,
                 window_size=None, window_steps=2, steps: Optional[Tuple[int, int]] = None,
                 sigma_range: Optional[Tuple[float, float]] = None, channels: Optional[slice] = None,
                 max_window_batch: Optional[int] = None):
        self.denoiser, self.guider, self.neg_denoiser = denoiser, guider, neg_denoiser
        self.window_size, self.window_steps = window_size, window_steps
        self.steps, self.sigma_range = steps, sigma_range
        self.channels, self.max_window_batch = channels, max_window_batch
        self.step: Optional[int] = None

    def begin_step(self, i: int) -> None:
        """Called by the sampler at the start of step ``i`` (both Heun evaluations belong to it)."""
        self.step = int(i)

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
        on = self._active(sigma, x.shape[0], x.device)
        if not on.any():
            return self.denoiser(x, sigma, labels)
        ev = Evaluation(self.denoiser, self.neg_denoiser, x, sigma, labels, self.window_size,
                        self.window_steps, self.max_window_batch, self.channels)
        out = self.guider(ev)
        if not on.all():
            out = torch.where(on[:, None, None, None], out, ev.pos())
        return out


def guide(
    denoiser:           Callable,                       # D_pos(x, sigma, labels).
    method:             str = "swg",                    # none | cfg | wmg | swg | wmg-swg | cfg-swg.
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
    """
    spec = method_spec(method)
    name = spec.name
    if weight is None:
        weight = ()
    ws = tuple(weight) if isinstance(weight, (list, tuple)) else (weight,)
    if spec.num_weights == 0:
        ws = ()
    guider = spec.make(ws, masked=masked, reference_quirks=reference_quirks)
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
                          steps, sigma_range, channels, max_window_batch)
