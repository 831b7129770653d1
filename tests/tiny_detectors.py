"""Test stand-ins for the metrics' detectors (no weights, deterministic, cheap)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from metrics.detectors import Detector


class TinyInception(Detector):
    """Inception stand-in: random projections of 4x4-pooled pixels to ``dim`` features and 1008 probabilities.

    ``sharpness`` scales the logits; ``zero_from`` makes the probabilities from that class on exactly 0
    (to exercise ``0 log 0``).
    """

    name = "inception"

    def __init__(self, dim: int, seed: int, sharpness: float = 1.0, zero_from: Optional[int] = None,
                 spatial_dim: Optional[int] = None):
        g = torch.Generator().manual_seed(seed)
        self.feature_dim = dim
        self.proj = torch.randn(48, dim, generator=g)
        self.cls = torch.randn(48, 1008, generator=g)
        self.sharpness, self.zero_from = sharpness, zero_from
        # ``spatial_dim``: also an sFID-like ``spatial`` output (random projection of 8x8-pooled pixels)
        self.spatial = None if spatial_dim is None else torch.randn(192, spatial_dim, generator=g)

    @property
    def output_dims(self):
        dims = {"features": self.feature_dim}
        if self.spatial is not None:
            dims["spatial"] = self.spatial.shape[1]
        return dims

    def __call__(self, x):
        p = F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        logits = (p @ self.cls).double() * self.sharpness
        if self.zero_from is not None:
            logits[:, self.zero_from:] = -torch.inf
        out = {"features": p @ self.proj, "probs": torch.softmax(logits, dim=1)}
        if self.spatial is not None:
            out["spatial"] = F.adaptive_avg_pool2d(x.float() / 255, 8).flatten(1) @ self.spatial
        return out
