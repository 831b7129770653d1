"""One diffusers denoiser call as the ``D(x, t, rows)`` of :func:`guidance.guide`, and its windows.

Shared by the wrapper (:mod:`.wrapper`) and the guider (:mod:`.guider`): window geometry for a
diffusers model, the position table a transformer window gets, and :class:`DiffusersDenoiser`,
which carries every per-sample conditioning input of a call to the windows cut from its samples.

Position tables of transformer windows (``pos_embed=``):

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

from ..windows import WindowError, WindowGrid

__all__ = ["DiffusersDenoiser", "POS_EMBED_POLICIES", "default_windows", "window_grid", "window_multiple"]

POS_EMBED_POLICIES = ("auto", "resize", "native", "sincos")
Pair = Union[int, Sequence[int]]

# Keyword inputs that are spatial maps of the full latent: no window can carry them.
_SPATIAL_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual",
                   "down_intrablock_additional_residuals", "block_controlnet_hidden_states",
                   "controlnet_block_samples", "controlnet_single_block_samples")


# ----------------------------------------------------------------------------
# Window geometry.

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


def check_window_size(window_size: Optional[Pair]) -> None:
    """Refuse non-positive window sides when the windows are configured (before any model call)."""
    for k in (window_size if isinstance(window_size, (list, tuple)) else (window_size,)):
        if k is not None and int(k) <= 0:
            raise WindowError(f"window size must be positive, got {k}")


def window_grid(model, height: int, width: int, size: Optional[Pair], steps: Pair) -> WindowGrid:
    """The windows on an ``height x width`` latent (the paper's when ``size`` is None), checked for ``model``."""
    if size is None:
        size = default_windows(height, width, window_multiple(model))[0]
    grid = WindowGrid.create(height, width, size, steps)
    _check_windows(model, grid)
    return grid


# ----------------------------------------------------------------------------
# Position tables.

def _patch_embed(model):
    """The model's diffusers ``PatchEmbed`` (``model.pos_embed``) or None."""
    pe = getattr(model, "pos_embed", None)
    return pe if pe is not None and hasattr(pe, "proj") and hasattr(pe, "pos_embed") else None


def is_dit(model) -> bool:
    """A diffusers DiT (class-conditional, adaLN-zero): its pipeline puts the conditional half first."""
    return type(model).__name__ == "DiTTransformer2DModel" or (
        _config(model).get("norm_type") == "ada_norm_zero" and _patch_embed(model) is not None)


def check_policy_name(policy: str) -> None:
    if policy not in POS_EMBED_POLICIES:
        raise UsageError(f"unknown pos_embed policy {policy!r}; use one of {', '.join(POS_EMBED_POLICIES)}")


def resolve_policy(model, policy: str) -> str:
    """The position-table rule ``pos_embed=policy`` means for ``model`` (``"auto"`` resolved), or a UsageError."""
    check_policy_name(policy)
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
        return "resize" if is_dit(model) else "native"
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


def _check_windows(model, grid: WindowGrid) -> None:
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
    if is_dit(model) and grid.kh != grid.kw:
        raise WindowError(f"diffusers' DiT unpatchifies square grids only; use square windows, got {grid.kh}x{grid.kw}")


# ----------------------------------------------------------------------------
# Call arguments.

def bind_call(fn: Callable, args, kwargs) -> Tuple[str, dict]:
    """``(latent argument name, all call arguments by name)`` of a denoiser call."""
    sig = inspect.signature(fn)
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


def pack_output(template, sample: torch.Tensor, return_dict: bool):
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
        self.latent_name = latent_name or bind_call(forward or model.forward, (None,), {})[0]
        self.kwargs = {k: v for k, v in call_kwargs.items() if k not in ("return_dict", "timestep", self.latent_name)}
        spatial = [k for k in _SPATIAL_KWARGS if self.kwargs.get(k) is not None]
        if spatial:
            raise UsageError(f"{spatial[0]} is a spatial map of the whole latent and cannot be cut into windows; "
                             f"use SWG without ControlNet/adapters")
        self.policy = resolve_policy(model, pos_embed)
        self.output_template = None

    def __call__(self, x: torch.Tensor, t, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        kwargs = self.kwargs if rows is None else _take(self.kwargs, rows, self.batch)
        with _window_positions(self.model, x, self.policy):
            out = self.forward(**{self.latent_name: x}, timestep=t, **kwargs, return_dict=True)
        if self.output_template is None and dataclasses.is_dataclass(out):
            self.output_template = out
        return _first(out)
