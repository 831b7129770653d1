"""Fréchet distance (eigenvalue form) and streaming statistics."""

import numpy as np
import pytest
import scipy.linalg
import torch

from metrics.frechet import frechet_distance, frechet_distance_sqrtm, trace_sqrt_product
from metrics.stats import FeatureStats


def _random_spd(rng, dim, n=None):
    n = n or 3 * dim
    x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim))
    return x.mean(0), np.cov(x, rowvar=False)


def test_self_distance_is_zero_and_symmetric():
    rng = np.random.default_rng(0)
    mu1, s1 = _random_spd(rng, 40)
    mu2, s2 = _random_spd(rng, 40)
    scale = np.trace(s1)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * scale
    a = frechet_distance(mu1, s1, mu2, s2)
    b = frechet_distance(mu2, s2, mu1, s1)
    assert a > 0 and abs(a - b) < 1e-9 * a


def test_closed_form_shifted_and_diagonal_gaussians():
    rng = np.random.default_rng(1)
    dim = 16
    _, s = _random_spd(rng, dim)
    shift = rng.standard_normal(dim)
    # Same covariance, shifted mean: FD = |shift|^2.
    assert frechet_distance(np.zeros(dim), s, shift, s) == pytest.approx(shift @ shift, rel=1e-9)
    # Commuting (diagonal) covariances: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    expect = shift @ shift + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(shift, np.diag(a), np.zeros(dim), np.diag(b)) == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("n", [300, 30])  # full rank, and singular covariances (n < dim)
def test_eigen_matches_scipy_sqrtm(n):
    rng = np.random.default_rng(2)
    mu1, s1 = _random_spd(rng, 64, n)
    mu2, s2 = _random_spd(rng, 64, n)
    ref = frechet_distance_sqrtm(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    expect_tr = np.real(np.trace(scipy.linalg.sqrtm(s1 @ s2)))
    assert trace_sqrt_product(s1, s2) == pytest.approx(expect_tr, rel=1e-6)


def test_dimension_mismatch_raises():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_match_numpy_cov():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 5)) * 3 + 1
    st = FeatureStats(5, keep_rows=True)
    for i in range(0, 37, 8):  # uneven batches
        st.append(torch.from_numpy(x[i:i + 8]).float())
    mu, sigma = st.reduce().mean_cov()
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(st.features(), x.astype(np.float32).astype(np.float16))  # rows kept in float16
    assert st.num == 37 and mu.dtype == np.float64
    with pytest.raises(ValueError):
        FeatureStats(4).append(torch.zeros(2, 5))
