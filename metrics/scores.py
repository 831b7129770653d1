"""Scores that are not Fréchet distances: Inception score, saturation, precision/recall.

Inception score (Salimans et al. 2016, as StyleGAN3/EDM2 compute it): the
``N`` class-probability rows are cut into ``splits`` consecutive parts; for
each part ``P`` with marginal ``p(y) = mean_{x in P} p(y|x)``

    IS_P = exp( mean_{x in P} KL(p(y|x) || p(y)) ),

and the score is the mean (and standard deviation) of ``IS_P`` over parts.

Saturation (as the paper's plots): images converted to HSV, the mean of
``S = (max(R,G,B) - min(R,G,B)) / max(R,G,B)`` (0 where max = 0) over pixels
and images, in [0, 1].

Precision and recall (Kynkäänniemi et al. 2019): each feature set defines a
manifold, the union of balls around its points whose radius is the distance
to the point's ``k``-th nearest neighbour in the same set (itself excluded).
Precision is the share of generated points inside the real manifold, recall
the share of real points inside the generated one (``<=``, as torch-fidelity and ADM).

KID (Bińkowski et al. 2018, as torch-fidelity): ``subsets`` times, ``m`` generated rows
``X`` and ``m`` real rows ``Y`` are drawn without replacement (numpy ``RandomState(seed)``,
generated first), and with the kernel ``k(a, b) = (a.b / d + 1)^3``

    MMD^2_u = sum_{i != j} (k(x_i, x_j) + k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2;

KID is the mean (and std) over subsets.

Density and coverage (Naeem et al. 2020, as the ``prdc`` package): with ``r_i`` the
distance of real point ``i`` to its ``k``-th nearest real neighbour,
``density = 1 / (k M) sum_j #{i : |y_j - x_i| < r_i}`` over the ``M`` generated points
``y_j`` and ``coverage = 1 / N #{i : min_j |y_j - x_i| < r_i}`` over the ``N`` real points.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["inception_score", "inception_score_from_sums", "saturation_sum", "precision_recall", "knn_radii",
           "kernel_distance", "density_coverage"]


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """Mean and std of the Inception score of ``probs`` [N, C] over ``splits`` parts."""
    p = np.asarray(probs, dtype=np.float64)
    n = p.shape[0]
    if n < splits:
        raise ValueError(f"Inception score needs at least {splits} images, got {n}")
    scores = []
    for i in range(splits):
        part = p[i * n // splits: (i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        # p log(p / q), with 0 log 0 = 0.
        ratio = np.divide(part, marginal, out=np.ones_like(part), where=part > 0)
        kl = (part * np.log(ratio)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_from_sums(count, prob_sum, plogp_sum) -> tuple[float, float]:
    """Inception score from per-split sums, as kept while streaming (no probability rows).

    For split ``P`` with ``n_P = count[P]`` images, ``s = prob_sum[P] = sum_x p(.|x)``
    and ``h = plogp_sum[P] = sum_x sum_y p log p`` (0 log 0 = 0), the marginal is
    ``q = s / n_P`` and ``mean_x KL(p(.|x) || q) = h / n_P - sum_y q_y log q_y``
    (terms with ``p = 0`` vanish on both sides), so ``IS_P`` needs only these sums.
    Returns the mean and std over splits, as :func:`inception_score`.
    """
    n = np.asarray(count, dtype=np.float64).reshape(-1)
    s = np.asarray(prob_sum, dtype=np.float64).reshape(n.size, -1)
    h = np.asarray(plogp_sum, dtype=np.float64).reshape(-1)
    if (n < 1).any():
        raise ValueError(f"every Inception-score split needs at least one image, got counts {n.tolist()}")
    q = s / n[:, None]
    qlogq = (q * np.log(np.where(q > 0, q, 1.0))).sum(axis=1)
    scores = np.exp(h / n - qlogq)
    return float(np.mean(scores)), float(np.std(scores))


def saturation_sum(images: torch.Tensor) -> float:
    """Sum over images of the mean HSV saturation of uint8 NCHW RGB ``images``."""
    x = images.to(torch.float64)
    mx = x.amax(dim=1)
    mn = x.amin(dim=1)
    s = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-12), torch.zeros_like(mx))
    return float(s.mean(dim=(1, 2)).sum())


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(feats: torch.Tensor, k: int = 3, batch: int = 1024) -> torch.Tensor:
    """Distance of each row to its ``k``-th nearest other row (float64)."""
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {n}")
    out = []
    for i in range(0, n, batch):
        d = _pairwise_dist(feats[i:i + batch], feats)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the smallest (0) is the point itself
    return torch.cat(out)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    inside = 0
    for i in range(0, points.shape[0], batch):
        d = _pairwise_dist(points[i:i + batch], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / points.shape[0]


def precision_recall(real, fake, k: int = 3, batch: int = 1024, device=None) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` features against ``real`` ones."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    precision = _coverage(fake, real, knn_radii(real, k, batch), batch)
    recall = _coverage(real, fake, knn_radii(fake, k, batch), batch)
    return precision, recall


def kernel_distance(fake, real, subsets: int = 100, subset_size: int = 1000, seed: int = 2020,
                    device=None) -> tuple[float, float]:
    """KID mean and std of ``fake`` rows against ``real`` rows (float64; see the module docstring).

    ``subset_size`` is lowered to the smaller set's size when either has fewer rows
    (torch-fidelity refuses instead).
    """
    x_all = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    y_all = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    if x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"feature dimensions differ: {x_all.shape[1]} vs {y_all.shape[1]}")
    n1, n2, d = x_all.shape[0], y_all.shape[0], x_all.shape[1]
    m = min(subset_size, n1, n2)
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows on each side, got {n1} and {n2}")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        x = x_all[torch.as_tensor(rng.choice(n1, m, replace=False), device=x_all.device)]
        y = y_all[torch.as_tensor(rng.choice(n2, m, replace=False), device=y_all.device)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        same = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(float(same - 2 * kxy.sum() / (m * m)))
    return float(np.mean(values)), float(np.std(values))


def density_coverage(real, fake, k: int = 5, batch: int = 1024, device=None) -> tuple[float, float]:
    """Density and coverage of ``fake`` rows against ``real`` rows (see the module docstring)."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    radii = knn_radii(real, k, batch)
    inside = 0
    covered = 0
    for i in range(0, real.shape[0], batch):
        d = _pairwise_dist(real[i:i + batch], fake)
        r = radii[i:i + batch, None]
        inside += int((d < r).sum())
        covered += int((d.min(dim=1).values < radii[i:i + batch]).sum())
    return inside / (k * fake.shape[0]), covered / real.shape[0]
