"""The published sizes, reduced to one step: random weights at the real shapes, offline.

* EDM2-S written as an official training snapshot (fp16 ``ema``, VAE encoder
  record) into a temporary ``$SWG_CACHE`` beside an SD VAE folder built from
  ``benchmarks/sd_vae_config.json``; ``sample_edm2.py`` takes one M-SWG step,
  decodes the 64x64x4 latent through the VAE and writes a 512x512 PNG.
* DiT-XL/2 (256 px) written as the released state-dict ``.pt``, loaded by the
  project's loader, one M-SWG evaluation: the output equals the plain one
  exactly where no two windows overlap (the mask is 0 there) and differs elsewhere.

These are the slowest tests of the suite (tens of seconds on two cores) because
the networks are the real ones: 280 M and 675 M parameters.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from benchmarks.real_scale import edm2_init_kwargs, write_dit_checkpoint, write_edm2_snapshot, write_vae_folder


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SWG_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_edm2_s_snapshot_one_mswg_step_to_png(cache, tmp_path):
    import sample_edm2
    from networks.edm2_pickle import load_checkpoint

    snap = tmp_path / "edm2-img512-s-2147483-0.100.pkl"
    params = write_edm2_snapshot(snap, "s")
    assert params == 280_212_837  # EDM2-S as published (280 M)
    write_vae_folder(cache / "hf" / "stabilityai" / "sd-vae-ft-mse")

    ckpt = load_checkpoint(snap)
    assert ckpt.init_kwargs == edm2_init_kwargs("s")
    assert ckpt.net.unet.enc["64x64_conv"].weight.dtype == torch.float32
    assert type(ckpt.encoder).__name__ == "StabilityVAEEncoder" and ckpt.other["loss_fn"].class_name == "EDM2Loss"
    del ckpt

    out = tmp_path / "out"
    assert 0 == sample_edm2.main(["--net_pos_pkl", str(snap), "--g_method", "swg", "--g_weight", "0.2",
                                  "--swg_sizes", "40", "--scale_window_guide", "1", "--outdir", str(out),
                                  "--seeds", "3", "--steps", "1", "--batch", "1"])
    pngs = sorted(out.rglob("*.png"))
    assert [p.name for p in pngs] == ["0000003.png"]
    img = np.asarray(PIL.Image.open(pngs[0]))
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    assert img.std() > 0  # decoded pixels, not a constant fill


@torch.inference_mode()
def test_dit_xl2_256_one_mswg_evaluation(tmp_path):
    from guidance.dit import dit_guidance
    from networks.dit import load_dit

    path = tmp_path / "DiT-XL-2-256x256.pt"
    assert write_dit_checkpoint(path, 256) == 675_129_632  # DiT-XL/2 at 256 px (675 M)
    net = load_dit("DiT-XL/2", path, input_size=32)
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([500]), torch.tensor([207])
    plain = net(x, t, y)
    guided = dit_guidance(net, "swg", g_scale=0.5, mask=True, window_steps=2)(x, t, y)
    assert plain.shape == guided.shape == (1, 8, 32, 32)
    # Windows of 20 at origins 0 and 12: pixels outside rows/columns 12..19 are covered once.
    once = torch.ones(32, dtype=torch.bool)
    once[12:20] = False
    alone = once[:, None] & once[None, :]
    assert torch.equal(guided[..., alone], plain[..., alone])
    assert (guided[..., ~alone] != plain[..., ~alone]).float().mean() > 0.9


def test_command_lines_run_in_fresh_processes_with_exit_codes_and_logs(tmp_path, monkeypatch):
    """The benchmark's runner: each command line in its own process, its output in a log, failures recorded."""
    from benchmarks import real_scale

    monkeypatch.setattr(real_scale, "PRELOAD", ["click"])  # the real list imports torch and diffusers (5 s)
    monkeypatch.setattr(real_scale, "_CONTEXT", None)
    lines, failures, logs = [], [], tmp_path / "logs"
    ok = real_scale.run_cli(["sample_edm2.py", "--list_presets"], lines.append, failures, logs)
    bad = real_scale.run_cli(["sample_edm2.py", "--seeds", "0", "--outdir", str(tmp_path / "o")], lines.append,
                             failures, logs)
    module = real_scale.run_cli(["-m", "metrics", "--help"], lines.append, failures, logs)
    assert ok > 0 and module > 0 and bad != bad  # NaN: the failed run has no time
    assert failures == [f"sample_edm2.py --seeds 0 --outdir {tmp_path / 'o'}"]
    first, second, third = sorted(logs.iterdir())
    assert "swg-edm2-s-mswg-0.2" in first.read_text()
    assert "error: no positive network" in second.read_text() and "FAILED (2)" in lines[1]
    assert "ref" in third.read_text()  # metrics' sub-commands
    assert not (tmp_path / "o").exists()
