"""SWG and M-SWG for diffusers models: an adapter for :func:`guidance.guide`, a drop-in wrapper, a guider.

Three ways in, one window computation (:func:`guidance.windows.sliding_window_predict`):

- :class:`DiffusersDenoiser` turns one call of a diffusers denoiser
  (``UNet2DConditionModel``, ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
  ``SD3Transformer2DModel``, ...) into the ``D(x, t, rows)`` callable of
  :func:`guidance.guide`: ``rows`` are batch indices, repeated once per window by
  the window code, and every per-sample conditioning input of the call (text
  embeddings, SDXL ``added_cond_kwargs``, class labels, attention masks, pooled
  projections) is indexed with them, so each window carries its own sample's
  conditioning.
- :class:`SlidingWindowGuided` replaces ``pipe.unet`` / ``pipe.transformer``:
  SWG on the conditional half of the batch, so the pipeline's own CFG yields
  this toolkit's ``cfg-swg`` (and plain SWG when CFG is off).
- :class:`SlidingWindowGuidance` is a guider for diffusers' modular pipelines
  (``diffusers.guiders.BaseGuidance``).

Windows are in latent pixels.  Guidance combines the model's own output
(epsilon, v or flow velocity).  For a fixed ``(x, t)`` each of these maps to the
denoised estimate by an affine map ``x0 = a(t) x + b(t) out`` that acts pixel by
pixel, and the window average and the mask are linear and reproduce ``a x``, so
``x0(pos + w m (pos - win)) = x0_pos + w m (x0_pos - x0_win)``: guiding the
output is guiding the denoised estimate (tests/test_diffusers_guidance.py checks
it for all three parameterisations).

Position tables of transformer windows (``pos_embed``):

- ``DiTTransformer2DModel``: ``"resize"`` (default) resizes the trained
  ``G x G`` sin-cos table to the window's ``g x g`` grid by bicubic interpolation,
  as the SWG reference and :class:`networks.dit.DiT` do; ``"native"`` keeps
  diffusers' own rule (sin-cos evaluated at positions ``i G / g``, a stretched
  table); ``"sincos"`` uses the trained spacing (positions ``0 .. g-1``, the
  top-left corner of the trained table, as ``--pos-embed sincos``).  diffusers'
  DiT unpatchifies square grids only: windows must be square.
- ``PixArtTransformer2DModel``: same three choices, ``"native"`` by default
  (PixArt rescales its table for every resolution, a window is one more).
- ``SD3Transformer2DModel``: ``"native"`` only; SD3 crops the centre of its
  ``pos_embed_max_size`` table for any smaller latent, so a window gets the
  table of an image of its own size.
- ``UNet2DConditionModel``: convolutional, no table; windows should be
  multiples of ``2^(levels - 1)`` latent pixels (:func:`window_multiple`).

Spatial conditioning (ControlNet / T2I-adapter residuals) cannot be cut into
windows and is refused with a one-line error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from utils.errors import UsageError

from .methods import SWG, Evaluation
from .windows import WindowError, WindowGrid, sliding_window_predict

__all__ = ["DiffusersDenoiser", "SlidingWindowGuided", "SlidingWindowGuidance", "default_windows",
           "window_multiple", "POS_EMBED_POLICIES"]

POS_EMBED_POLICIES = ("auto", "resize", "native", "sincos")
Pair = Union[int, Sequence[int]]

# Keyword inputs that are spatial maps of the full latent: no window can carry them.
_SPATIAL_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual",
                   "down_intrablock_additional_residuals", "block_controlnet_hidden_states",
                   "controlnet_block_samples", "controlnet_single_block_samples")


# ----------------------------------------------------------------------------
# Window geometry for diffusers models.

def _config(model) -> dict:
    return dict(getattr(model, "config", {}) or {})


def window_multiple(model) -> int:
    """Latent pixels a window side must be a multiple of: the patch size, or ``2^(levels-1)`` for a UNet."""
    cfg = _config(model)
    if cfg.get("patch_size"):
        return int(cfg["patch_size"])
    if cfg.get("block_out_channels"):
        return 2 ** (len(cfg["block_out_channels"]) - 1)
    return 1


def default_windows(height: int, width: int, multiple: int = 1) -> Tuple[Tuple[int, int], int]:
    """The paper's windows for any latent: ``5/8`` of each side, 2 per axis.

    Each side is rounded to the nearest multiple of ``multiple`` (patch size or
    UNet factor), made large enough that the two windows overlap, and at most
    the side.  Returns ``(window_size, window_steps)`` for :func:`guidance.guide`:
    40 for a 64 x 64 latent (SD 1.5 at 512 px), 20 for DiT's 32 x 32, 80 for SDXL's 128 x 128.
    """
    def side(n: int) -> int:
        k = max(multiple, int(math.floor(n * 5 / 8 / multiple + 0.5)) * multiple)
        if 2 * k <= n:  # two windows must overlap, or M-SWG's mask is empty
            k += multiple
        return min(k, n)

    return (side(height), side(width)), 2


# ----------------------------------------------------------------------------
# Position tables.

def _patch_embed(model):
    """The model's diffusers ``PatchEmbed`` (``model.pos_embed``) or None."""
    pe = getattr(model, "pos_embed", None)
    return pe if pe is not None and hasattr(pe, "proj") and hasattr(pe, "pos_embed") else None


def _is_dit(model) -> bool:
    return type(model).__name__ == "DiTTransformer2DModel" or (
        _config(model).get("norm_type") == "ada_norm_zero" and _patch_embed(model) is not None)


def _resolve_policy(model, policy: str) -> str:
    if policy not in POS_EMBED_POLICIES:
        raise UsageError(f"unknown pos_embed policy {policy!r}; use one of {', '.join(POS_EMBED_POLICIES)}")
    pe = _patch_embed(model)
    if pe is None or pe.pos_embed is None:
        if policy not in ("auto", "native"):
            raise UsageError(f"{type(model).__name__} has no position table to {policy}; use pos_embed='native'")
        return "native"
    if pe.pos_embed_max_size:
        if policy not in ("auto", "native"):
            raise UsageError(f"{type(model).__name__} crops its pos_embed_max_size table for every latent size; "
                             f"only pos_embed='native' applies")
        return "native"
    if policy == "auto":
        return "resize" if _is_dit(model) else "native"
    return policy


def _bicubic(table: torch.Tensor, old: Tuple[int, int], new: Tuple[int, int]) -> torch.Tensor:
    """``[1, G_h*G_w, D]`` -> ``[1, g_h*g_w, D]``: bicubic, ``align_corners=False``, float32.

    The reference's resize (and :func:`networks.dit.resize_pos_embed`'s): no anti-aliasing.
    """
    dim = table.shape[-1]
    image = table.float().reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=new, mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, -1, dim)


def _grid_table(pe, grid: Tuple[int, int], policy: str) -> torch.Tensor:
    full = (pe.height, pe.width)
    if policy == "resize":
        return _bicubic(pe.pos_embed, full, grid)
    # "sincos": the trained spacing from the window's own origin = the top-left g_h x g_w of the trained table.
    return pe.pos_embed.reshape(1, full[0], full[1], -1)[:, :grid[0], :grid[1]].reshape(1, grid[0] * grid[1], -1)


@contextlib.contextmanager
def _window_positions(model, x: torch.Tensor, policy: str):
    """While active, the model's ``PatchEmbed`` uses ``policy``'s table for ``x``'s patch grid."""
    pe = _patch_embed(model)
    if policy == "native" or pe is None:
        yield
        return
    grid = (x.shape[-2] // pe.patch_size, x.shape[-1] // pe.patch_size)
    if grid == (pe.height, pe.width):
        yield
        return
    if grid[0] > pe.height or grid[1] > pe.width:
        raise UsageError(f"window grid {grid} is larger than the trained {pe.height}x{pe.width}; use smaller windows")
    saved = pe.height, pe.width, pe.pos_embed
    table = _grid_table(pe, grid, policy)
    try:
        pe.height, pe.width = grid
        pe.pos_embed = table
        yield
    finally:
        pe.height, pe.width = saved[0], saved[1]
        pe.pos_embed = saved[2]


def check_windows(model, grid: WindowGrid) -> None:
    """Refuse windows the model cannot denoise, naming the fix."""
    name = type(model).__name__
    pe = _patch_embed(model)
    if pe is not None:
        p = pe.patch_size
        if grid.kh % p or grid.kw % p:
            raise WindowError(f"{name} needs windows that are multiples of its patch size {p}, got "
                              f"{grid.kh}x{grid.kw}; e.g. window_size={default_windows(grid.height, grid.width, p)[0]}")
        if pe.pos_embed_max_size and max(grid.kh, grid.kw) // p > pe.pos_embed_max_size:
            raise WindowError(f"{name} windows may span at most {pe.pos_embed_max_size} patches; use smaller windows")
    if _is_dit(model) and grid.kh != grid.kw:
        raise WindowError(f"diffusers' DiT unpatchifies square grids only; use square windows, got {grid.kh}x{grid.kw}")


# ----------------------------------------------------------------------------
# Call arguments.

def _signature(fn: Callable) -> inspect.Signature:
    return inspect.signature(fn)


def _bind(fn: Callable, args, kwargs) -> Tuple[str, dict]:
    """``(latent argument name, all call arguments by name)`` of a denoiser call."""
    sig = _signature(fn)
    names = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not names:
        raise UsageError("the wrapped model's forward takes no latent argument; wrap a diffusers denoiser")
    bound = sig.bind_partial(*args, **kwargs)
    arguments = dict(bound.arguments)
    for name, param in sig.parameters.items():  # flatten **kwargs
        if param.kind == param.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    return names[0], arguments


def _take(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """Index every per-sample tensor (leading dim ``batch``) of a nested input with ``rows``."""
    if torch.is_tensor(value):
        if value.ndim >= 1 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, dict):
        return {k: _take(v, rows, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, rows, batch) for v in value)
    return value


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output.sample if hasattr(output, "sample") else output[0]


def _pack(template, sample: torch.Tensor, return_dict: bool):
    """The output in the form the caller asked for: the model's output class, or a tuple."""
    if not return_dict or template is None or isinstance(template, (tuple, list)):
        return (sample,)
    field = dataclasses.fields(template)[0].name
    return type(template)(**{field: sample})


class DiffusersDenoiser:
    """``D(x, t, rows)`` of one diffusers denoiser call, for :func:`guidance.guide` and the window code.

    ``call_kwargs`` are the call's arguments except the latent and ``timestep``
    (``encoder_hidden_states``, ``added_cond_kwargs``, ``class_labels``, ...) for a
    batch of ``batch`` samples.  ``rows`` (a long tensor of batch indices, one per
    sample of ``x``) selects each sample's conditioning; ``rows=None`` passes the
    call's inputs unchanged (``x`` is then the whole batch).  ``forward`` replaces
    the model's ``__call__`` (the guider uses the un-hooked forward).  Returns the
    model's prediction tensor (epsilon, v or velocity; DiT: ``[eps, variance]``).
    """

    def __init__(self, model, call_kwargs: dict, batch: int, pos_embed: str = "auto",
                 forward: Optional[Callable] = None, latent_name: Optional[str] = None):
        self.model, self.batch = model, int(batch)
        self.forward = forward if forward is not None else model
        self.latent_name = latent_name or _bind(forward or model.forward, (None,), {})[0]
        self.kwargs = {k: v for k, v in call_kwargs.items() if k not in ("return_dict", "timestep", self.latent_name)}
        spatial = [k for k in _SPATIAL_KWARGS if self.kwargs.get(k) is not None]
        if spatial:
            raise UsageError(f"{spatial[0]} is a spatial map of the whole latent and cannot be cut into windows; "
                             f"use SWG without ControlNet/adapters")
        self.policy = _resolve_policy(model, pos_embed)
        self.output_template = None

    def __call__(self, x: torch.Tensor, t, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        kwargs = self.kwargs if rows is None else _take(self.kwargs, rows, self.batch)
        with _window_positions(self.model, x, self.policy):
            out = self.forward(**{self.latent_name: x}, timestep=t, **kwargs, return_dict=True)
        if self.output_template is None and dataclasses.is_dataclass(out):
            self.output_template = out
        return _first(out)


def _subset_t(t, rows: torch.Tensor, batch: int):
    return t.index_select(0, rows.to(t.device)) if torch.is_tensor(t) and t.ndim == 1 and t.shape[0] == batch else t


def _in_interval(t, interval, batch: int, device) -> torch.Tensor:
    """Per-sample boolean: is the timestep inside the inclusive ``interval``?"""
    if interval is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    lo, hi = interval
    s = torch.as_tensor(t, device=device, dtype=torch.float64).reshape(-1).expand(batch)
    return (s >= lo) & (s <= hi)


# ----------------------------------------------------------------------------
# Drop-in wrapper for the classic pipelines.

class SlidingWindowGuided(torch.nn.Module):
    """A diffusers denoiser with SWG / M-SWG on the conditional half of the batch.

    ``pipe.unet = SlidingWindowGuided(pipe.unet, weight=0.3)`` (or ``pipe.transformer = ...``).
    For a call on latents ``x`` with timestep ``t`` it returns, per conditional sample::

        out_c = pos_c + w m (pos_c - win_c)                    (SWG; m = [count > 1] if masked, else 1)

    where ``pos`` is the model's output on the whole batch (one call, exactly as
    without the wrapper) and ``win_c`` averages the model run on each window of
    the conditional sample on its own, with that sample's conditioning.

    Classifier-free batches (``[uncond; cond]`` for SD/SDXL/PixArt/SD3,
    ``[cond; uncond]`` for DiTPipeline) are recognised by their two identical
    latent halves (or ``cfg_batch=True/False``).  The unconditional half is not
    windowed: it keeps the model output ``pos_u`` and, with ``shift_uncond=True``
    (default), receives its partner's SWG term ``w m (pos_c - win_c)``.  Every
    pipeline's CFG ``u + s (c - u)`` is affine with weights summing to one, so it
    then yields, for any scale ``s``::

        pos_c + (s - 1)(pos_c - pos_u) + w m (pos_c - win_c)      (the toolkit's cfg-swg, w1 = s - 1, w2 = w)

    With ``shift_uncond=False`` the unconditional half is returned untouched
    (bit-identical to the unwrapped model) and the SWG term is scaled by ``s``.

    ``window_size``/``window_steps``: windows in latent pixels (default: the
    paper's 5/8 of each side, 2 per axis, for whatever latent arrives);
    ``interval=(lo, hi)``: guide only calls whose ``timestep`` lies in ``[lo, hi]``
    (model units: 0..999 for DDPM-type schedulers, ``sigma * 1000`` for flow);
    outside it the wrapped model is called as is.  ``pos_embed``: position table of
    transformer windows (module doc).  Attributes, ``config``, ``dtype`` and
    ``device`` are the wrapped model's; ``.model`` is the model itself.
    """

    def __init__(self, model: torch.nn.Module, weight: float = 0.0, window_size: Optional[Pair] = None,
                 window_steps: Pair = 2, masked: bool = True, interval: Optional[Tuple[float, float]] = None,
                 pos_embed: str = "auto", cond_half: str = "auto", cfg_batch: Optional[bool] = None,
                 shift_uncond: bool = True, max_window_batch: Optional[int] = None):
        super().__init__()
        if isinstance(model, SlidingWindowGuided):
            raise UsageError("the model is already wrapped; wrap pipe.unet.model or set its weight instead")
        if cond_half not in ("auto", "first", "last"):
            raise UsageError(f"cond_half must be 'auto', 'first' or 'last', got {cond_half!r}")
        if interval is not None and (len(interval) != 2 or interval[0] > interval[1]):
            raise UsageError(f"interval must be (lo, hi) timesteps with lo <= hi, got {interval!r}")
        for k in (window_size if isinstance(window_size, (list, tuple)) else (window_size,)):
            if k is not None and int(k) <= 0:
                raise WindowError(f"window size must be positive, got {k}")
        self.model = model
        self.weight, self.window_size, self.window_steps = float(weight), window_size, window_steps
        self.masked, self.interval, self.cfg_batch = bool(masked), interval, cfg_batch
        self.shift_uncond, self.max_window_batch = bool(shift_uncond), max_window_batch
        self.pos_embed = pos_embed
        _resolve_policy(model, pos_embed)  # validate now
        self.cond_half = ("first" if _is_dit(model) else "last") if cond_half == "auto" else cond_half

    # -- looking like the wrapped model ------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None:
                raise
            return getattr(model, name)

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- the guided call ----------------------------------------------------
    def grid(self, height: int, width: int) -> WindowGrid:
        """Window grid for an ``height x width`` latent (the paper's default when no size was given)."""
        size, steps = self.window_size, self.window_steps
        if size is None:
            size = default_windows(height, width, window_multiple(self.model))[0]
        grid = WindowGrid.create(height, width, size, steps)
        check_windows(self.model, grid)
        return grid

    def halves(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(conditional rows, unconditional rows or None)`` of a batch."""
        n = x.shape[0]
        doubled = self.cfg_batch
        if doubled is None:
            doubled = n % 2 == 0 and n > 0 and torch.equal(x[: n // 2], x[n // 2:])
        rows = torch.arange(n, device=x.device)
        if not doubled:
            return rows, None
        if n % 2:
            raise UsageError(f"cfg_batch=True needs an even batch, got {n}")
        first, last = rows[: n // 2], rows[n // 2:]
        return (first, last) if self.cond_half == "first" else (last, first)

    def forward(self, *args, **kwargs):
        latent, call = _bind(self.model.forward, args, kwargs)
        x, t = call.get(latent), call.get("timestep")
        return_dict = call.get("return_dict", True)
        n = x.shape[0]
        on = _in_interval(t, self.interval, n, x.device)
        if self.weight == 0 or not on.any():
            return self.model(*args, **kwargs)

        grid = self.grid(x.shape[-2], x.shape[-1])  # bad windows fail before any model call
        cond, uncond = self.halves(x)
        den = DiffusersDenoiser(self.model, call, n, self.pos_embed, latent_name=latent)
        pos = den(x, t)  # the unwrapped call: whole batch, inputs untouched
        whole = uncond is None
        x_c = x if whole else x.index_select(0, cond)
        t_c = t if whole else _subset_t(t, cond, n)
        pos_c = pos if whole else pos.index_select(0, cond)

        ev = Evaluation(lambda xx, s, rows: pos_c if xx is x_c else den(xx, s, rows), None, x_c, t_c, cond,
                        (grid.kh, grid.kw), (len(grid.ys), len(grid.xs)), self.max_window_batch)
        guided_c = SWG(w=self.weight, masked=self.masked)(ev)
        on_c = on if whole else on.index_select(0, cond)
        if not on_c.all():
            guided_c = torch.where(on_c[:, None, None, None], guided_c, pos_c)
        if whole:
            out = guided_c
        else:
            out = pos.clone()
            out[cond] = guided_c
            if self.shift_uncond:
                out[uncond] = pos.index_select(0, uncond) + (guided_c - pos_c)
        return _pack(den.output_template, out, return_dict)


# ----------------------------------------------------------------------------
# Guider for diffusers' modular pipelines.

def _base_guidance():
    """``diffusers.guiders.BaseGuidance``, or a stand-in that refuses to build on diffusers without guiders."""
    try:
        from diffusers.guiders import BaseGuidance
    except ImportError:  # pragma: no cover - diffusers < 0.35
        class BaseGuidance:  # noqa: D401 - placeholder
            def __init__(self, *args, **kwargs):
                raise UsageError("SlidingWindowGuidance needs diffusers with guiders (>= 0.35); upgrade diffusers "
                                 "or use SlidingWindowGuided")
    return BaseGuidance


def _register_to_config(fn):
    try:
        from diffusers.configuration_utils import register_to_config
        from diffusers.guiders import BaseGuidance  # noqa: F401
    except ImportError:  # pragma: no cover - diffusers < 0.35
        return fn
    return register_to_config(fn)


class _WindowHook:
    """diffusers ``ModelHook`` that makes one denoiser call return the window prediction ``D_win``."""

    _is_stateful = False

    def __init__(self, guider: "SlidingWindowGuidance"):
        self.guider = guider
        self.fn_ref = None

    # ModelHook protocol (diffusers.hooks.hooks.ModelHook, duck-typed to keep the import lazy).
    def initialize_hook(self, module):
        return module

    def deinitalize_hook(self, module):
        return module

    def pre_forward(self, module, *args, **kwargs):
        return args, kwargs

    def post_forward(self, module, output):
        return output

    def detach_hook(self, module):
        return module

    def reset_state(self, module):
        return module

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        latent, call = _bind(forward, args, kwargs)
        x, t = call[latent], call.get("timestep")
        n = x.shape[0]
        den = DiffusersDenoiser(module, call, n, self.guider.pos_embed, forward=forward, latent_name=latent)
        grid = self.guider.grid(module, x.shape[-2], x.shape[-1])
        rows = torch.arange(n, device=x.device)
        win, _ = sliding_window_predict(den, x, t, rows, grid, self.guider.max_window_batch)
        template = den.output_template
        return _pack(template, win, call.get("return_dict", True))


class SlidingWindowGuidance(_base_guidance()):
    """CFG plus (M-)SWG as a diffusers guider (modular pipelines).

    Predictions: ``pred_cond`` (conditional), ``pred_uncond`` (unconditional, when
    CFG is on) and ``pred_cond_window`` (the conditional inputs run window by
    window and averaged where windows overlap: a hook makes that one denoiser
    call a window call).  With ``s = guidance_scale`` and ``w = swg_scale``::

        pred = pred_uncond + s (pred_cond - pred_uncond) + w m (pred_cond - pred_cond_window)

    (``use_original_formulation``: ``pred_cond + s (pred_cond - pred_uncond) + ...``),
    ``m = [count > 1]`` (M-SWG, ``masked``) or 1.  This is the toolkit's
    ``cfg-swg`` with ``w1 = s - 1``; ``s <= 1`` drops CFG, ``w = 0`` drops SWG.
    ``start``/``stop``: fractions of the denoising steps during which both act.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_window"]

    @_register_to_config
    def __init__(self, guidance_scale: float = 1.0, swg_scale: float = 0.3, window_size=None, window_steps=2,
                 masked: bool = True, pos_embed: str = "auto", max_window_batch: Optional[int] = None,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0,
                 enabled: bool = True):
        super().__init__(start, stop, enabled)
        self.guidance_scale, self.swg_scale = float(guidance_scale), float(swg_scale)
        self.window_size = tuple(window_size) if isinstance(window_size, list) else window_size
        self.window_steps = tuple(window_steps) if isinstance(window_steps, list) else window_steps
        self.masked, self.pos_embed, self.max_window_batch = bool(masked), pos_embed, max_window_batch
        self.use_original_formulation = use_original_formulation
        self._batch_names: list = []
        self._hook_name = "SlidingWindowGuidance_windows"
        self._grid: Optional[WindowGrid] = None

    # -- which predictions this step needs ---------------------------------
    def _in_range(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    def _is_cfg_enabled(self) -> bool:
        zero = 0.0 if self.use_original_formulation else 1.0
        return self._in_range() and not math.isclose(self.guidance_scale, zero)

    def _is_swg_enabled(self) -> bool:
        return self._in_range() and not math.isclose(self.swg_scale, 0.0)

    def _plan(self) -> list:
        plan = [(0, "pred_cond")]
        if self._is_cfg_enabled():
            plan.append((1, "pred_uncond"))
        if self._is_swg_enabled():
            plan.append((0, "pred_cond_window"))
        self._batch_names = [name for _, name in plan]
        return plan

    @property
    def num_conditions(self) -> int:
        return 1 + int(self._is_cfg_enabled()) + int(self._is_swg_enabled())

    @property
    def is_conditional(self) -> bool:
        names = self._batch_names or ["pred_cond"]
        current = names[min(max(self._count_prepared, 1), len(names)) - 1]
        return current != "pred_uncond"

    def prepare_inputs(self, data: dict) -> list:
        return [self._prepare_batch(data, idx, name) for idx, name in self._plan()]

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        return [self._prepare_batch_from_block_state(input_fields, data, idx, name) for idx, name in self._plan()]

    # -- the window call ---------------------------------------------------
    def grid(self, model, height: int, width: int) -> WindowGrid:
        size, steps = self.window_size, self.window_steps
        if size is None:
            size = default_windows(height, width, window_multiple(model))[0]
        grid = WindowGrid.create(height, width, size, steps)
        check_windows(model, grid)
        self._grid = grid
        return grid

    def _current(self) -> Optional[str]:
        i = self._count_prepared - 1
        return self._batch_names[i] if 0 <= i < len(self._batch_names) else None

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if self._current() == "pred_cond_window":
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(_WindowHook(self), self._hook_name)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._current() == "pred_cond_window":
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(denoiser).remove_hook(self._hook_name, recurse=False)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None,
                pred_cond_window: Optional[torch.Tensor] = None):
        from diffusers.guiders.guider_utils import GuiderOutput

        pred = pred_cond
        if pred_uncond is not None:
            base = pred_cond if self.use_original_formulation else pred_uncond
            pred = base + self.guidance_scale * (pred_cond - pred_uncond)
        if pred_cond_window is not None:
            count = self._grid.count(device=pred_cond.device, dtype=pred_cond.dtype)[None, None]
            m = (count > 1).to(count.dtype) if self.masked else torch.ones_like(count)
            pred = pred + self.swg_scale * (m * (pred_cond - pred_cond_window))
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
