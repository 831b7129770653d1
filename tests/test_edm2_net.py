"""EDM2 network behaviour beyond the golden vectors: sizes, labels, dtypes, logvar."""

from __future__ import annotations

import pytest
import torch

from networks.edm2 import EDM2SizeError, Precond


def _net(**kw):
    torch.manual_seed(0)
    args = dict(img_resolution=16, img_channels=3, label_dim=4, use_fp16=True, model_channels=8,
                channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
    args.update(kw)
    return Precond(**args).eval()


@pytest.mark.parametrize("h,w", [(16, 16), (8, 12), (4, 4), (32, 20)])
@torch.no_grad()
def test_runs_on_any_multiple_of_the_downsampling_factor(h, w):
    out = _net()(torch.randn(2, 3, h, w), torch.tensor([1.0, 2.0]), torch.eye(4)[:2])
    assert out.shape == (2, 3, h, w) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("h,w", [(10, 16), (16, 6), (2, 2)])
def test_other_sizes_get_a_clear_error(h, w):
    with pytest.raises(EDM2SizeError, match="multiple of 4"):
        _net()(torch.randn(1, 3, h, w), torch.tensor([1.0]))


@torch.no_grad()
def test_fp16_flag_is_float32_on_cpu():
    x, s, c = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 5.0]), torch.eye(4)[:2]
    a = _net(use_fp16=True)(x, s, c)
    b = _net(use_fp16=False)(x, s, c)
    assert torch.equal(a, b)


@torch.no_grad()
def test_unconditional_net_ignores_labels_and_logvar_shape():
    net = _net(label_dim=0)
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 5.0])
    assert torch.equal(net(x, s), net(x, s, torch.eye(4)[:2]))
    d, logvar = net(x, s, return_logvar=True)
    assert logvar.shape == (2, 1, 1, 1)


@torch.no_grad()
def test_preconditioning_limits():
    """At tiny sigma D(x) -> x (c_skip -> 1, c_out -> 0)."""
    net = _net()
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(net(x, torch.tensor([1e-6]), torch.eye(4)[:1]), x, rtol=1e-4, atol=1e-4)


def test_forced_weight_normalisation_in_training():
    net = _net()
    net.train()
    net(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), torch.eye(4)[:1])
    w = net.unet.enc["16x16_conv"].weight
    norms = w.flatten(1).norm(dim=1) / (w[0].numel() ** 0.5)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_weight_cache_is_bit_identical_and_controlled_by_public_calls(monkeypatch):
    import networks.edm2 as edm2

    x, s, c = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 5.0]), torch.eye(4)[:2]
    net = _net()
    assert net.caches_weights_on("cpu")
    cached = [net(x, s, c) for _ in range(2)]  # the second call reads the cache the first filled
    net.use_weight_cache(False)
    assert not net.caches_weights_on("cpu")
    plain = net(x, s, c)
    assert torch.equal(cached[0], plain) and torch.equal(cached[1], plain)
    net.use_weight_cache(True)
    monkeypatch.setattr(edm2, "CPU_WEIGHT_CACHE_BYTES", 1)  # a network "too large" for the CPU cache
    assert not net.caches_weights_on("cpu") and net.caches_weights_on("meta")
