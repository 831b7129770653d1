"""Every DiT key of the reference golden vectors, reproduced within 1e-4 (relative, max|a-b| / max|b|)."""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from networks.dit import DiT
from guidance.dit import dit_guidance
from sampling.gaussian_diffusion import create_diffusion

TOL = 1e-4

# Keys each test below covers; test_every_key_is_covered fails when the golden file grows.
COVERED = {
    "dit_kwargs", "dit_state", "dit_x", "dit_t", "dit_y", "dit_out_full", "dit_out_crop10", "dit_out_uncond",
    "dit_fwd_cfg_g1.5", "dit_fwd_crop_g0.5_mask0", "dit_fwd_crop_g0.5_mask1",
    "dit_fwd_cfgcrop_g0.6_c0.5_mask0", "dit_fwd_cfgcrop_g0.6_c0.5_mask1",
    "dit_respaced_timesteps", "dit_respaced_betas", "dit_loop_noise_seq", "dit_loop_mswg_g0.5",
}


@pytest.fixture(scope="module")
def net(dit_golden):
    model = DiT(**dit_golden["dit_kwargs"]).eval()
    model.load_state_dict(dit_golden["dit_state"], strict=True)
    return model


def _inputs(g):
    return g["dit_x"], g["dit_t"], g["dit_y"]


def _null(g, y):
    return torch.full_like(y, g["dit_kwargs"]["num_classes"])


def _doubled(out, uncond, guided_channels):
    """The reference's doubled-batch output: the (cond, uncond) rows share the guided channels;
    the other channels of each row come from that row's own network output."""
    second = torch.cat([out[:, :guided_channels], uncond[:, guided_channels:]], dim=1)
    return torch.cat([out, second])


def test_every_key_is_covered(dit_golden):
    assert {k for k in dit_golden if k.startswith("dit_")} == COVERED


def test_state_dict_names_are_official(dit_golden):
    assert list(DiT(**dit_golden["dit_kwargs"]).state_dict()) == list(dit_golden["dit_state"])


@torch.no_grad()
def test_network_outputs(dit_golden, net):
    g = dit_golden
    x, t, y = _inputs(g)
    assert rel_err(net(x, t, y), g["dit_out_full"]) < TOL
    assert rel_err(net(x, t, _null(g, y)), g["dit_out_uncond"]) < TOL
    assert rel_err(net(x[:, :, 6:16, 0:10], t, y), g["dit_out_crop10"]) < TOL


@torch.no_grad()
def test_exact_sincos_option_differs_on_crops_only(dit_golden):
    g = dit_golden
    x, t, y = _inputs(g)
    exact = DiT(**g["dit_kwargs"], pos_embed="sincos").eval()
    exact.load_state_dict(g["dit_state"])
    assert rel_err(exact(x, t, y), g["dit_out_full"]) < TOL  # trained grid: same table
    crop = exact(x[:, :, 6:16, 0:10], t, y)
    assert crop.shape == g["dit_out_crop10"].shape
    assert rel_err(crop, g["dit_out_crop10"]) > 1e-2  # a different table for the 5x5 grid


@torch.no_grad()
def test_plain_cfg(dit_golden, net):
    g = dit_golden
    x, t, y = _inputs(g)
    out = dit_guidance(net, "cfg", g_scale=1.5)(x, t, y)
    uncond = net(x, t, _null(g, y))
    assert rel_err(_doubled(out, uncond, 3), g["dit_fwd_cfg_g1.5"]) < TOL
    # Channel 3 (eps) and the variance are the conditional ones in the first half.
    assert torch.equal(out[:, 3:], net(x, t, y)[:, 3:])


@torch.no_grad()
def test_plain_cfg_all_eps_channels_option(dit_golden, net):
    g = dit_golden
    x, t, y = _inputs(g)
    cond, uncond = net(x, t, y), net(x, t, _null(g, y))
    out = dit_guidance(net, "cfg", g_scale=1.5, cfg_channels="all")(x, t, y)
    expect = torch.cat([uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]), cond[:, 4:]], dim=1)
    assert rel_err(out, expect) < 1e-5
    assert rel_err(out[:, :3], g["dit_fwd_cfg_g1.5"][:2, :3]) < TOL


@pytest.mark.parametrize("mask", [0, 1])
@torch.no_grad()
def test_swg(dit_golden, net, mask):
    g = dit_golden
    x, t, y = _inputs(g)
    out = dit_guidance(net, "swg", g_scale=0.5, mask=mask, window_size=10, window_steps=2)(x, t, y)
    assert rel_err(out, g[f"dit_fwd_crop_g0.5_mask{mask}"]) < TOL


@pytest.mark.parametrize("mask", [0, 1])
@torch.no_grad()
def test_cfg_swg(dit_golden, net, mask):
    g = dit_golden
    x, t, y = _inputs(g)
    out = dit_guidance(net, "cfg-swg", g_scale=0.6, crop_scale=0.5, mask=mask, window_size=10)(x, t, y)
    uncond = net(x, t, _null(g, y))
    assert rel_err(_doubled(out, uncond, 4), g[f"dit_fwd_cfgcrop_g0.6_c0.5_mask{mask}"]) < TOL


def test_respacing(dit_golden):
    g = dit_golden
    diff = create_diffusion("10")
    assert list(diff.timestep_map) == g["dit_respaced_timesteps"].tolist()
    assert rel_err(torch.as_tensor(diff.betas), g["dit_respaced_betas"]) < 1e-10


@torch.no_grad()
def test_sampling_loop_mswg(dit_golden, net):
    g = dit_golden
    seq = g["dit_loop_noise_seq"]
    draws = iter(seq[1:])
    guided = dit_guidance(net, "swg", g_scale=0.5, mask=1, window_size=10, window_steps=2)
    diff = create_diffusion(str(len(seq) - 1))
    out = diff.p_sample_loop(guided, seq[0], g["dit_y"], randn_like=lambda x: next(draws))
    assert next(draws, None) is None  # exactly one draw per step
    assert rel_err(out, g["dit_loop_mswg_g0.5"]) < TOL
