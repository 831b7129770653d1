"""A tiny random-weight DiT checkpoint and SD-VAE folder, written in the official layouts (shared by the DiT tests)."""

from __future__ import annotations

import pathlib

import torch
from diffusers import AutoencoderKL

from networks.dit import create_dit

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}


def write_tiny_dit(path: pathlib.Path, **arch) -> torch.nn.Module:
    """DiT-S/2 for 8x8 latents, 10 classes, weights ~N(0, 0.1) (seed 0) except the fixed pos_embed; saved as
    the official plain state dict at ``path``; returned in eval mode."""
    torch.manual_seed(0)
    net = create_dit("DiT-S/2", input_size=8, num_classes=10, **{**TINY, **arch})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.1)
    torch.save(net.state_dict(), path)
    return net.eval()


def write_tiny_vae(folder: pathlib.Path) -> AutoencoderKL:
    """A 4-level SD-VAE of width 8 (64 px images <-> 8x8x4 latents), saved with save_pretrained at ``folder``.
    Its weights come from the current torch seed: call it right after :func:`write_tiny_dit`."""
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(folder, safe_serialization=True)
    return vae.eval()
