"""Streaming feature statistics in float64, summed across torchrun ranks.

For features ``f_1..f_N`` we keep ``N``, ``s = sum f_i`` and ``S = sum f_i f_i^T``;
then

    mu    = s / N
    sigma = (S - N mu mu^T) / (N - 1)

which is the unbiased covariance (``np.cov`` with ``rowvar=False``), as EDM2's
reference statistics.  Summing ``N``, ``s`` and ``S`` over ranks before the
division gives exactly the single-process result.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from utils import dist

__all__ = ["FeatureStats"]


class FeatureStats:
    """Accumulates mean/covariance of ``dim``-d features; optionally keeps the rows, rounded to float16.

    The rows feed the metrics that need every image (precision/recall, KID, density/coverage);
    float16 halves their memory and is what the streaming state stores, so both paths see the
    same rows (the float64 sums are taken before rounding).
    """

    def __init__(self, dim: int, keep_rows: bool = False, device=None):
        self.dim = int(dim)
        self.keep_rows = keep_rows
        self.device = torch.device(device or "cpu")
        self.num = 0
        self.sum = torch.zeros([self.dim], dtype=torch.float64, device=self.device)
        self.sum_outer = torch.zeros([self.dim, self.dim], dtype=torch.float64, device=self.device)
        self.rows: list[torch.Tensor] = []
        self._reduced = False

    def append(self, feats: torch.Tensor) -> None:
        """Add a batch ``[n, dim]``."""
        if self._reduced:
            raise RuntimeError("FeatureStats already reduced; create a new one")
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features of shape [n, {self.dim}], got {tuple(feats.shape)}")
        x = feats.detach().to(self.device, torch.float64)
        self.num += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        if self.keep_rows:
            self.rows.append(feats.detach().to(torch.float16).cpu())

    def reduce(self) -> "FeatureStats":
        """Sum the accumulators over ranks (call once, on every rank, after the last batch)."""
        if not self._reduced:
            self.num = int(dist.all_reduce_sum(torch.tensor([self.num], dtype=torch.int64, device=self.device)).item())
            self.sum = dist.all_reduce_sum(self.sum)
            self.sum_outer = dist.all_reduce_sum(self.sum_outer)
            if self.keep_rows:
                local = torch.cat(self.rows) if self.rows else torch.zeros([0, self.dim], dtype=torch.float16)
                self.rows = [dist.gather_rows(local)]
            self._reduced = True
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` as float64 numpy arrays."""
        if self.num < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {self.num}")
        mu = self.sum / self.num
        sigma = (self.sum_outer - self.num * torch.outer(mu, mu)) / (self.num - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def features(self) -> Optional[np.ndarray]:
        """All kept rows ``[N, dim]`` (float16, as the streaming state keeps them) or None when ``keep_rows`` is off."""
        if not self.keep_rows:
            return None
        rows = torch.cat(self.rows) if self.rows else torch.zeros([0, self.dim], dtype=torch.float16)
        return rows.numpy()
