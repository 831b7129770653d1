"""Conversion between uint8 pixels and the representation an EDM2 model works in.

* :class:`PixelEncoder` (EDM2's ``StandardRGBEncoder``): ``x = p / 127.5 - 1`` and
  back ``p = clip(127.5 x + 128, 0, 255)``.
* :class:`StabilityVAEEncoder`: the Stable Diffusion VAE
  (``stabilityai/sd-vae-ft-mse``, diffusers ``AutoencoderKL``) followed by EDM2's
  per-channel whitening.  EDM2 feeds the VAE pixels in ``[0, 1]`` and reads
  ``[0, 1]`` back.  The raw latent ``z`` (a sample of the VAE posterior) becomes
  ``x = scale * z + bias`` with ``scale = final_std / raw_std`` and
  ``bias = final_mean - raw_mean * scale``, so channels of mean ``raw_mean`` and
  standard deviation ``raw_std`` end up with mean ``final_mean = 0`` and standard
  deviation ``final_std = 0.5``.  Decoding inverts the affine map and runs the VAE
  decoder in chunks of ``batch_size`` images.

Both are plain Python objects (not ``torch.nn.Module``) with ``init(device)``,
``encode(pixels)`` and ``decode(x)`` like the official classes.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Optional, Sequence

import numpy as np
import torch

from utils.cache import hf_snapshot

__all__ = ["PixelEncoder", "StabilityVAEEncoder", "load_vae", "EDM2_RAW_MEAN", "EDM2_RAW_STD",
           "encoder_from_config"]

# EDM2's assumed statistics of the sd-vae-ft-mse raw latents (training/encoders.py).
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)


class PixelEncoder:
    """uint8 pixels <-> ``[-1, 1]`` floats (EDM2 ``StandardRGBEncoder``)."""

    class_name = "StandardRGBEncoder"
    spatial_factor = 1

    def init(self, device) -> None:
        pass

    def out_channels(self, img_channels: int) -> int:
        return img_channels

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

    def config(self) -> dict:
        return {"class_name": self.class_name}


def load_vae(vae_name: str, device=torch.device("cpu")):
    """A diffusers ``AutoencoderKL`` from a local folder or a Hub id (through :func:`utils.cache.hf_snapshot`)."""
    from diffusers import AutoencoderKL


    path = pathlib.Path(os.path.expanduser(vae_name))
    folder = path if path.is_dir() else hf_snapshot(vae_name)
    # Without accelerate, diffusers falls back to a random init + copy and prints an install hint on
    # every run; ask for the plain path explicitly then (the VAE is small), the fast one when it is there.
    fast = importlib.util.find_spec("accelerate") is not None
    vae = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=fast)
    return vae.eval().requires_grad_(False).to(device)


class StabilityVAEEncoder:
    """Stable Diffusion VAE with EDM2's latent whitening (see the module docstring for the equations)."""

    class_name = "StabilityVAEEncoder"
    spatial_factor = 8

    def __init__(self,
        vae_name:   str = "stabilityai/sd-vae-ft-mse",  # Hub id or local diffusers folder.
        raw_mean:   Sequence[float] = EDM2_RAW_MEAN,    # Assumed mean of the raw latents.
        raw_std:    Sequence[float] = EDM2_RAW_STD,     # Assumed standard deviation of the raw latents.
        final_mean: float = 0,                          # Mean of the final latents.
        final_std:  float = 0.5,                        # Standard deviation of the final latents.
        batch_size: int = 8,                            # Images per VAE call.
        scale:      Optional[Sequence[float]] = None,   # Explicit scale (overrides raw/final statistics).
        bias:       Optional[Sequence[float]] = None,   # Explicit bias (with ``scale``).
        vae=None,                                       # A ready AutoencoderKL (tests); else loaded lazily.
    ):
        self.vae_name = str(vae_name)
        if (scale is None) != (bias is None):
            raise ValueError("give both scale and bias, or neither")
        if scale is None:
            scale = np.float32(final_std) / np.float32(raw_std)
            bias = np.float32(final_mean) - np.float32(raw_mean) * scale
        self.scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        self.bias = np.asarray(bias, dtype=np.float32).reshape(-1)
        if self.scale.shape != self.bias.shape:
            raise ValueError("scale and bias need one value per latent channel")
        self.batch_size = int(batch_size)
        self._vae = vae
        if vae is not None:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            self.spatial_factor = factor

    @property
    def vae(self):
        """The diffusers ``AutoencoderKL`` (None until :meth:`init`)."""
        return self._vae

    def init(self, device) -> None:
        if self._vae is None:
            self._vae = load_vae(self.vae_name, device)
        else:
            self._vae.to(device)

    def out_channels(self, img_channels: int = 3) -> int:
        return int(self.scale.shape[0])

    def _affine(self, x: torch.Tensor):
        scale = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        bias = torch.as_tensor(self.bias, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        return scale, bias

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """uint8 NCHW pixels -> final latents ``scale * (mean + std * eps) + bias``."""
        self.init(pixels.device)
        x = pixels.to(torch.float32) / 255
        out = []
        for chunk in x.split(self.batch_size):
            dist = self._vae.encode(chunk).latent_dist
            eps = torch.randn(dist.mean.shape, generator=generator, device=chunk.device)
            out.append(dist.mean + dist.std * eps)
        z = torch.cat(out)
        scale, bias = self._affine(z)
        return z * scale + bias

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents -> uint8 NCHW pixels, decoded ``batch_size`` images at a time."""
        self.init(x.device)
        x = x.to(torch.float32)
        scale, bias = self._affine(x)
        z = (x - bias) / scale
        pixels = torch.cat([self._vae.decode(chunk).sample for chunk in z.split(self.batch_size)])
        return pixels.clamp(0, 1).mul(255).to(torch.uint8)

    def config(self) -> dict:
        return {"class_name": self.class_name, "vae_name": self.vae_name, "scale": self.scale.tolist(),
                "bias": self.bias.tolist(), "batch_size": self.batch_size}


def encoder_from_config(cfg: Optional[dict]):
    """Rebuild an encoder from :meth:`config` output (None -> pixel encoder)."""
    if not cfg or cfg.get("class_name") == PixelEncoder.class_name:
        return PixelEncoder()
    if cfg.get("class_name") == StabilityVAEEncoder.class_name:
        return StabilityVAEEncoder(vae_name=cfg.get("vae_name", "stabilityai/sd-vae-ft-mse"),
                                   scale=cfg.get("scale"), bias=cfg.get("bias"),
                                   batch_size=cfg.get("batch_size", 8))
    raise ValueError(f"unknown encoder {cfg.get('class_name')!r}")
