"""networks.encoders: pixel mapping and the VAE encoder with EDM2's latent whitening (tiny AutoencoderKL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from networks.encoders import PixelEncoder, StabilityVAEEncoder, encoder_from_config
from utils import cache
from utils.errors import UsageError


def _tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16).eval()


def test_pixel_encoder_roundtrip():
    enc = PixelEncoder()
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    x = enc.encode(pixels)
    assert x.min().item() == -1 and x.max().item() == 1
    assert torch.equal(enc.decode(x), pixels)
    # decode rounds to the nearest level and clips
    assert enc.decode(torch.tensor([-5.0, 5.0, 0.0]).reshape(1, 3, 1, 1)).flatten().tolist() == [0, 255, 128]


def test_edm2_constants():
    enc = StabilityVAEEncoder(vae=_tiny_vae())
    raw_mean = np.array([5.81, 3.25, 0.12, -2.15])
    raw_std = np.array([4.17, 4.62, 3.71, 3.28])
    np.testing.assert_allclose(enc.scale, 0.5 / raw_std, rtol=1e-6)
    np.testing.assert_allclose(enc.bias, -raw_mean * 0.5 / raw_std, rtol=1e-6)
    # Raw latents with the assumed statistics map to mean 0, std 0.5.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 4, 8, 8, generator=g) * torch.tensor(raw_std).float().reshape(1, 4, 1, 1) \
        + torch.tensor(raw_mean).float().reshape(1, 4, 1, 1)
    scale, bias = enc._affine(z)
    x = z * scale + bias
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(4), atol=0.02, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.full((4,), 0.5), atol=0.02, rtol=0)


def test_vae_decode_matches_direct_and_chunks():
    vae = _tiny_vae()
    enc = StabilityVAEEncoder(vae=vae, batch_size=2)
    assert enc.spatial_factor == 2 and enc.out_channels() == 4
    x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    got = enc.decode(x)
    assert got.dtype == torch.uint8 and got.shape == (5, 3, 16, 16)
    scale = torch.tensor(enc.scale).reshape(1, 4, 1, 1)
    bias = torch.tensor(enc.bias).reshape(1, 4, 1, 1)
    with torch.no_grad():
        ref = vae.decode((x - bias) / scale).sample
    ref = ref.clamp(0, 1).mul(255).to(torch.uint8)
    assert (got.int() - ref.int()).abs().max() <= 1  # chunking only changes float rounding


def test_vae_encode_statistics_path():
    vae = _tiny_vae()
    enc = StabilityVAEEncoder(vae=vae, batch_size=3)
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    a = enc.encode(pixels, generator=torch.Generator().manual_seed(5))
    b = enc.encode(pixels, generator=torch.Generator().manual_seed(5))
    assert a.shape == (4, 4, 8, 8) and torch.equal(a, b)
    with torch.no_grad():
        dist = vae.encode(pixels.float() / 255).latent_dist
    scale = torch.tensor(enc.scale).reshape(1, 4, 1, 1)
    bias = torch.tensor(enc.bias).reshape(1, 4, 1, 1)
    # The sample lies within a few posterior std of the whitened mean.
    dev = (a - (dist.mean * scale + bias)).abs() / (dist.std * scale)
    assert dev.max() < 6


def test_vae_loaded_from_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SWG_CACHE", str(tmp_path))
    folder = tmp_path / "hf" / "stabilityai" / "sd-vae-ft-mse"
    _tiny_vae().save_pretrained(folder, safe_serialization=True)
    enc = StabilityVAEEncoder()
    x = torch.zeros(1, 4, 8, 8)
    assert enc.decode(x).shape == (1, 3, 16, 16)  # loaded through utils.cache.hf_snapshot, no network
    enc2 = StabilityVAEEncoder(vae_name=str(folder))  # a local folder works as well
    assert torch.equal(enc2.decode(x), enc.decode(x))


def test_vae_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("SWG_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(cache.OfflineError) as info:
        StabilityVAEEncoder().decode(torch.zeros(1, 4, 8, 8))
    assert str(tmp_path / "hf" / "stabilityai" / "sd-vae-ft-mse") in str(info.value)
    assert isinstance(info.value, UsageError)


def test_config_roundtrip():
    enc = StabilityVAEEncoder(vae_name="x/y", batch_size=3)
    again = encoder_from_config(enc.config())
    np.testing.assert_array_equal(again.scale, enc.scale)
    assert again.vae_name == "x/y" and again.batch_size == 3
    assert isinstance(encoder_from_config(None), PixelEncoder)
    with pytest.raises(ValueError):
        encoder_from_config({"class_name": "Nope"})
