"""Every EDM2 key of the reference golden vectors, reproduced within 1e-4 (relative)."""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from guidance import WindowError, WindowGrid, guide, sliding_window_predict
from networks.edm2 import Precond
from sampling.edm import edm_sampler

TOL = 1e-4


def _net(g, which):
    net = Precond(**g[f"edm_{which}_kwargs"]).eval()
    net.load_state_dict(g[f"edm_{which}_state"], strict=True)
    return net


@pytest.fixture(scope="module")
def nets(edm2_golden):
    return _net(edm2_golden, "pos"), _net(edm2_golden, "neg")


@torch.no_grad()
def test_state_dict_names_are_official(edm2_golden):
    for which in ("pos", "neg"):
        net = Precond(**edm2_golden[f"edm_{which}_kwargs"])
        assert set(net.state_dict()) == set(edm2_golden[f"edm_{which}_state"])


@torch.no_grad()
def test_denoiser_outputs(edm2_golden, nets):
    g, (pos, _) = edm2_golden, nets
    x, s, c = g["edm_x"], g["edm_sigma"], g["edm_labels"]
    assert rel_err(pos(x, s, c), g["edm_D_pos"]) < TOL
    assert rel_err(pos(x, s, None), g["edm_D_pos_uncond_zero_labels"]) < TOL
    assert rel_err(pos(x, s, torch.zeros_like(c)), g["edm_D_pos_uncond_zero_labels"]) < TOL
    assert rel_err(pos(x[:, :, 4:16, 0:12], s, c), g["edm_D_pos_crop_t4_b16_l0_r12"]) < TOL


@pytest.mark.parametrize("k,n", [(12, 2), (8, 3)])
@torch.no_grad()
def test_window_negatives(edm2_golden, nets, k, n):
    g, (pos, _) = edm2_golden, nets
    grid = WindowGrid.create(16, 16, k, n)
    pred, count = sliding_window_predict(pos, g["edm_x"], g["edm_sigma"], g["edm_labels"], grid)
    assert rel_err(pred, g[f"edm_swg_neg_k{k}_n{n}"]) < TOL
    assert torch.equal(count.expand_as(pred), g[f"edm_swg_count_k{k}_n{n}"])
    # Capping the window batch changes nothing.
    pred2, _ = sliding_window_predict(pos, g["edm_x"], g["edm_sigma"], g["edm_labels"], grid, max_batch=2)
    assert rel_err(pred2, pred) < 1e-6


def test_uncovering_configuration_is_refused(edm2_golden):
    count = edm2_golden["edm_swg_count_k12_n1"]
    assert (count == 0).any(), "the reference leaves pixels uncovered here"
    with pytest.raises(WindowError, match="cannot cover"):
        WindowGrid.create(16, 16, 12, 1)


@pytest.mark.parametrize("case", ["none", "swg", "mswg", "wmg", "cfg", "wmg_swg", "cfg_swg"])
@torch.no_grad()
def test_sampler_cases(edm2_golden, nets, case):
    g, (pos, neg) = edm2_golden, nets
    cfg, s = g["cases"][case], g["sampler"]
    denoise = guide(pos, cfg["g_method"], cfg["g_weight"], neg_denoiser=neg, window_size=s["swg_size"],
                    window_steps=s["swg_steps"], masked=bool(cfg.get("scale_window_guide", 0)),
                    reference_quirks=True)
    calls = []
    counted = lambda x, sigma, labels: (calls.append(1), denoise(x, sigma, labels))[1]
    out = edm_sampler(counted, g["edm_noise"], g["edm_labels"], num_steps=s["num_steps"],
                      sigma_min=s["sigma_min"], sigma_max=s["sigma_max"], rho=s["rho"])
    assert rel_err(out, g[f"edm_sample_{case}"]) < TOL
    assert len(calls) == 2 * s["num_steps"] - 1  # every Heun evaluation goes through the denoiser


def test_every_key_is_covered(edm2_golden):
    """Each key of the golden file is checked by a test above (new keys must get a test)."""
    cases = {f"edm_sample_{c}" for c in edm2_golden["cases"]}
    windows = {f"edm_swg_{kind}_k{k}_n{n}" for kind in ("neg", "count") for k, n in ((12, 2), (8, 3), (12, 1))}
    inputs = {f"edm_{w}_{p}" for w in ("pos", "neg") for p in ("kwargs", "state")} | {
        "edm_x", "edm_sigma", "edm_labels", "edm_noise"}
    outputs = {"edm_D_pos", "edm_D_pos_uncond_zero_labels", "edm_D_pos_crop_t4_b16_l0_r12"}
    assert {k for k in edm2_golden if k.startswith("edm_")} == cases | windows | inputs | outputs
    assert set(edm2_golden["cases"]) == {"none", "swg", "mswg", "wmg", "cfg", "wmg_swg", "cfg_swg"}
