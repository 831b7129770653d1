"""SWG and M-SWG for diffusers models: a drop-in wrapper, a guider, and the adapter under both.

Three ways in, one window computation (:func:`guidance.windows.sliding_window_predict`):

- :class:`SlidingWindowGuided` (:mod:`.wrapper`) replaces ``pipe.unet`` / ``pipe.transformer``
  of a classic pipeline: SWG on the conditional half of the batch, so the pipeline's own CFG
  yields this toolkit's ``cfg-swg`` (and plain SWG when CFG is off).
- :class:`SlidingWindowGuidance` (:mod:`.guider`) is a guider for diffusers' modular pipelines
  (``diffusers.guiders.BaseGuidance``).
- :class:`DiffusersDenoiser` (:mod:`.adapter`) turns one call of a diffusers denoiser
  (``UNet2DConditionModel``, ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
  ``SD3Transformer2DModel``, ...) into the ``D(x, t, rows)`` callable of :func:`guidance.guide`:
  ``rows`` are batch indices, repeated once per window by the window code, and every per-sample
  conditioning input of the call (text embeddings, SDXL ``added_cond_kwargs``, class labels,
  attention masks, pooled projections) is indexed with them, so each window carries its own
  sample's conditioning.

Windows are in latent pixels.  Guidance combines the model's own output (epsilon, v or flow
velocity).  For a fixed ``(x, t)`` each of these maps to the denoised estimate by an affine map
``x0 = a(t) x + b(t) out`` that acts pixel by pixel, and the window average and the mask are
linear and reproduce ``a x``, so ``x0(pos + w m (pos - win)) = x0_pos + w m (x0_pos - x0_win)``:
guiding the output is guiding the denoised estimate (tests/test_diffusers_guidance.py checks it
for all three parameterisations).  The guide: docs/diffusers.md.
"""

from .adapter import POS_EMBED_POLICIES, DiffusersDenoiser, default_windows, window_multiple
from .guider import SlidingWindowGuidance
from .wrapper import SlidingWindowGuided, SWGSettings

__all__ = ["DiffusersDenoiser", "SlidingWindowGuided", "SWGSettings", "SlidingWindowGuidance", "default_windows",
           "window_multiple", "POS_EMBED_POLICIES"]
