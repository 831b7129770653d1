"""DiT as a denoiser for the shared guidance module, and the DiT guidance modes of the reference.

The DiT network predicts ``[eps, v]`` (``2C`` channels) from ``(x_t, t, y)``.
:class:`DiTDenoiser` gives it the ``D(x, sigma, labels)`` signature of
:mod:`guidance` (``sigma`` is the integer timestep here, ``labels=None`` means
the null class), and :func:`dit_guidance` maps the reference's switches to a
:func:`guidance.guide` call.  Every mode extrapolates on the network output
(``eps`` and possibly ``v``) before DiT's diffusion turns it into a step:

- ``swg`` (``--crop 1``, M-SWG with ``--mask 1``), all ``2C`` channels::

      out = pos + w m (pos - win)

- ``cfg`` (``--vanila_cfg 1``), on the first 3 channels as DiT's release does
  (``cfg_channels="all"`` guides all ``C`` eps channels); variance from ``pos``::

      eps = uncond + s (pos - uncond) = pos + (s - 1)(pos - uncond)

- ``cfg-swg`` (``--cfg_crop 1``), on the ``C`` eps channels; windows with the
  true labels, mask honoured, variance from the conditional output::

      eps = pos + g (pos - uncond) + w m (pos - win)

``uncond`` (``--uncond 1``) samples with the null class and no guidance.

Any other method of :data:`guidance.table.METHODS` (APG, CFG-Zero*, FDG, TCFG, PAG ... and
their ``-swg`` pairings) runs with its table weights on the ``C`` eps channels (variance
from ``pos``), the null class as the unconditional negative, the masked windows of the
pairings, and sigma intervals in DiT's noise level ``sigma(t) = sqrt(1 / alpha_bar_t - 1)``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Tuple

import torch

from .settings import GuidanceSettings
from .table import METHODS, method_params, method_spec
from utils.errors import UsageError

__all__ = ["DiTDenoiser", "dit_guidance", "dit_settings", "guide_dit", "DIT_MODES", "ReferenceMode", "REFERENCE_MODES",
           "reference_mode", "idle_scales", "table_methods", "default_window_size"]


@dataclasses.dataclass(frozen=True)
class ReferenceMode:
    """A guidance mode of DiT's reference script: the 0/1 switch that selects it, the mode it runs
    (a method of :data:`guidance.table.METHODS`, or ``uncond``), the scales that give its weights
    (``g_scale`` / ``crop_scale``, see :func:`dit_settings`), what each scale is (``W``: a weight,
    ``S``: DiT's CFG scale, 1 = unguided) and example values."""

    switch: str
    mode: str
    scales: Tuple[str, ...] = ()
    meaning: Tuple[str, ...] = ()
    example: Tuple[float, ...] = ()
    terms: Tuple[str, ...] = ()            # the guidance term each scale weighs (for messages)

    @property
    def windows(self) -> bool:
        """Whether the mode uses the sliding windows (and so takes ``mask``)."""
        return self.mode in METHODS and METHODS[self.mode].windows


# In the order the reference checks its switches (the first one set wins there; here two are an error).
REFERENCE_MODES = (
    ReferenceMode("crop", "swg", ("g_scale",), ("W",), (0.5,), ("SWG",)),
    ReferenceMode("cfg_crop", "cfg-swg", ("g_scale", "crop_scale"), ("W1", "W2"), (0.6, 0.5), ("CFG", "SWG")),
    ReferenceMode("vanila_cfg", "cfg", ("g_scale",), ("S",), (1.5,), ("CFG",)),
    ReferenceMode("uncond", "uncond"),
)
DIT_MODES = ("none", *(m.mode for m in REFERENCE_MODES))  # every mode the switches select, and none


def table_methods() -> list:
    """The methods DiT runs with ``--method``: the table's, less the reference's modes (the switches) and the
    methods that need a weaker network (DiT samples with one network)."""
    return [name for name, spec in METHODS.items() if name not in DIT_MODES and spec.negative != "weak"]


def reference_mode(switches: Mapping[str, object], g_scale: float = 0.0, crop_scale: float = 0.0) -> str:
    """The mode the reference's switches select (``{"crop": 1, ...}``; missing or 0 = off; ``"none"`` without
    one), checked with its scales as the reference means them (see :func:`dit_settings`).

    >>> reference_mode({"crop": 1, "cfg_crop": 0}, g_scale=0.5)
    'swg'
    """
    chosen = [m for m in REFERENCE_MODES if switches.get(m.switch)]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(f'`{m.switch}`' for m in chosen)} exclude each other; pick one guidance "
                         f"switch")
    mode = chosen[0] if chosen else ReferenceMode("", "none")
    g, c = g_scale, crop_scale
    if g < 0 or c < 0:
        raise UsageError(f"guidance scales must be >= 0, got `g_scale` {g} `crop_scale` {c}")
    if c > 0 and "crop_scale" not in mode.scales:
        raise UsageError("`crop_scale` is the SWG weight of `cfg_crop` 1; with `crop` 1 the weight is `g_scale`")
    if g > 0 and "g_scale" not in mode.scales:
        if chosen:
            raise UsageError(f"`{mode.switch}` 1 samples without guidance; drop `g_scale`")
        *first, last = [f"`{m.switch}` 1 ({METHODS[m.mode].label})" for m in REFERENCE_MODES if m.scales]
        raise UsageError(f"`g_scale` needs a guidance switch: {', '.join(first)} or {last}")
    if "S" in mode.meaning and g < 1:
        raise UsageError(f"`{mode.switch}` 1 needs DiT's CFG scale `g_scale` >= 1 (1 = no guidance, e.g. "
                         f"{mode.example[0]:g}), got {g}")
    return mode.mode


def idle_scales(switches: Mapping[str, object], scales: Mapping[str, float]) -> Optional[str]:
    """A warning (code spans for the parameters) when the chosen switch's weight scales are 0, else None: the
    reference then samples without that term (all 0: without guidance), which is rarely what was meant."""
    mode = next((m for m in REFERENCE_MODES if switches.get(m.switch)), None)
    if mode is None or "W" not in "".join(mode.meaning):
        return None
    idle = [(s, ex, term) for s, v, ex, term in zip(mode.scales, mode.meaning, mode.example, mode.terms)
            if v.startswith("W") and not scales[s]]
    if not idle:
        return None
    what = ("samples without guidance" if len(idle) == len(mode.scales)
            else f"has no {' or '.join(t for *_, t in idle)} term")
    return (f"`{mode.switch}` 1 with {' and '.join(f'`{s}` 0' for s, *_ in idle)} {what}, as in the reference; "
            f"give {' and '.join(f'`{s}` > 0 (e.g. {ex:g})' for s, ex, _ in idle)}")


class DiTDenoiser:
    """``D(x, t, labels) = net(x, t, labels)``, ``labels=None`` meaning the null class ``num_classes``."""

    def __init__(self, net: torch.nn.Module):
        self.net = net

    @property
    def null_class(self) -> int:
        return self.net.num_classes

    def __call__(self, x: torch.Tensor, t, labels: Optional[torch.Tensor] = None, edit=None) -> torch.Tensor:
        """``edit``: a block edit for this call (the perturbed passes of :mod:`guidance.perturb`)."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if labels is None:
            if not self.net.has_null_class:
                raise UsageError("this DiT has no null-class embedding (class_dropout_prob=0); "
                                 "unconditional sampling and CFG need a model trained with label dropout")
            labels = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        return self.net(x, t, labels) if edit is None else self.net(x, t, labels, edit=edit)


def default_window_size(latent_size: int) -> int:
    """Window of the paper: 5/8 of the latent (20 for 32x32 latents, 40 for 64x64)."""
    return latent_size * 5 // 8


def dit_settings(
    mode: str = "none",
    g_scale: float = 0.0,
    crop_scale: float = 0.0,
    mask: bool = False,
    window_size=None,
    window_steps=2,
    cfg_channels: str = "reference",
    in_channels: int = 4,
    max_window_batch: Optional[int] = None,
    weights=None,
    params: Optional[dict] = None,
    sigma_interval=None,
    swg_sigma_interval=None,
    perturb_blocks=None,
    seg_sigma=None,
) -> GuidanceSettings:
    """The :class:`guidance.settings.GuidanceSettings` of one of :data:`DIT_MODES` (the reference's switches),
    or of another method of the table.

    ``g_scale``: SWG weight ``w`` (``swg``), CFG scale ``s`` (``cfg``, ``s = 1`` is
    unguided) or CFG weight ``g`` (``cfg-swg``); ``crop_scale``: SWG weight of
    ``cfg-swg``.  ``cfg_channels``: ``"reference"`` (3 channels) or ``"all"``
    (every eps channel, ``in_channels``) for plain CFG.  ``window_size`` is
    needed by the window modes.  Another table method (``mode="apg-swg"`` ...) takes
    ``weights`` in the table's convention, its ``params`` and ``sigma_interval`` /
    ``swg_sigma_interval`` (in DiT's noise level); PAG / SEG / SLG their ``perturb_blocks`` and ``seg_sigma``.
    """
    if mode not in DIT_MODES:
        spec = method_spec(mode, "method")
        if spec.negative == "weak":
            raise UsageError(f"`method` {spec.name} needs a weaker network; DiT samples with one network "
                             f"(use the null class: e.g. `method` cfg-zero, apg)")
        return GuidanceSettings(method=spec.name, weights=tuple(weights or ()),
                                window_size=window_size if spec.windows else None,
                                window_steps=window_steps if spec.windows else GuidanceSettings.window_steps,
                                masked=bool(mask) if spec.windows else GuidanceSettings.masked,
                                params=method_params(spec, params or {}, "method"),
                                sigma_interval=sigma_interval, window_sigma_interval=swg_sigma_interval,
                                guided_channels=in_channels, max_window_batch=max_window_batch,
                                perturb_blocks=perturb_blocks, seg_sigma=seg_sigma).checked()
    if cfg_channels not in ("reference", "all"):
        raise UsageError(f"cfg_channels must be 'reference' or 'all', got {cfg_channels!r}")
    if mode in ("swg", "cfg-swg") and g_scale == 0 and crop_scale == 0:
        mode = "none"  # SWG (or CFG+SWG) with weight 0 is plain sampling, as in the reference
    windows = dict(window_size=window_size, window_steps=window_steps, masked=bool(mask),
                   max_window_batch=max_window_batch)
    if mode in ("none", "uncond"):
        return GuidanceSettings(method="none", max_window_batch=max_window_batch).checked()
    if mode == "swg":
        return GuidanceSettings(method="swg", weights=(g_scale,), **windows).checked()
    if mode == "cfg":
        return GuidanceSettings(method="cfg", weights=(g_scale - 1.0,),
                                guided_channels=3 if cfg_channels == "reference" else in_channels).checked()
    return GuidanceSettings(method="cfg-swg", weights=(g_scale, crop_scale), guided_channels=in_channels,
                            reference_quirks=False, **windows).checked()


def dit_guidance(net: torch.nn.Module, mode: str = "none", g_scale: float = 0.0, crop_scale: float = 0.0,
                 mask: bool = False, window_size=None, window_steps=2, cfg_channels: str = "reference",
                 max_window_batch: Optional[int] = None, weights=None, params: Optional[dict] = None,
                 sigma_interval=None, swg_sigma_interval=None, sigma_of=None, perturb=None,
                 perturb_blocks=None, seg_sigma=None):
    """Guided DiT denoiser ``D(x, t, labels) -> [eps, v]`` for one of :data:`DIT_MODES` or another table method
    (see :func:`dit_settings`); ``sigma_of`` maps a timestep to its noise level (for the sigma intervals),
    ``perturb`` gives PAG / SEG / SLG their perturbed pass (default: ``net``'s own, on ``perturb_blocks`` with
    ``seg_sigma``; :mod:`guidance.perturb`).

    ``window_size`` defaults to :func:`default_window_size` of the network's latent.
    """
    if window_size is None:
        window_size = default_window_size(net.input_size)
    settings = dit_settings(mode, g_scale, crop_scale, mask, window_size, window_steps, cfg_channels,
                            net.in_channels, max_window_batch, weights, params, sigma_interval, swg_sigma_interval,
                            perturb_blocks, seg_sigma)
    return guide_dit(settings, net, sigma_of=sigma_of, perturb=perturb)


def guide_dit(settings: GuidanceSettings, net: torch.nn.Module, *, sigma_of=None, perturb=None):
    """The DiT ``net`` guided by ``settings`` (the null class as the unconditional negative; PAG / SEG / SLG
    perturb ``net`` itself unless ``perturb`` is given)."""
    den = DiTDenoiser(net)
    return settings.guide(den, neg_denoiser=den if settings.spec.needs_neg else None, sigma_of=sigma_of,
                          perturb=perturb if perturb is not None else settings.perturber(den, net))
