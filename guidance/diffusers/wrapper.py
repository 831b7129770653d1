"""``pipe.unet = SlidingWindowGuided(pipe.unet, weight=...)``: SWG / M-SWG inside a classic diffusers pipeline."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional, Tuple

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

from utils.errors import UsageError

from ..methods import Evaluation
from ..table import method_spec
from ..windows import WindowGrid
from .adapter import (DiffusersDenoiser, Pair, bind_call, check_window_size, is_dit, pack_output, resolve_policy,
                      window_grid)

__all__ = ["SlidingWindowGuided", "SWGSettings"]

# How many frames above the wrapper's forward / save_pretrained the calling pipeline may sit (nn.Module's call
# machinery, accelerate / diffusers offload hooks, torch.no_grad wrappers).
_PIPELINE_FRAMES = 16


@dataclasses.dataclass
class SWGSettings:
    """What :class:`SlidingWindowGuided` does; ``pipe.unet.swg`` (change ``weight`` etc. between calls).

    ``cfg_batch``: None = ask the calling pipeline whether the batch is its CFG batch (see the wrapper);
    True / False = always / never.  ``cond_half``: which half of a CFG batch is conditional
    (``"auto"``: first for DiT, whose pipeline batches ``[cond; uncond]``, else last).
    """

    weight: float = 0.0
    window_size: Optional[Pair] = None
    window_steps: Pair = 2
    masked: bool = True
    interval: Optional[Tuple[float, float]] = None
    pos_embed: str = "auto"
    cond_half: str = "auto"
    cfg_batch: Optional[bool] = None
    shift_uncond: bool = True
    max_window_batch: Optional[int] = None

    def check(self, model) -> None:
        """Refuse settings that cannot work on ``model``, with one line naming the fix."""
        if self.cond_half not in ("auto", "first", "last"):
            raise UsageError(f"cond_half must be 'auto', 'first' or 'last', got {self.cond_half!r}")
        if self.interval is not None and (len(self.interval) != 2 or self.interval[0] > self.interval[1]):
            raise UsageError(f"interval must be (lo, hi) timesteps with lo <= hi, got {self.interval!r}")
        check_window_size(self.window_size)
        resolve_policy(model, self.pos_embed)


def _in_interval(t, interval, batch: int, device) -> torch.Tensor:
    """Per-sample boolean: is the timestep inside the inclusive ``interval``?"""
    if interval is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    lo, hi = interval
    s = torch.as_tensor(t, device=device, dtype=torch.float64).reshape(-1).expand(batch)
    return (s >= lo) & (s <= hi)


def _subset_t(t, rows: torch.Tensor, batch: int):
    return t.index_select(0, rows.to(t.device)) if torch.is_tensor(t) and t.ndim == 1 and t.shape[0] == batch else t


def _calling_pipeline(frame) -> Tuple[Optional[DiffusionPipeline], dict]:
    """The nearest diffusers pipeline up the call stack from ``frame``, and the locals of its method."""
    for _ in range(_PIPELINE_FRAMES):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, DiffusionPipeline):
            return owner, frame.f_locals
        frame = frame.f_back
    return None, {}


_SETTINGS = frozenset(field.name for field in dataclasses.fields(SWGSettings))

# Names diffusers' ModelMixin defines (methods, properties, class facts such as `_no_split_modules`): on the
# wrapper they read the wrapped model's, so the wrapper's ModelMixin base shadows nothing of the model.
_OWN = {"save_pretrained", "to", "cuda", "half", "float"}
_MODEL_API = frozenset(name for cls in ModelMixin.__mro__ if cls not in torch.nn.Module.__mro__
                       for name in vars(cls) if not name.startswith("__") and name not in _OWN)


class SlidingWindowGuided(ModelMixin):
    """A diffusers denoiser with SWG / M-SWG on the conditional half of the batch.

    ``pipe.unet = SlidingWindowGuided(pipe.unet, weight=0.3)`` (or ``pipe.transformer = ...``).
    For a call on latents ``x`` with timestep ``t`` it returns, per conditional sample::

        out_c = pos_c + w m (pos_c - win_c)                    (the table's ``swg``; m = [count > 1] if masked)

    where ``pos`` is the model's output on the whole batch (one call, exactly as
    without the wrapper) and ``win_c`` averages the model run on each window of
    the conditional sample on its own, with that sample's conditioning.

    A batch is the pipeline's classifier-free batch when the pipeline calling the
    model feeds it twice the rows of its ``latents`` (``[uncond; cond]`` for
    SD/SDXL/PixArt/SD3, ``[cond; uncond]`` for DiTPipeline); a call from no pipeline
    is no CFG batch; ``cfg_batch=True/False`` overrides both.  The unconditional half
    is not windowed: it keeps the model output ``pos_u`` and, with ``shift_uncond=True``
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
    transformer windows (:mod:`guidance.diffusers.adapter`).

    Every attribute of the wrapped model shows through unchanged (``config``,
    ``pos_embed``, ``add_embedding``, its methods, ``dtype``, ``device``), and setting
    one sets the model's; the wrapper adds ``.model`` (the model itself) and ``.swg``
    (:class:`SWGSettings`).  ``to``, ``half``, ``eval`` ... act on both and return the wrapper.
    ``save_pretrained`` saves the wrapped model, and a pipeline saved with the wrapper
    in place records the wrapped model's class, so the folder reloads without this toolkit.
    """

    def __init__(self, model: torch.nn.Module, weight: float = 0.0, window_size: Optional[Pair] = None,
                 window_steps: Pair = 2, masked: bool = True, interval: Optional[Tuple[float, float]] = None,
                 pos_embed: str = "auto", cond_half: str = "auto", cfg_batch: Optional[bool] = None,
                 shift_uncond: bool = True, max_window_batch: Optional[int] = None):
        super().__init__()
        if isinstance(model, SlidingWindowGuided):
            raise UsageError("the model is already wrapped; wrap pipe.unet.model or change pipe.unet.swg instead")
        settings = SWGSettings(float(weight), window_size, window_steps, bool(masked), interval, pos_embed,
                               cond_half, cfg_batch, bool(shift_uncond), max_window_batch)
        settings.check(model)
        self.model = model
        self.swg = settings

    # -- looking like the wrapped model ------------------------------------
    def __getattribute__(self, name: str):
        if name in _MODEL_API:
            return getattr(object.__getattribute__(self, "_modules")["model"], name)
        return super().__getattribute__(name)

    def __getattr__(self, name: str):
        modules = self.__dict__.get("_modules", {})
        if name in modules:
            return modules[name]
        if "model" not in modules:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(modules["model"], name)

    def __setattr__(self, name: str, value) -> None:
        """Attributes of the model are set on the model; an SWG setting set here would be silently ignored."""
        model = self.__dict__.get("_modules", {}).get("model")
        if model is not None and name not in self.__dict__ and name not in ("model", "swg"):
            if hasattr(model, name):
                return setattr(model, name, value)
            if name in _SETTINGS:
                raise UsageError(f"`{name}` is an SWG setting: set .swg.{name} (e.g. pipe.unet.swg.{name} = ...)")
        super().__setattr__(name, value)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the wrapped model; inside ``pipe.save_pretrained`` also record its class in ``model_index.json``."""
        self.model.save_pretrained(save_directory, *args, **kwargs)
        pipe, local = _calling_pipeline(inspect.currentframe().f_back)
        name = local.get("pipeline_component_name")
        if pipe is not None and name is not None and getattr(pipe, name, None) is self:
            pipe.register_to_config(**{name: _fetch_class_library_tuple(self.model)})

    # The pipeline passes only the options this signature names: name the wrapped class's.
    save_pretrained.__signature__ = inspect.signature(ModelMixin.save_pretrained)

    # -- the guided call ----------------------------------------------------
    def _cfg_rows(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(conditional rows, unconditional rows or None)`` of the batch ``x``."""
        n = x.shape[0]
        doubled = self.swg.cfg_batch
        if doubled is None:
            pipe, local = _calling_pipeline(inspect.currentframe())
            latents = local.get("latents")
            if pipe is not None and not torch.is_tensor(latents):
                raise UsageError(f"cannot tell whether {type(pipe).__name__} batches CFG (no `latents` in its "
                                 f"loop); set cfg_batch=True or False on the wrapper")
            doubled = pipe is not None and n == 2 * latents.shape[0]
        rows = torch.arange(n, device=x.device)
        if not doubled:
            return rows, None
        if n % 2:
            raise UsageError(f"cfg_batch=True needs an even batch, got {n}")
        cond_first = is_dit(self.model) if self.swg.cond_half == "auto" else self.swg.cond_half == "first"
        first, last = rows[: n // 2], rows[n // 2:]
        return (first, last) if cond_first else (last, first)

    def forward(self, *args, **kwargs):
        swg = self.swg
        latent, call = bind_call(self.model.forward, args, kwargs)
        x, t = call.get(latent), call.get("timestep")
        n = x.shape[0]
        on = _in_interval(t, swg.interval, n, x.device)
        if swg.weight == 0 or not on.any():
            return self.model(*args, **kwargs)

        grid = window_grid(self.model, x.shape[-2], x.shape[-1], swg.window_size, swg.window_steps)
        cond, uncond = self._cfg_rows(x)  # bad windows and batches fail before any model call
        den = DiffusersDenoiser(self.model, call, n, swg.pos_embed, latent_name=latent)
        pos = den(x, t)  # the unwrapped call: whole batch, inputs untouched
        whole = uncond is None
        x_c = x if whole else x.index_select(0, cond)
        t_c = t if whole else _subset_t(t, cond, n)
        pos_c = pos if whole else pos.index_select(0, cond)
        guided_c = self._guide(den, grid, x_c, t_c, cond, pos_c)
        on_c = on if whole else on.index_select(0, cond)
        if not on_c.all():
            guided_c = torch.where(on_c[:, None, None, None], guided_c, pos_c)
        if whole:
            out = guided_c
        else:
            out = pos.clone()
            out[cond] = guided_c
            if swg.shift_uncond:
                out[uncond] = pos.index_select(0, uncond) + (guided_c - pos_c)
        return pack_output(den.output_template, out, call.get("return_dict", True))

    def _guide(self, den: DiffusersDenoiser, grid: WindowGrid, x_c, t_c, rows, pos_c) -> torch.Tensor:
        """The table's ``swg`` on the conditional rows, with their full-size prediction ``pos_c`` already known."""
        guider = method_spec("swg").make((self.swg.weight,), masked=self.swg.masked)
        ev = Evaluation(lambda xx, s, r: pos_c if xx is x_c else den(xx, s, r), None, x_c, t_c, rows,
                        (grid.kh, grid.kw), (len(grid.ys), len(grid.xs)), self.swg.max_window_batch)
        return guider(ev)
