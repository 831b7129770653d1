"""``SlidingWindowGuidance``: CFG plus (M-)SWG as a guider of diffusers' modular pipelines."""

from __future__ import annotations

import math
from typing import Optional

import torch

from utils.errors import UsageError

from ..methods import Evaluation
from ..table import method_spec
from ..windows import WindowGrid, sliding_window_predict
from .adapter import (DiffusersDenoiser, bind_call, check_policy_name, check_window_size, pack_output,
                      window_grid)

try:  # diffusers >= 0.35 has guiders; older versions refuse to build this one
    from diffusers.configuration_utils import register_to_config
    from diffusers.guiders import BaseGuidance
    from diffusers.guiders.guider_utils import GuiderOutput
    from diffusers.hooks import HookRegistry, ModelHook
except ImportError:  # pragma: no cover - diffusers < 0.35
    class BaseGuidance:
        def __init__(self, *args, **kwargs):
            raise UsageError("SlidingWindowGuidance needs diffusers with guiders (>= 0.35); upgrade diffusers "
                             "or use SlidingWindowGuided")

    ModelHook = BaseGuidance

    def register_to_config(fn):
        return fn

__all__ = ["SlidingWindowGuidance"]


class _WindowHook(ModelHook):
    """diffusers ``ModelHook`` that makes one denoiser call return the window prediction ``D_win``."""

    def __init__(self, guider: "SlidingWindowGuidance"):
        super().__init__()
        self.guider = guider

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        latent, call = bind_call(forward, args, kwargs)
        x, t = call[latent], call.get("timestep")
        n = x.shape[0]
        den = DiffusersDenoiser(module, call, n, self.guider.pos_embed, forward=forward, latent_name=latent)
        grid = self.guider.grid(module, x.shape[-2], x.shape[-1])
        rows = torch.arange(n, device=x.device)
        win, _ = sliding_window_predict(den, x, t, rows, grid, self.guider.max_window_batch)
        return pack_output(den.output_template, win, call.get("return_dict", True))


class _Predictions(Evaluation):
    """The predictions a modular pipeline already made, as an :class:`Evaluation` for the table's methods."""

    def __init__(self, cond: torch.Tensor, uncond: Optional[torch.Tensor], window: Optional[torch.Tensor],
                 count: Optional[torch.Tensor]):
        super().__init__(None, None, cond, None, None)
        self._given = cond, uncond, window, count

    def pos(self) -> torch.Tensor:
        return self._given[0]

    def neg(self, labels: bool = True) -> torch.Tensor:
        return self._given[1]

    def windows(self, labels: bool = True):
        return self._given[2], self._given[3]


class SlidingWindowGuidance(BaseGuidance):
    """CFG plus (M-)SWG as a diffusers guider (modular pipelines).

    Predictions: ``pred_cond`` (conditional), ``pred_uncond`` (unconditional, when
    CFG is on) and ``pred_cond_window`` (the conditional inputs run window by
    window and averaged where windows overlap: a hook makes that one denoiser
    call a window call).  With ``s = guidance_scale`` and ``w = swg_scale``::

        pred = pred_uncond + s (pred_cond - pred_uncond) + w m (pred_cond - pred_cond_window)

    (``use_original_formulation``: ``pred_cond + s (pred_cond - pred_uncond) + ...``),
    ``m = [count > 1]`` (M-SWG, ``masked``) or 1.  This is the toolkit's
    ``cfg-swg`` with ``w1 = s - 1`` (``swg`` when CFG is off, ``cfg`` when SWG is);
    ``s <= 1`` drops CFG, ``w = 0`` drops SWG.  The default ``guidance_scale=1.0``
    is SWG alone; pass the scale your pipeline uses (e.g. 5.0 for SDXL) for CFG + SWG.
    ``start``/``stop``: fractions of the denoising steps during which both act.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_window"]

    @register_to_config
    def __init__(self, guidance_scale: float = 1.0, swg_scale: float = 0.3, window_size=None, window_steps=2,
                 masked: bool = True, pos_embed: str = "auto", max_window_batch: Optional[int] = None,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0,
                 enabled: bool = True):
        super().__init__(start, stop, enabled)
        check_window_size(window_size)
        check_policy_name(pos_embed)
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

    def _cfg_weight(self) -> float:
        """CFG's ``w`` in the table's ``D_pos + w (D_pos - D_uncond)``."""
        return self.guidance_scale if self.use_original_formulation else self.guidance_scale - 1.0

    def _is_cfg_enabled(self) -> bool:
        return self._in_range() and not math.isclose(self._cfg_weight(), 0.0)

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
        self._grid = window_grid(model, height, width, self.window_size, self.window_steps)
        return self._grid

    def _current(self) -> Optional[str]:
        i = self._count_prepared - 1
        return self._batch_names[i] if 0 <= i < len(self._batch_names) else None

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if self._current() == "pred_cond_window":
            HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(_WindowHook(self), self._hook_name)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._current() == "pred_cond_window":
            HookRegistry.check_if_exists_or_initialize(denoiser).remove_hook(self._hook_name, recurse=False)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None,
                pred_cond_window: Optional[torch.Tensor] = None):
        weights, count = (), None
        if pred_uncond is not None:
            weights += (self._cfg_weight(),)
        if pred_cond_window is not None:
            weights += (self.swg_scale,)
            count = self._grid.count(device=pred_cond.device, dtype=pred_cond.dtype)[None, None]
        method = {(False, False): "none", (True, False): "cfg", (False, True): "swg", (True, True): "cfg-swg"}[
            (pred_uncond is not None, pred_cond_window is not None)]
        guider = method_spec(method).make(weights, masked=self.masked)
        pred = guider(_Predictions(pred_cond, pred_uncond, pred_cond_window, count))
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
