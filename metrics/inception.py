"""Inception-v3 as frozen in TensorFlow's 2015-12-05 graph: the FID/IS detector.

The FID literature (and EDM2's reference statistics) use the TensorFlow graph
``2015-12-05``.  It differs from the textbook Inception-v3 in three places:

* the classifier has 1008 outputs (1000 classes plus 8 unused ones);
* the average pools inside the ``Mixed_5*``, ``Mixed_6*`` and ``Mixed_7b``
  blocks ignore padded pixels (``count_include_pad=False``);
* the pool branch of the last block (``Mixed_7c``) is a *max* pool.

Parameter names follow the public PyTorch port of that graph
(``pt_inception-2015-12-05-6726825d.pth``), so its state dict loads as is.

Preprocessing reproduces the TensorFlow graph that EDM2's detector wraps:

* uint8 RGB of any size is resized to 299x299 with TF1 bilinear sampling:
  output pixel ``j`` samples the input at ``s = j * W / 299`` (no half-pixel
  centres, no antialiasing), interpolating between ``floor(s)`` and
  ``min(floor(s) + 1, W - 1)``;
* values are mapped to [-1, 1] by ``(x - 128) / 128``.

Outputs: ``pool3`` features (2048-d, the global average of ``Mixed_7c``) and
1008 logits ``W f + b``.  The Inception score of StyleGAN3/EDM2 uses the
softmax of ``W f`` without the bias, see :meth:`InceptionV3.forward`.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.cache import fetch
from utils.errors import UsageError
from utils.safe_load import load_weights

__all__ = [
    "INCEPTION_URL",
    "INCEPTION_RESOLUTION",
    "InceptionV3",
    "tf1_resize_bilinear",
    "spatial_tap",
    "SPATIAL_CHANNELS",
    "load_inception",
    "check_name_hash",
]

INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_RESOLUTION = 299


# ----------------------------------------------------------------------------
# Building blocks.


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x):
    """3x3 stride-1 average that counts only real pixels (the TF graph's pool)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([a, b, c, d], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)


class FIDInceptionC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 1x7 / 7x1 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([a, b, c, d], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)


class _InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; ``pool`` is the pool branch's pooling."""

    def __init__(self, in_channels: int, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
        d = self.branch_pool(self.pool(x))
        return torch.cat([a, b, c, d], dim=1)


def _max_pool_same(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionE_1(_InceptionE):
    """Mixed_7b: average pool without padded pixels."""

    def __init__(self, in_channels: int):
        super().__init__(in_channels, _avg_pool_no_pad)


class FIDInceptionE_2(_InceptionE):
    """Mixed_7c: the TF graph uses a 3x3 *max* pool here."""

    def __init__(self, in_channels: int):
        super().__init__(in_channels, _max_pool_same)


# ----------------------------------------------------------------------------
# Preprocessing.


def tf1_resize_bilinear(x: torch.Tensor, size: int = INCEPTION_RESOLUTION) -> torch.Tensor:
    """Bilinear resize of NCHW float images as TF1 ``resize_bilinear`` (align_corners=False).

    Output pixel ``(i, j)`` samples the input at ``(i * H / size, j * W / size)``;
    neighbours beyond the last row/column are clamped to it.  Written with
    ``affine_grid``/``grid_sample``: ``grid_sample`` (align_corners=False,
    border padding) reads normalised coordinate ``g`` at pixel ``((g + 1) W - 1) / 2``,
    so we feed ``g = (2 s + 1) / W - 1``.
    """
    n, _, h, w = x.shape

    def coords(src_len: int) -> torch.Tensor:
        s = torch.arange(size, dtype=torch.float64) * (src_len / size)
        return ((2 * s + 1) / src_len - 1).to(torch.float32)

    gy, gx = torch.meshgrid(coords(h), coords(w), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).to(x.device).unsqueeze(0).expand(n, -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------
# The network.


class InceptionV3(nn.Module):
    """The FID Inception-v3 (2015-12-05 graph) with the public port's parameter names."""

    feature_dim = 2048
    num_logits = 1008

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.fc = nn.Linear(2048, self.num_logits)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0..255 float) NCHW RGB of any size -> 299x299 in [-1, 1]."""
        x = images.to(torch.float32)
        if x.shape[-2:] != (INCEPTION_RESOLUTION, INCEPTION_RESOLUTION):
            x = tf1_resize_bilinear(x)
        return (x - 128) / 128

    def features(self, x: torch.Tensor, spatial: bool = False):
        """Preprocessed 299x299 input -> pool3 features [N, 2048] (and the sFID tap when ``spatial``).

        The tap is the ADM evaluator's ``mixed_6/conv``: the TF graph's blocks are named
        ``mixed, mixed_1, ..., mixed_10`` for ``Mixed_5b .. Mixed_7c``, so ``mixed_6`` is
        ``Mixed_6d`` and its ``conv`` the 1x1 branch after batch norm and ReLU (17x17x192).
        ADM keeps its first 7 channels and flattens them in TF's NHWC order:
        ``[N, 17 * 17 * 7 = 2023]``, index ``(y * 17 + x) * 7 + c``.
        """
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        tap = None
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                     "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            if spatial and name == "Mixed_6d":
                tap = spatial_tap(self.Mixed_6d.branch1x1(x))
            x = getattr(self, name)(x)
        pooled = x.mean(dim=(2, 3))
        return (pooled, tap) if spatial else pooled

    def forward(self, images: torch.Tensor, no_output_bias: bool = False, spatial: bool = False):
        """uint8 NCHW images -> (pool3 features [N, 2048], logits [N, 1008][, sFID tap [N, 2023]]).

        ``no_output_bias=True`` returns ``W f`` instead of ``W f + b`` (the
        Inception-score convention of StyleGAN3/EDM2); ``spatial=True`` adds
        the sFID features (:meth:`features`).
        """
        out = self.features(self.preprocess(images), spatial=spatial)
        feats = out[0] if spatial else out
        bias = None if no_output_bias else self.fc.bias
        logits = F.linear(feats, self.fc.weight, bias)
        return (feats, logits, out[1]) if spatial else (feats, logits)


SPATIAL_CHANNELS = 7  # ADM evaluator: spatial[..., :7]


def spatial_tap(conv: torch.Tensor) -> torch.Tensor:
    """``mixed_6/conv`` activations [N, C, 17, 17] -> ADM's sFID features [N, 17 * 17 * 7] (NHWC order)."""
    return conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(conv.shape[0], -1)


_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's convention: name-<sha256 prefix>.ext


def check_name_hash(path: str | os.PathLike) -> None:
    """Refuse a file whose name carries a sha256 prefix (``...-6726825d.pth``) that its bytes do not have.

    As ``torch.hub``'s ``check_hash``: the hex digits after the last-matching
    ``-`` and before a ``.`` must start the file's sha256.  Names without such
    digits are not checked.
    """

    path = pathlib.Path(path)
    match = _HASH_IN_NAME.search(path.name)
    if not match or not match.group(1):
        return
    prefix = match.group(1)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if not actual.startswith(prefix):
        raise UsageError(f"{path} has sha256 {actual[:len(prefix)]}..., not the {prefix}... its name promises; "
                         f"the file is damaged or not these weights: delete it and fetch {INCEPTION_URL} again")


INCEPTION_WEIGHTS_ENV = "SWG_INCEPTION_WEIGHTS"  # a local weights file to use instead of the download


def load_inception(weights: Optional[str | os.PathLike] = None, device=None) -> InceptionV3:
    """Build the detector and load the port's weights: ``weights``, else the file ``$SWG_INCEPTION_WEIGHTS`` names
    (local weights, e.g. on a node without internet), else the download (fetched and cached).

    A file named with a sha256 prefix (the port's ``...-6726825d.pth``) is
    checked against it first (:func:`check_name_hash`).  The file is a plain
    state dict, read with ``torch.load(weights_only=True)``.  A state dict whose
    keys or shapes do not match raises :class:`UsageError`.
    """

    weights = weights or os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    if weights is None:

        weights = fetch(INCEPTION_URL, desc="Inception-v3 (FID) weights")

    if not os.path.isfile(weights):
        raise UsageError(f"Inception weights not found: {weights}; pass an existing file or leave the option "
                         f"out to fetch {INCEPTION_URL}")
    check_name_hash(weights)
    state = load_weights(weights, what="Inception weights", fix=f"use the file from {INCEPTION_URL}")
    model = InceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise UsageError(
            f"{weights} is not the pt_inception-2015-12-05 state dict ({first}); "
            f"use the file from {INCEPTION_URL}") from exc
    return model.eval().requires_grad_(False).to(device or "cpu")
