"""scikit-learn's handwritten digits as a tiny image dataset for the offline demo.

The 1,797 digits of ``sklearn.datasets.load_digits`` are 8x8 grey images with
integer intensities 0..16 (UCI "Optical Recognition of Handwritten Digits",
shipped inside scikit-learn, so nothing is downloaded).  Preprocessing:

1. ``v = pixel / 16`` in ``[0, 1]`` (white ink on black, as stored);
2. bilinear upsampling (``align_corners=False``) from 8x8 to ``resolution``
   (default 16x16), which turns the blocky digits into smooth strokes;
3. ``x = 2 v - 1`` in ``[-1, 1]``, one channel, the range EDM2's pixel
   encoder uses (``uint8 / 127.5 - 1``).

Long-range variant (:func:`load_quad_digits`, the ``demo-long-range`` experiment):
``2 x 2`` grids of four 16x16 digits, ``2 * 16 = 32`` pixels square, where all
four quadrants show the *same class* (four different handwritten samples of
it).  The rule couples pixels 16 or more apart, so a window smaller than the
image cannot check it on its own.

Split: a fixed, stratified hold-out (``holdout`` images per class, default 30,
chosen with ``numpy.random.default_rng(split_seed)``) is kept for the
classifier's accuracy; the diffusion models and the reference statistics use
the remaining images (``split='train'``) and never see it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NUM_CLASSES", "QUAD", "load_digits_images", "load_quad_digits", "quadrants", "to_uint8", "one_hot"]

NUM_CLASSES = 10
QUAD = 16           # side of one quadrant of a long-range image (a 16x16 digit)


def _split_indices(labels: np.ndarray, holdout: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(split_seed)
    test = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        test.extend(rng.choice(idx, size=holdout, replace=False).tolist())
    test = np.sort(np.asarray(test, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_digits_images(resolution: int = 16, split: str = "train", holdout: int = 30,
                       split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float images ``[N, 1, R, R]`` in ``[-1, 1]`` and integer labels ``[N]``.

    ``split`` is ``'train'``, ``'test'`` (the stratified hold-out) or ``'all'``.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    if split != "all":
        train, test = _split_indices(labels, holdout, split_seed)
        keep = train if split == "train" else test
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images)[:, None]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    return x, torch.from_numpy(labels)


def load_quad_digits(num: int = 16384, seed: int = 0, split: str = "train", holdout: int = 30,
                     split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` long-range images ``[num, 1, 32, 32]`` in ``[-1, 1]`` and their class ``[num]``.

    Image ``i`` has class ``c_i ~ U{0..9}`` and four digits of class ``c_i``,
    drawn independently (with replacement over the dataset) from the 16x16
    digits of ``split``, in reading order top-left, top-right, bottom-left,
    bottom-right.  Fully determined by ``seed`` (``numpy.random.default_rng``).
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    digits, labels = load_digits_images(QUAD, split=split, holdout=holdout, split_seed=split_seed)
    rng = np.random.default_rng(seed)
    classes = rng.integers(NUM_CLASSES, size=num)
    picks = np.empty((num, 4), dtype=np.int64)
    for c in range(NUM_CLASSES):
        rows = np.flatnonzero(classes == c)
        pool = np.flatnonzero(labels.numpy() == c)
        picks[rows] = pool[rng.integers(len(pool), size=(len(rows), 4))]
    q = digits[torch.from_numpy(picks)]                                      # [num, 4, 1, 16, 16]
    top = torch.cat([q[:, 0], q[:, 1]], dim=-1)
    bottom = torch.cat([q[:, 2], q[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2).contiguous(), torch.from_numpy(classes)


def quadrants(images):
    """``[N, C, 2h, 2w]`` -> ``[N, 4, C, h, w]``: the four quadrants in reading order (tensor or array)."""
    n, c, hh, ww = images.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"quadrants need an even height and width, got {hh}x{ww}")
    h, w = hh // 2, ww // 2
    x = images.reshape(n, c, 2, h, 2, w)
    x = x.permute(0, 2, 4, 1, 3, 5) if isinstance(x, torch.Tensor) else x.transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, 4, c, h, w)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` floats to uint8 pixels, as EDM2's pixel encoder decodes (``x * 127.5 + 128``)."""
    return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


def one_hot(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Integer labels to float one-hot vectors (EDM2's label format)."""
    return F.one_hot(labels.long(), num_classes).to(torch.float32)
