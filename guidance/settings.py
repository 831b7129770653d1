"""One description of a run's guidance, in the library's own words.

Each command line turns its own spellings into a :class:`GuidanceSettings`
(EDM2: ``--g_method --g_weight --swg_sizes --swg_steps --scale_window_guide
--g_interval --clean_combos ...``; DiT: ``--crop --cfg_crop --mask --vanila_cfg
--g-scale --crop-scale --window-size ...``); the samplers, presets and tools read only
this.  The fields are the only place of the guidance's defaults and types, and
:meth:`GuidanceSettings.checked` is the one place they are validated::

    g = GuidanceSettings(method="wmg-swg", weights=(1.2, 0.14), window_size=(40,)).checked()
    guided = g.guide(denoiser, neg_denoiser=weak)      # guidance.guide() with these settings

A new method parameter (a sigma interval, APG's ``eta`` ...) is one field here (or an
entry of ``params``, declared in :mod:`guidance.table`) and, where it needs one, one
check in :meth:`GuidanceSettings.checked`.

Errors name the fields in backticks (`` `window_size` ``); each command line shows its
own flag for them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional, Tuple

from .guided import GuidedDenoiser, guide
from .perturb import perturbation, perturber
from .table import METHODS, GuidanceError, MethodSpec, check_sigma_interval, method_params, method_spec
from .windows import WindowError, WindowGrid

__all__ = ["GuidanceSettings"]


@dataclasses.dataclass(frozen=True)
class GuidanceSettings:
    """What guides a run: method, weights, windows, mask, intervals, the reference's quirks, parameters."""

    method: str = "none"                                   # a name of guidance.table.METHODS (aliases accepted)
    weights: Tuple[float, ...] = ()                        # one per MethodSpec.weights, in order
    window_size: Optional[Tuple[int, ...]] = None          # k or (k_h, k_w) in latent pixels (methods with windows)
    window_steps: Tuple[int, ...] = (2,)                   # windows per axis n or (n_h, n_w)
    masked: bool = True                                    # M-SWG: the window term only where windows overlap
    step_interval: Optional[Tuple[int, int]] = None        # guide only at sampler steps first..last (inclusive)
    reference_quirks: bool = False                         # the EDM2 reference's combined methods (no mask, no labels)
    params: Mapping[str, float] = dataclasses.field(default_factory=dict)  # the method's own (guidance.table)
    sigma_interval: Optional[Tuple[float, float]] = None   # the negative's terms only where lo < sigma <= hi
    window_sigma_interval: Optional[Tuple[float, float]] = None  # the window term only where lo < sigma <= hi
    guided_channels: Optional[int] = None                  # guide only the first N output channels (None: all)
    max_window_batch: Optional[int] = None                 # cap on the batch of one window network call
    perturb_blocks: Optional[Tuple[int, ...]] = None       # PAG / SEG / SLG: the perturbed blocks (None: defaults)
    seg_sigma: Optional[float] = None                      # SEG: query blur width in tokens (None: inf, the mean)

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.method)

    def check_sampler_steps(self, steps: int) -> None:
        """Refuse a step count of the method's own that covers the whole sampler (``steps`` steps)."""
        zero = self.params.get("zero_steps")
        if zero is not None and int(zero) >= int(steps):
            raise GuidanceError(f"`zero_steps` {int(zero)} would zero every one of the {int(steps)} sampler steps; "
                                f"use `zero_steps` < {int(steps)}")

    def checked(self) -> "GuidanceSettings":
        """These settings validated, with canonical values (method name, float weights, int tuples, parameters
        with their defaults).  Raises :class:`guidance.table.GuidanceError` naming the field; changes nothing."""
        spec = method_spec(self.method)
        weights = tuple(float(w) for w in self.weights)
        if not all(math.isfinite(w) for w in weights):
            raise GuidanceError(f"`weight` {','.join(f'{w:g}' for w in weights)} is not finite; give ordinary "
                                f"numbers")
        if spec.num_weights == 0 and weights:
            raise GuidanceError(f"`weight` was given but `method` is {spec.name}; choose a guidance method, "
                                f"e.g. `method` swg")
        if spec.num_weights and len(weights) != spec.num_weights:
            given = f"{len(weights)} ({','.join(f'{w:g}' for w in weights)})" if weights else "none"
            raise GuidanceError(f"`method` {spec.name} takes {spec.num_weights} weight(s), got {given}; "
                                f"e.g. `weight` {spec.example_text()}")
        size = None if self.window_size is None else _pair(self.window_size, "window_size")
        steps = _pair(self.window_steps, "window_steps", check=spec.windows)
        if spec.windows and size is None:
            raise GuidanceError(f"`method` {spec.name} needs a window size; pass `window_size` (e.g. 40 for 64x64 "
                                f"latents, 20 for 32x32)")
        interval = None if self.step_interval is None else tuple(int(v) for v in self.step_interval)
        if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1]):
            raise GuidanceError(f"`step_interval`: expected two step indices first,last with 0 <= first <= last, "
                                f"got {self.step_interval!r}")
        sigma = None if self.sigma_interval is None else check_sigma_interval(self.sigma_interval, "sigma_interval")
        window_sigma = None if self.window_sigma_interval is None else \
            check_sigma_interval(self.window_sigma_interval, "window_sigma_interval")
        if window_sigma is not None and not spec.windows:
            pair = f"{spec.name}-swg" if f"{spec.name}-swg" in METHODS else "an X-swg method"
            raise GuidanceError(f"`window_sigma_interval` limits the window term, but `method` {spec.name} has no "
                                f"windows; drop it or use {pair}")
        if sigma is not None and not (spec.needs_neg or spec.perturbation):
            raise GuidanceError(f"`sigma_interval` limits the negative's terms, but `method` {spec.name} has none; "
                                f"use `window_sigma_interval` for the window term")
        blocks, seg_sigma = self._perturbation(spec)
        for name, value in (("guided_channels", self.guided_channels), ("max_window_batch", self.max_window_batch)):
            if value is not None and int(value) < 1:
                raise GuidanceError(f"`{name}` must be >= 1")
        return dataclasses.replace(self, method=spec.name, weights=weights, window_size=size, window_steps=steps,
                                   masked=bool(self.masked), step_interval=interval,
                                   reference_quirks=bool(self.reference_quirks),
                                   params=method_params(spec, self.params), sigma_interval=sigma,
                                   window_sigma_interval=window_sigma, perturb_blocks=blocks, seg_sigma=seg_sigma)

    def _perturbation(self, spec: MethodSpec) -> Tuple[Optional[Tuple[int, ...]], Optional[float]]:
        """Canonical ``perturb_blocks`` and ``seg_sigma`` (inf is None, the default); refused for other methods."""
        if spec.perturbation is None:
            for name in ("perturb_blocks", "seg_sigma"):
                if getattr(self, name) is not None:
                    raise GuidanceError(f"`{name}` belongs to the perturbed passes (pag, seg, slg and their -swg); "
                                        f"`method` {spec.name} does not use it (drop it or choose e.g. `method` "
                                        f"{'seg' if name == 'seg_sigma' else 'pag'})")
            return None, None
        p = perturbation(spec.perturbation, self.perturb_blocks, self.seg_sigma)
        return p.blocks, None if math.isinf(p.seg_sigma) else p.seg_sigma

    def check_network(self, net) -> None:
        """PAG / SEG / SLG: the chosen blocks of ``net`` exist and take the perturbation (the error lists the valid ones)."""
        kind = self.spec.perturbation
        if kind is not None:
            perturbation(kind, self.perturb_blocks, self.seg_sigma).resolve(net)

    def perturber(self, denoiser: Callable, net) -> Optional[Callable]:
        """What :meth:`guide` needs as ``perturb`` for PAG / SEG / SLG (None for other methods): the perturbed
        pass of ``net`` through ``denoiser`` (which passes ``edit=`` on), its blocks checked against ``net`` now."""
        kind = self.spec.perturbation
        if kind is None:
            return None
        return perturber(denoiser, net, [kind], self.perturb_blocks, self.seg_sigma)

    def check_input(self, height: int, width: int) -> None:
        """The windows fit an input of ``height x width`` (a :class:`guidance.windows.WindowError` otherwise)."""
        if self.spec.windows:
            WindowGrid.create(height, width, self.window_size, self.window_steps)

    def guide(self, denoiser: Callable, neg_denoiser: Optional[Callable] = None, *,
              perturb: Optional[Callable] = None, still: Optional[Callable] = None,
              sigma_of: Optional[Callable] = None) -> GuidedDenoiser:
        """:func:`guidance.guide` of ``denoiser`` with these settings (the guided ``D(x, sigma, labels)``).

        The callables the sampler supplies: ``perturb`` (PAG / SEG / SLG's perturbed pass), ``still`` (the
        prediction that holds ``x`` in place), ``sigma_of`` (sampler time -> noise level, for the intervals).
        """
        spec = self.spec
        return guide(denoiser, method=spec.name, weight=self.weights or None,
                     neg_denoiser=neg_denoiser, window_size=self.window_size if spec.windows else None,
                     window_steps=self.window_steps, masked=self.masked, steps=self.step_interval,
                     channels=None if self.guided_channels is None else slice(0, self.guided_channels),
                     reference_quirks=self.reference_quirks, max_window_batch=self.max_window_batch,
                     sigma_interval=self.sigma_interval, swg_sigma_interval=self.window_sigma_interval,
                     perturb=perturb, still=still, sigma_of=sigma_of, **self.params)


def _pair(value, name: str, check: bool = True) -> Tuple[int, ...]:
    """One or two positive integers (``k`` or ``(k_h, k_w)``) as a tuple (``check=False``: unused, not checked)."""
    vals = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else (value,)))
    if not check:
        return vals
    if len(vals) not in (1, 2):
        raise GuidanceError(f"`{name}`: give one integer or two (height,width), got {value!r}")
    bad = [v for v in vals if v < 1]
    if bad and name == "window_steps":
        raise WindowError(f"need at least one window per axis, got n={bad[0]}; use `window_steps` >= 1")
    if bad:
        raise WindowError(f"window size must be positive, got {bad[0]}; use `{name}` > 0")
    return vals
