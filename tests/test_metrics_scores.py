"""Inception score, saturation and k-NN precision/recall against analytic cases."""

import numpy as np
import pytest
import torch

from metrics.scores import inception_score, knn_radii, precision_recall, saturation_sum


def test_inception_score_one_hot_equals_number_of_classes():
    classes = 7
    labels = np.tile(np.arange(classes), 10 * 3)  # every split holds each class 3 times
    probs = np.eye(1008)[labels]
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.full((50, 1008), 1 / 1008), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_inception_score_matches_definition():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=40)
    parts = np.array_split(p, 4)  # 40 rows, 4 splits -> equal consecutive parts
    expect = [np.exp(np.mean([np.sum(r * np.log(r / q.mean(0))) for r in q])) for q in parts]
    mean, std = inception_score(p, splits=4)
    assert mean == pytest.approx(np.mean(expect), rel=1e-12)
    assert std == pytest.approx(np.std(expect), rel=1e-10)
    with pytest.raises(ValueError):
        inception_score(p[:3], splits=10)


def test_saturation_known_colours():
    def img(rgb):
        return torch.tensor(rgb, dtype=torch.uint8).reshape(1, 3, 1, 1).expand(1, 3, 4, 4)

    assert saturation_sum(img([255, 0, 0])) == pytest.approx(1.0)
    assert saturation_sum(img([90, 90, 90])) == pytest.approx(0.0)
    assert saturation_sum(img([0, 0, 0])) == pytest.approx(0.0)  # black: S defined as 0
    assert saturation_sum(img([200, 100, 100])) == pytest.approx(0.5)
    half = torch.cat([img([255, 0, 0])[..., :2], img([10, 10, 10])[..., :2]], dim=3)
    assert saturation_sum(torch.cat([half, img([0, 0, 255])])) == pytest.approx(0.5 + 1.0)


def test_knn_radii_and_precision_recall_on_a_line():
    real = np.arange(10, dtype=np.float64)[:, None]  # points 0..9, 3rd neighbour at distance 2 (inner)
    radii = knn_radii(torch.from_numpy(real), k=3).numpy()
    assert radii[0] == 3 and radii[5] == 2 and radii[9] == 3
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    far = real + 100
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # Fakes inside the real span but spread 3x wider: fakes at 0,3,...,27.
    fake = real * 3
    p, r = precision_recall(real, fake, k=3)
    # real manifold covers [-3, 12] -> fakes 0,3,6,9,12 inside (5 of 10);
    # fake radii are 6 (inner) / 9 (ends): every real point lies within -> recall 1.
    assert p == pytest.approx(0.5) and r == pytest.approx(1.0)
