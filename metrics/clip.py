"""CLIP ViT-L/14 image tower for FD-CLIP, as dgm-eval (Stein et al. 2023) computes it.

The network is OpenAI CLIP's vision transformer (Radford et al. 2021) at ViT-L/14: 224 px
input cut into 16x16 patches of 14 px by a bias-free convolution to width 1024, a class token
and a learned position table (257 x 1024) added, ``ln_pre``, 24 pre-norm residual blocks
(``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``; 16 heads; MLP 1024 -> 4096 -> 1024), then
``ln_post``.  Parameter names follow open_clip's ``visual.*`` state dicts, so its files load
as they are (the text tower and ``logit_scale`` are ignored).

The feature is the class token after ``ln_post`` (1024-d), without the 768-d projection: what
dgm-eval's CLIP encoder returns (``depth=0``).  dgm-eval loads open_clip's ``ViT-L-14`` with the
``datacomp_xl_s13b_b90k`` weights (GELU), which is the default here (:data:`CLIP_SOURCE`);
OpenAI's own weights use ``x * sigmoid(1.702 x)`` instead of GELU (``quick_gelu=True``).

Preprocessing (dgm-eval's transform): the shorter side resized to 224 with PIL's bicubic filter
(``resize_mode='pil'``, the default; ``'torch'`` uses torch's antialiased bicubic, faster), the
centre 224x224 crop, ``/255``, then CLIP's mean and std per channel.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.cache import fetch
from utils.errors import UsageError
from utils.safe_load import load_weights

__all__ = ["CLIP_SOURCE", "CLIP_RESOLUTION", "CLIP_MEAN", "CLIP_STD", "CLIPVisionTower", "load_clip",
           "preprocess_clip"]

CLIP_SOURCE = "hf://laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K/open_clip_pytorch_model.bin"
CLIP_RESOLUTION = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: ``x * sigmoid(1.702 x)``."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualBlock(width, heads, quick_gelu) for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class CLIPVisionTower(nn.Module):
    """CLIP's vision transformer; ``forward`` gives the class token after ``ln_post`` ([N, width])."""

    def __init__(self, width: int = 1024, layers: int = 24, heads: int = 16, patch: int = 14,
                 image_size: int = CLIP_RESOLUTION, output_dim: int = 768, quick_gelu: bool = False):
        super().__init__()
        grid = image_size // patch
        self.width = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))  # loaded, unused: dgm-eval's feature is before it

    @property
    def embed_dim(self) -> int:
        return self.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed [N, 3, 224, 224] -> class token after ``ln_post`` [N, width]."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, grid^2, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0])


def visual_state_dict(state) -> dict:
    """The image tower's entries of an open_clip (or OpenAI) state dict, without the ``visual.`` prefix."""
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return dict(state)


def load_clip(weights: Optional[str | os.PathLike] = None, device=None, quick_gelu: bool = False) -> CLIPVisionTower:
    """The ViT-L/14 image tower with pretrained weights (fetched into the cache when ``weights`` is None).

    ``weights``: an open_clip state dict (``open_clip_pytorch_model.bin``, read with
    ``torch.load(weights_only=True)``, or ``.safetensors``).  Keys or shapes that do not
    match raise :class:`UsageError`, as for the other detectors.
    """

    if weights is None:

        weights = fetch(CLIP_SOURCE, desc="CLIP ViT-L/14 weights")
    if not os.path.isfile(weights):
        raise UsageError(f"CLIP weights not found: {weights}; pass an existing file or leave the option out to "
                         f"fetch {CLIP_SOURCE}")
    if str(weights).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights))
        except Exception as exc:
            raise UsageError(f"cannot read CLIP weights {weights}: {exc}; delete the file and fetch it again") from exc
    else:
        state = load_weights(weights, what="CLIP weights", fix=f"use the file from {CLIP_SOURCE}")
    with torch.device("meta"):
        model = CLIPVisionTower(quick_gelu=quick_gelu)
    try:
        model.load_state_dict(visual_state_dict(state), strict=True, assign=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise UsageError(f"{weights} does not hold CLIP ViT-L/14 image-tower weights ({first}); "
                         f"use {CLIP_SOURCE}") from exc
    return model.float().eval().requires_grad_(False).to(device or "cpu")


def _resize_shorter(size: tuple, target: int) -> tuple:
    """(h, w) with the shorter side ``target`` (torchvision's rule: the longer one ``int(target * long / short)``)."""
    h, w = size
    if h <= w:
        return target, int(target * w / h)
    return int(target * h / w), target


def preprocess_clip(images: torch.Tensor, resize_mode: str = "pil") -> torch.Tensor:
    """uint8 NCHW RGB -> CLIP input [N, 3, 224, 224] (dgm-eval's transform, see the module docstring)."""
    h, w = _resize_shorter(tuple(images.shape[-2:]), CLIP_RESOLUTION)
    if resize_mode == "pil":
        import PIL.Image

        arr = images.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        arr = np.stack([np.asarray(PIL.Image.fromarray(a, "RGB").resize((w, h), PIL.Image.Resampling.BICUBIC))
                        for a in arr])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(images.device).to(torch.float32)
    elif resize_mode == "torch":
        x = F.interpolate(images.to(torch.float32), size=(h, w), mode="bicubic", antialias=True)
    else:
        raise ValueError(f"unknown CLIP resize mode {resize_mode!r}; use 'pil' or 'torch'")
    top, left = int(round((h - CLIP_RESOLUTION) / 2.0)), int(round((w - CLIP_RESOLUTION) / 2.0))
    x = x[:, :, top:top + CLIP_RESOLUTION, left:left + CLIP_RESOLUTION] / 255
    mean = torch.tensor(CLIP_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std
