"""Fréchet distance between Gaussians, from eigenvalues instead of a matrix square root.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

For symmetric positive semi-definite ``S1``, ``S2`` the product ``S1 S2`` has
real eigenvalues ``lambda_i >= 0``, and

    tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i).

To get them with a symmetric solver we factor ``S1 = L L^T`` (Cholesky); then
``S1 S2 = L (L^T S2 L) L^{-1}`` is similar to the symmetric ``M = L^T S2 L``.
When ``S1`` is singular (fewer images than dimensions) Cholesky fails and we
use ``L = V diag(sqrt(max(d, 0)))`` from ``eigh(S1)`` instead (``L L^T = S1``
again).  ``eigvalsh(M)`` (LAPACK divide and conquer, no eigenvectors) in
float64 is several times cheaper than ``scipy.linalg.sqrtm``, which needs a
complex Schur decomposition.  Round-off can make tiny eigenvalues negative;
they are clipped to zero.
"""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "frechet_distance_sqrtm", "trace_sqrt_product"]


def _as_stats(mu, sigma, name):
    mu = np.asarray(mu, dtype=np.float64).reshape(-1)
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{name}: sigma has shape {sigma.shape}, expected {(mu.size, mu.size)}")
    return mu, sigma


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S1 S2)^{1/2})`` for symmetric PSD ``S1``, ``S2`` (float64)."""
    import scipy.linalg

    s1 = 0.5 * (sigma1 + sigma1.T)
    s2 = 0.5 * (sigma2 + sigma2.T)
    try:
        factor = scipy.linalg.cholesky(s1, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        d, v = scipy.linalg.eigh(s1, driver="evd", check_finite=False)
        factor = v * np.sqrt(np.clip(d, 0, None))
    m = factor.T @ s2 @ factor
    lam = scipy.linalg.eigvalsh(0.5 * (m + m.T), driver="evd", check_finite=False)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())

def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64, eigenvalue form)."""
    mu1, sigma1 = _as_stats(mu1, sigma1, "first")
    mu2, sigma2 = _as_stats(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.size} vs {mu2.size}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))  # FD >= 0; clip round-off


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2) -> float:
    """The usual ``scipy.linalg.sqrtm`` formula (as EDM2/pytorch-fid), kept as a reference."""
    import scipy.linalg

    mu1, sigma1 = _as_stats(mu1, sigma1, "first")
    mu2, sigma2 = _as_stats(mu2, sigma2, "second")
    try:
        s, _ = scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False)
    except TypeError:  # SciPy >= 1.16 dropped ``disp`` and returns the matrix alone
        s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(np.real(diff @ diff + np.trace(sigma1 + sigma2 - 2 * s)))
