"""Feature detectors: uint8 NCHW RGB batches in, named float outputs out.

Four detectors exist.  ``inception`` yields ``features`` (pool3, 2048-d) and
``probs`` (softmax of the 1008 bias-free logits, for the Inception score);
``dinov2`` yields ``features`` (CLS token, 1024-d); ``digits``, the offline
demo's small digit classifier (:mod:`metrics.digits`, weights shipped
in ``demo/models/``), yields ``features`` (128-d penultimate layer) and
``probs`` (10 classes); ``clip``, CLIP ViT-L/14's image tower (:mod:`metrics.clip`),
yields ``features`` (1024-d, as dgm-eval).  Each metric names the detector and output it needs
(see ``metrics.api.METRICS``).

Loaders live in :data:`LOADERS` so that tests (or users with local weight
files) can swap them; ``get_detector`` caches one instance per (kind, device).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict

import torch

from utils.cache import fetch
from utils.errors import UsageError

from . import clip as _clip
from . import dinov2 as _dinov2
from . import inception as _inception
from .digits import DEFAULT_CLASSIFIER, DigitsDetector

__all__ = ["full_precision", "output_dims", "Detector", "InceptionDetector", "DINOv2Detector", "CLIPDetector", "LOADERS", "get_detector", "clear_cache",
           "weights_source", "prefetch"]


@contextlib.contextmanager
def full_precision():
    """Run convolutions and matmuls in true float32 (no TF32), whatever the caller enabled.

    On an H200 cuDNN's default TF32 convolutions move Inception features by
    ~1e-4 (relative), against ~1e-7 without; the detectors are never the
    bottleneck, so accuracy wins.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class Detector:
    """Base class: ``name``, ``feature_dim`` and ``__call__(uint8 NCHW) -> dict of tensors``.

    ``output_dims`` maps each feature-like output to its width (default: ``features``).
    """

    name = "detector"
    feature_dim = 0

    @property
    def output_dims(self) -> Dict[str, int]:
        return {"features": self.feature_dim}

    def __call__(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} does not implement __call__")


def output_dims(det) -> Dict[str, int]:
    """A detector's feature-like outputs and their widths (``features`` alone for detectors without
    ``output_dims``, such as the demo's digit classifier)."""
    return getattr(det, "output_dims", None) or {"features": det.feature_dim}


class InceptionDetector(Detector):
    """FID Inception-v3: ``features`` [N, 2048], ``probs`` [N, 1008] (bias-free softmax) and
    ``spatial`` [N, 2023] (ADM's sFID tap, :meth:`metrics.inception.InceptionV3.features`)."""

    name = "inception"

    def __init__(self, model: _inception.InceptionV3):
        self.model = model
        self.feature_dim = model.fc.in_features

    @property
    def output_dims(self) -> Dict[str, int]:
        return {"features": self.feature_dim,
                "spatial": 17 * 17 * _inception.SPATIAL_CHANNELS}

    @torch.no_grad()
    def __call__(self, images):
        with full_precision():
            feats, logits, spatial = self.model(images, no_output_bias=True, spatial=True)
        return {"features": feats, "probs": torch.softmax(logits.double(), dim=1), "spatial": spatial}


class DINOv2Detector(Detector):
    """DINOv2 ViT-L/14: ``features`` [N, 1024] (CLS token after the final norm)."""

    name = "dinov2"

    def __init__(self, model: torch.nn.Module, resize_mode: str = "torch"):
        if resize_mode not in ("torch", "pil"):
            raise UsageError(f"unknown DINOv2 resize mode {resize_mode!r}; use 'torch' or 'pil'")
        self.model = model
        self.resize_mode = resize_mode
        self.feature_dim = model.embed_dim

    @torch.no_grad()
    def __call__(self, images):
        x = _dinov2.preprocess_dinov2(images, self.resize_mode)
        with full_precision():
            return {"features": self.model(x.to(next(self.model.parameters()).device))}


class CLIPDetector(Detector):
    """CLIP ViT-L/14 image tower: ``features`` [N, 1024] (class token after ``ln_post``, as dgm-eval)."""

    name = "clip"

    def __init__(self, model: torch.nn.Module, resize_mode: str = "pil"):
        if resize_mode not in ("torch", "pil"):
            raise UsageError(f"unknown CLIP resize mode {resize_mode!r}; use 'pil' or 'torch'")
        self.model = model
        self.resize_mode = resize_mode
        self.feature_dim = model.embed_dim

    @torch.no_grad()
    def __call__(self, images):
        x = _clip.preprocess_clip(images, self.resize_mode)
        with full_precision():
            return {"features": self.model(x.to(next(self.model.parameters()).device))}


def _load_inception(device, **kwargs) -> Detector:
    return InceptionDetector(_inception.load_inception(kwargs.get("weights"), device=device))


def _load_dinov2(device, **kwargs) -> Detector:
    model = _dinov2.load_dinov2(kwargs.get("weights"), device=device)
    return DINOv2Detector(model, resize_mode=kwargs.get("resize_mode", "torch"))


def _load_digits(device, **kwargs) -> Detector:
    """The demo's digit classifier; ``weights`` defaults to the shipped ``digits-classifier.safetensors``."""

    return DigitsDetector(kwargs.get("weights") or DEFAULT_CLASSIFIER, device=device)


def _load_clip(device, **kwargs) -> Detector:
    model = _clip.load_clip(kwargs.get("weights"), device=device)
    return CLIPDetector(model, resize_mode=kwargs.get("resize_mode", "pil"))


LOADERS: Dict[str, Callable[..., Detector]] = {
    "inception": _load_inception,
    "dinov2": _load_dinov2,
    "digits": _load_digits,
    "clip": _load_clip,
}

_cache: Dict[tuple, Detector] = {}


def get_detector(kind: str, device=None, **kwargs) -> Detector:
    """The detector ``kind`` ('inception' | 'dinov2' | 'digits' | 'clip') on ``device``, loaded once per process."""
    if kind not in LOADERS:
        raise UsageError(f"unknown detector {kind!r}; use one of {sorted(LOADERS)}")
    device = torch.device(device or "cpu")
    key = (kind, str(device), tuple(sorted(kwargs.items())))
    if key not in _cache:
        _cache[key] = LOADERS[kind](device, **kwargs)
    return _cache[key]


def clear_cache() -> None:
    """Forget loaded detectors (frees memory; tests use it after swapping loaders)."""
    _cache.clear()


def weights_source(kind: str):
    """Where detector ``kind``'s default weights come from: a cache source, or a shipped file."""
    if kind == "inception":
        return _inception.INCEPTION_URL
    if kind == "dinov2":
        return _dinov2.DINOV2_SOURCE
    if kind == "clip":
        return _clip.CLIP_SOURCE
    if kind == "digits":
        return DEFAULT_CLASSIFIER
    raise UsageError(f"unknown detector {kind!r}; use one of {sorted(LOADERS)}")


def prefetch(kinds) -> list:
    """Download the default weights of the detectors ``kinds`` into the cache (no network is built); return paths."""

    paths = []
    for kind in kinds:
        source = weights_source(kind)
        paths.append(source if not isinstance(source, str) else fetch(source, desc=f"{kind} detector weights"))
    return paths
