"""DiT weights in diffusers' layout: conversion both ways, loading, and sample_dit.py --ckpt <diffusers folder>."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import PIL.Image
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, DiTTransformer2DModel  # noqa: E402

import sample_dit  # noqa: E402
from networks.dit import DiT, create_dit  # noqa: E402
from networks.dit_diffusers import (diffusers_to_dit_state, dit_to_diffusers_state, from_diffusers,  # noqa: E402
                                    is_diffusers_source, load_dit_weights, match_official_dit,
                                    save_diffusers_dit, snapshot_source, to_diffusers)
from utils.errors import UsageError  # noqa: E402

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}


def _net(num_classes: int = 10, input_size: int = 8) -> DiT:
    torch.manual_seed(0)
    net = create_dit("DiT-S/2", input_size=input_size, num_classes=num_classes, **TINY)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.1)
    return net.eval()


def test_conversion_round_trips_both_ways():
    net = _net()
    kwargs = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    theirs = dit_to_diffusers_state(net.state_dict(), depth=2)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    assert set(theirs) == set(model.state_dict())          # every diffusers tensor, nothing else
    model.load_state_dict(theirs)
    back = diffusers_to_dit_state(model.state_dict(), kwargs)
    ours = net.state_dict()
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    again = dit_to_diffusers_state(back, depth=2)
    assert all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_same_outputs_before_and_after():
    net = _net()
    model = to_diffusers(net)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0, 400, 999]), torch.tensor([1, 9, 10])
    with torch.no_grad():
        ours = net(x, t, y)
        official = match_official_dit(to_diffusers(net))(x, t, y).sample
        stock = model(x, t, y).sample
        back = from_diffusers(model)(x, t, y)
    torch.testing.assert_close(official, ours, atol=1e-5, rtol=1e-5)
    assert torch.equal(back, ours)
    # Stock diffusers differs only through its timestep frequencies and norm eps: at t = 0 the sinusoid is
    # the same (sin 0, cos 0) for any frequencies, so only the eps remains.
    assert (stock[1:] - ours[1:]).abs().max() > 1e-3
    torch.testing.assert_close(stock[:1], ours[:1], atol=2e-3, rtol=1e-3)


def test_load_from_diffusers_folders(tmp_path):
    net = _net()
    save_diffusers_dit(net, tmp_path / "pipe" / "transformer")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([5, 600]), torch.tensor([3, 4])
    for source in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        assert is_diffusers_source(source)
        loaded, kwargs = load_dit_weights(source, "DiT-S/2", input_size=8, num_classes=10, **TINY)
        assert kwargs["depth"] == 2 and kwargs["num_classes"] == 10 and kwargs["learn_sigma"]
        with torch.no_grad():
            assert torch.equal(loaded(x, t, y), net(x, t, y))
    loaded, _ = load_dit_weights(tmp_path / "pipe", model=None)  # architecture from config.json alone
    assert loaded.input_size == 8
    with pytest.raises(UsageError, match="num_classes=10, not 1000"):
        load_dit_weights(tmp_path / "pipe", "DiT-S/2", input_size=8, num_classes=1000, **TINY)
    with pytest.raises(UsageError, match="depth=2, not 28"):
        load_dit_weights(tmp_path / "pipe", "DiT-XL/2", input_size=8, num_classes=10)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UsageError, match="not a DiT"):
        load_dit_weights(tmp_path / "empty")


def test_hub_ids_and_pt_files_are_told_apart(tmp_path):
    assert is_diffusers_source("facebook/DiT-XL-2-256")
    assert snapshot_source("facebook/DiT-XL-2-256") == "hf-snapshot://facebook/DiT-XL-2-256/transformer"
    assert not is_diffusers_source("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt")
    assert not is_diffusers_source("ckpts/0400000.pt")
    torch.save(_net().state_dict(), tmp_path / "n.pt")
    net, kwargs = load_dit_weights(tmp_path / "n.pt", "DiT-S/2", input_size=8, num_classes=10, **TINY)
    assert kwargs["hidden_size"] == 32 and isinstance(net, DiT)
    no_null = create_dit("DiT-S/2", input_size=8, num_classes=10, class_dropout_prob=0.0, **TINY)
    with pytest.raises(UsageError, match="null-class"):
        to_diffusers(no_null)


def test_sample_dit_with_diffusers_weights(tmp_path, capsys):
    """sample_dit.py --ckpt <DiTPipeline folder> draws the same images as --ckpt <.pt>."""
    net = _net()
    torch.save(net.state_dict(), tmp_path / "tiny.pt")
    save_diffusers_dit(net, tmp_path / "pipe" / "transformer")
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    images = []
    for ckpt in (tmp_path / "tiny.pt", tmp_path / "pipe"):
        out = tmp_path / f"out-{ckpt.name}"
        argv = ["--model", "DiT-S/2", "--model-kwargs", json.dumps(TINY), "--ckpt", str(ckpt), "--image-size", "64",
                "--num-classes", "10", "--sample-dir", str(out), "--num-sampling-steps", "2", "--metrics", "none",
                "--seeds", "0", "--device", "cpu", "--vae-path", str(tmp_path / "vae"), "--crop", "1", "--mask", "1",
                "--g-scale", "0.5", "--window-size", "6"]
        assert sample_dit.main(argv) == 0
        (png,) = pathlib.Path(out).glob("*/samples/*.png")
        images.append(np.asarray(PIL.Image.open(png)))
    assert np.array_equal(images[0], images[1])
    bad = ["--model", "DiT-S/2", "--ckpt", str(tmp_path / "pipe"), "--image-size", "64", "--num-classes", "10",
           "--sample-dir", str(tmp_path / "bad"), "--seeds", "0", "--device", "cpu", "--metrics", "none",
           "--vae-path", str(tmp_path / "vae")]
    capsys.readouterr()
    assert sample_dit.main(bad) == 2  # DiT-S/2 has depth 12, the folder holds depth 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "depth=2, not 12" in err and "--image-size" in err and "\n" not in err
