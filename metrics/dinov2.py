"""DINOv2 ViT-L/14 for FD-DINOv2, built with timm and matched to the official model.

EDM2 reports FD-DINOv2 with ``torch.hub``'s ``dinov2_vitl14``.  timm's
``vit_large_patch14_dinov2.lvd142m`` holds the same weights under the same
parameter names (the official file adds an unused ``mask_token``), so we build
the network with timm and load the weights ourselves.

The one behavioural difference is the position table.  Both store it for a
37x37 patch grid (518 px).  For a 224 px input (16x16 patches) the official
model resizes it at run time with

    interpolate(table, scale_factor=((16 + 0.1) / 37,) * 2, mode="bicubic", antialias=False)

(the ``+0.1`` offset guards against rounding the output size down), whereas
timm resizes to ``size=(16, 16)`` with antialiasing.  The two give different
source coordinates: with a scale factor ``r`` PyTorch samples the input at
``(d + 0.5) / r - 0.5`` for output index ``d``.  Our detector always sees
224 px, so we apply the official resize once when the weights are loaded
(:func:`resize_pos_embed_official`) and give the timm model a fixed 16x16 table.

Preprocessing (EDM2): uint8 -> float, bicubic antialiased resize to 224
(``resize_mode="torch"``) or PIL's bicubic resize of the uint8 image
(``resize_mode="pil"``, slower, as the dgm-eval code), ``/255``, then ImageNet
mean/std.  The output is the CLS token after the final LayerNorm (1024-d).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from utils.cache import fetch
from utils.errors import UsageError
from utils.safe_load import load_weights

__all__ = [
    "DINOV2_SOURCE",
    "DINOV2_RESOLUTION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_dinov2",
    "resize_pos_embed_official",
    "convert_state_dict",
    "load_dinov2",
    "preprocess_dinov2",
]

DINOV2_SOURCE = "hf://timm/vit_large_patch14_dinov2.lvd142m/model.safetensors"
DINOV2_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATE_OFFSET = 0.1


def build_dinov2(**overrides) -> torch.nn.Module:
    """timm's ``vit_large_patch14_dinov2`` for 224 px input, random weights, no head.

    ``overrides`` (e.g. ``embed_dim=32, depth=2, num_heads=2``) go to timm's
    constructor; tests use them for tiny models through the same code path.
    """
    import timm

    kwargs = dict(pretrained=False, img_size=DINOV2_RESOLUTION, num_classes=0)
    kwargs.update(overrides)
    return timm.create_model("vit_large_patch14_dinov2.lvd142m", **kwargs)


def resize_pos_embed_official(pos_embed: torch.Tensor, grid: int,
                              offset: float = INTERPOLATE_OFFSET) -> torch.Tensor:
    """Resize a ``[1, 1 + M*M, C]`` table to ``[1, 1 + grid*grid, C]`` as the official DINOv2.

    Bicubic (a = -0.75), ``scale_factor = (grid + offset) / M``, no antialias,
    computed in float32; the class-token entry is kept as is.
    """
    n = pos_embed.shape[1] - 1
    m = int(round(n ** 0.5))
    if m * m != n:
        raise ValueError(f"position table has {n} patch entries, not a square grid")
    if m == grid:
        return pos_embed.clone()
    dtype = pos_embed.dtype
    table = pos_embed.float()
    cls, patches = table[:, :1], table[:, 1:]
    dim = table.shape[-1]
    scale = (grid + offset) / m
    patches = patches.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if patches.shape[-2:] != (grid, grid):
        raise ValueError(f"resize produced {tuple(patches.shape[-2:])}, expected {(grid, grid)}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([cls, patches], dim=1).to(dtype)


def convert_state_dict(state: Mapping[str, torch.Tensor], grid: int) -> dict:
    """Official or timm DINOv2 weights -> a state dict for :func:`build_dinov2` at ``grid`` patches.

    Drops ``mask_token`` (official file only) and resizes ``pos_embed`` with the
    official run-time formula.
    """
    out = {k: v for k, v in state.items() if k != "mask_token"}
    if "pos_embed" in out:
        out["pos_embed"] = resize_pos_embed_official(out["pos_embed"], grid)
    return out


def _read_weights(path) -> dict:
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)

    return load_weights(path, what="DINOv2 weights", fix="pass the ViT-L/14 weights as .safetensors or .pth")


def load_dinov2(weights: Optional[str | os.PathLike] = None, device=None, **overrides) -> torch.nn.Module:
    """DINOv2 ViT-L/14 with pretrained weights (fetched from the Hub into the cache when None).

    ``weights`` may be timm's ``model.safetensors`` or the official ``.pth`` state dict.
    """

    if weights is None:

        weights = fetch(DINOV2_SOURCE, desc="DINOv2 ViT-L/14 weights")
    try:
        state = _read_weights(weights)
    except Exception as exc:
        raise UsageError(f"cannot read DINOv2 weights {weights}: {exc}; delete the file and fetch it again") from exc
    model = build_dinov2(**overrides)
    grid = DINOV2_RESOLUTION // model.patch_embed.patch_size[0]
    try:
        model.load_state_dict(convert_state_dict(state, grid), strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise UsageError(f"{weights} does not hold DINOv2 ViT-L/14 weights ({first}); "
                         f"use {DINOV2_SOURCE}") from exc
    return model.eval().requires_grad_(False).to(device or "cpu")


def preprocess_dinov2(images: torch.Tensor, resize_mode: str = "torch") -> torch.Tensor:
    """uint8 NCHW RGB -> normalised float 224x224 input (EDM2's recipe)."""
    if resize_mode == "pil":
        import PIL.Image

        arr = images.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        arr = np.stack([
            np.asarray(PIL.Image.fromarray(a, "RGB").resize(
                (DINOV2_RESOLUTION, DINOV2_RESOLUTION), PIL.Image.Resampling.BICUBIC))
            for a in arr])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(images.device).to(torch.float32)
    elif resize_mode == "torch":
        x = F.interpolate(images.to(torch.float32), size=(DINOV2_RESOLUTION, DINOV2_RESOLUTION),
                          mode="bicubic", antialias=True)
    else:
        raise ValueError(f"unknown DINOv2 resize mode {resize_mode!r}; use 'torch' or 'pil'")
    x = x / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std
