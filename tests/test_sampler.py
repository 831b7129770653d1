"""EDM Heun sampler and per-seed generators."""

from __future__ import annotations

import math

import pytest
import torch

from guidance import guide
from networks.edm2 import Precond
from sampling.edm import edm_sampler, edm_sigma_steps
from sampling.seeds import StackedRandomGenerator, parse_int_list
from utils.errors import UsageError


@pytest.mark.parametrize("text,expected", [
    ("0-4", [0, 1, 2, 3, 4]), ("7", [7]), ("1,2,5-7", [1, 2, 5, 6, 7]), (" 3 - 5 , 9", [3, 4, 5, 9]),
])
def test_parse_int_list(text, expected):
    assert parse_int_list(text) == expected


@pytest.mark.parametrize("text", ["", "a", "1,,2", "5-3", "1-2-3", "0-x"])
def test_parse_int_list_errors(text):
    with pytest.raises(UsageError) as e:
        parse_int_list(text)
    assert "\n" not in str(e.value)


def test_schedule_endpoints():
    t = edm_sigma_steps(18, 0.002, 80, 7)
    assert len(t) == 19 and t[-1] == 0
    assert t[0].item() == pytest.approx(80) and t[-2].item() == pytest.approx(0.002)
    assert (t[:-1][1:] < t[:-1][:-1]).all()


def test_heun_solves_gaussian_ode():
    """For data ~ N(0, s^2) the ideal denoiser is x s^2/(s^2+sigma^2) and x(0) = x(T) s / sqrt(s^2+T^2)."""
    s = 0.5
    denoise = lambda x, sigma, labels: x * s ** 2 / (s ** 2 + sigma ** 2)
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    expected = noise * 80 * s / math.sqrt(s ** 2 + 80 ** 2)
    err = {}
    for n in (64, 256):
        out = edm_sampler(denoise, noise, num_steps=n, sigma_max=80, sigma_min=0.002, dtype=torch.float64)
        err[n] = ((out - expected).abs().max() / expected.abs().max()).item()
    assert err[256] < 1e-3
    assert err[64] / err[256] > 8  # second order: 4x the steps, ~16x less error


def test_generator_draw_order_matches_edm2():
    """Each seed draws noise, then its label, then churn noise, from its own generator."""
    rnd = StackedRandomGenerator("cpu", [5, 11])
    noise = rnd.randn([2, 3, 4, 4])
    labels = rnd.randint(10, size=[2])
    churn = rnd.randn([2, 3, 4, 4])
    g = torch.Generator("cpu").manual_seed(11)
    assert torch.equal(noise[1], torch.randn([3, 4, 4], generator=g))
    assert torch.equal(labels[1], torch.randint(10, size=[], generator=g))
    assert torch.equal(churn[1], torch.randn([3, 4, 4], generator=g))


def _tiny_net():
    torch.manual_seed(1)
    return Precond(img_resolution=16, img_channels=2, label_dim=5, use_fp16=False, model_channels=8,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=8).eval()


def _sample(net, seeds, churn):
    rnd = StackedRandomGenerator("cpu", seeds)
    noise = rnd.randn([len(seeds), 2, 16, 16])
    labels = torch.eye(5)[rnd.randint(5, size=[len(seeds)])]
    d = guide(net, "swg", 0.5, window_size=8, window_steps=3)
    return edm_sampler(d, noise, labels, num_steps=4, S_churn=churn, S_max=50, randn_like=rnd.randn_like)


@pytest.mark.parametrize("churn", [0.0, 40.0])
@torch.no_grad()
def test_seed_gives_same_image_in_any_batch(churn):
    net = _tiny_net()
    batch = _sample(net, [3, 7, 9], churn)
    alone = _sample(net, [7], churn)
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_churn_changes_the_result():
    net = _tiny_net()
    with torch.no_grad():
        assert not torch.allclose(_sample(net, [7], 0.0), _sample(net, [7], 40.0))
