"""PAG, SEG and SLG: the networks' block edits and guidance/perturb.py.

Independent expectations: diffusers' own hooks on DiTTransformer2DModel (same weights, converted
with networks/dit_diffusers.py), diffusers' attention-score skip and blur used inside an EDM2 block,
scipy's Gaussian filter, and analytic cases (one-token attention, constant fields).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from diffusers.hooks import HookRegistry, LayerSkipConfig  # noqa: E402
from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode, _apply_layer_skip_hook  # noqa: E402
from diffusers.hooks.smoothed_energy_guidance_utils import (  # noqa: E402
    SmoothedEnergyGuidanceConfig, SmoothedEnergyGuidanceHook, _apply_smoothed_energy_guidance_hook,
    _gaussian_blur_2d)

from guidance.dit import DiTDenoiser  # noqa: E402
from guidance.perturb import (Perturbation, PerturbationError, default_blocks, perturbation,  # noqa: E402
                              perturbed)
from networks.dit import create_dit  # noqa: E402
from networks.dit_diffusers import match_official_dit, to_diffusers  # noqa: E402
from networks.edits import blur_kernel_size, blur_tokens  # noqa: E402
from networks.edm2 import Block, Precond  # noqa: E402

DIT = dict(hidden_size=32, depth=3, num_heads=2)
EDM2 = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=8,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8, 4], channels_per_head=8)


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    net = create_dit("DiT-S/2", input_size=8, num_classes=10, **DIT)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def edm2():
    torch.manual_seed(0)
    net = Precond(**EDM2)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(0.7)
    return net.eval()


def _dit_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.tensor([3, 10])


def _diffusers_output(net, hook):
    """diffusers' DiT (our weights) run under ``hook(model)``: one of diffusers' own guidance hooks."""
    model = match_official_dit(to_diffusers(net))
    hook(model)
    x, t, y = _dit_inputs()
    with torch.no_grad():
        return model(x, t, y).sample


def _ours(net, kind, blocks, sigma=None):
    x, t, y = _dit_inputs()
    den = perturbed(DiTDenoiser(net), net, perturbation(kind, blocks, sigma))
    with torch.no_grad():
        return den(x, t, y)


# --------------------------------------------------------------------------------------------------
# DiT against diffusers' hooks.

def test_pag_matches_diffusers_attention_score_skip(dit):
    """PAG: diffusers' PerturbedAttentionGuidance config (skip_attention_scores: SDPA returns V)."""
    theirs = _diffusers_output(dit, lambda m: _apply_layer_skip_hook(m, LayerSkipConfig(
        indices=[0, 2], fqn="auto", skip_attention=False, skip_attention_scores=True, skip_ff=False)))
    ours = _ours(dit, "pag", [0, 2])
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    x, t, y = _dit_inputs()
    with torch.no_grad():
        assert (ours - dit(x, t, y)).abs().max() > 1e-2        # the perturbation does something


def test_slg_matches_diffusers_layer_skip(dit):
    """SLG: diffusers' SkipLayerGuidance config (whole transformer block skipped)."""
    theirs = _diffusers_output(dit, lambda m: _apply_layer_skip_hook(m, LayerSkipConfig(indices=[1], fqn="auto")))
    torch.testing.assert_close(_ours(dit, "slg", [1]), theirs, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_seg_blur_matches_diffusers_blur(dit, sigma):
    """SEG with a finite width: diffusers' hook on to_q with its blur branch (reached by its inf threshold)."""
    def hook(model):
        _apply_smoothed_energy_guidance_hook(model, SmoothedEnergyGuidanceConfig(indices=[1], fqn="auto"), sigma)
        for module in model.modules():
            reg = getattr(module, "_diffusers_hook", None)
            if reg is not None and "smoothed_energy_guidance_hook" in reg.hooks:
                reg.hooks["smoothed_energy_guidance_hook"].blur_threshold_inf = -1.0   # take the blur branch
    torch.testing.assert_close(_ours(dit, "seg", [1], sigma), _diffusers_output(dit, hook), atol=2e-5, rtol=1e-5)


def test_seg_diffusers_finite_sigma_is_the_mean_query(dit):
    """diffusers 0.42 inverts SEG's branches: a finite ``blur_sigma`` gives the mean query (the paper's and the
    SEG authors' sigma = inf), and only sigma > 9999 blurs.  We follow the paper: sigma = 2 blurs."""
    theirs = _diffusers_output(dit, lambda m: _apply_smoothed_energy_guidance_hook(
        m, SmoothedEnergyGuidanceConfig(indices=[1], fqn="auto"), 2.0))
    torch.testing.assert_close(_ours(dit, "seg", [1], math.inf), theirs, atol=2e-5, rtol=1e-5)
    assert (_ours(dit, "seg", [1], 2.0) - theirs).abs().max() > 1e-3


def test_hook_registry_untouched_by_our_path(dit):
    """Our edits leave nothing behind on the network: the next plain call is the unperturbed one, bit for bit."""
    x, t, y = _dit_inputs()
    with torch.no_grad():
        before = dit(x, t, y)
        _ours(dit, "pag", [1])
        assert torch.equal(dit(x, t, y), before)
        assert torch.equal(dit(x, t, y, edit=None), before)


# --------------------------------------------------------------------------------------------------
# The blur itself.

@pytest.mark.parametrize("grid,sigma", [((6, 6), 0.7), ((4, 7), 1.3), ((5, 8), 1.0)])
def test_blur_tokens_is_scipy_gaussian_filter(grid, sigma):
    """A truncated, renormalised Gaussian with mirrored borders: scipy's gaussian_filter(mode='mirror')."""
    from scipy.ndimage import gaussian_filter1d

    h, w = grid
    q = torch.randn(3, h * w, 5, dtype=torch.float64)
    ours = blur_tokens(q, h, w, sigma).numpy().reshape(3, h, w, 5)
    ref = q.numpy().reshape(3, h, w, 5)
    ref = gaussian_filter1d(ref, sigma, axis=1, mode="mirror", radius=blur_kernel_size(sigma, h) // 2)
    ref = gaussian_filter1d(ref, sigma, axis=2, mode="mirror", radius=blur_kernel_size(sigma, w) // 2)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_blur_limits():
    q = torch.randn(2, 16, 3)
    torch.testing.assert_close(blur_tokens(q, 4, 4, math.inf), q.mean(1, keepdim=True).expand_as(q))
    assert torch.equal(blur_tokens(q, 4, 4, 0.1), q)                       # kernel of one tap
    const = torch.ones(2, 16, 3) * torch.tensor([1.0, -2.0, 5.0])
    torch.testing.assert_close(blur_tokens(const, 4, 4, 1.5), const)        # constants survive any blur
    assert [blur_kernel_size(s, 32) for s in (0.5, 1, 2, 100)] == [3, 7, 13, 33]


# --------------------------------------------------------------------------------------------------
# EDM2.

def test_edm2_blocks_and_defaults(edm2):
    names = edm2.block_names()
    attn = edm2.edit_blocks("identity")
    assert all(("8x8" in n or "4x4" in n) and "down" not in n and "up" not in n for n in attn.values())
    assert "dec.4x4_in0" in attn.values() and "dec.4x4_in1" not in attn.values()
    skip = edm2.edit_blocks("skip")
    assert "dec.4x4_in1" in skip.values() and not any("_block" in n and n.startswith("dec") for n in skip.values())
    for kind in ("pag", "seg", "slg"):
        assert [names[b] for b in default_blocks(kind, edm2)] == ["dec.4x4_in0"]
    with torch.device("meta"):  # the released layout: 512px latents (64x64), 4 levels, 3 blocks per level
        big = Precond(img_resolution=64, img_channels=4, label_dim=1000, model_channels=192)
    assert big.block_names()[default_blocks("pag", big)[0]] == "dec.8x8_in0"
    assert sorted(set(n.split("_")[0] for n in big.edit_blocks("identity").values())) == \
        ["dec.16x16", "dec.8x8", "enc.16x16", "enc.8x8"]


def _edm2_call(net, edit=None):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=g) * 2
    labels = F.one_hot(torch.tensor([1, 7]), 10).float()
    with torch.no_grad():
        return net(x, torch.tensor([0.5, 3.0]), labels, edit=edit)


class _BlockPatch:
    """Run one EDM2 Block under a torch function mode, or replace its forward (the independent path)."""

    def __init__(self, block: Block, mode=None, forward=None):
        self.block, self.mode, self.forward = block, mode, forward

    def __enter__(self):
        original = self.block.forward

        def patched(x, emb, edit=None):
            if self.forward is not None:
                return self.forward(x, emb)
            with self.mode():
                return original(x, emb)
        self.block.forward = patched
        return self

    def __exit__(self, *exc):
        del self.block.forward


class _BlurQueries(torch.overrides.TorchFunctionMode):
    """Blur SDPA's queries with diffusers' SEG blur (its blur branch) before the attention."""

    def __init__(self, sigma):
        super().__init__()
        self.sigma = sigma

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            n, heads, tokens, c = q.shape
            flat = q.permute(0, 2, 1, 3).reshape(n, tokens, heads * c).clone()
            k_size = math.ceil(6 * self.sigma) + 1 - math.ceil(6 * self.sigma) % 2
            flat = _gaussian_blur_2d(flat, k_size, self.sigma, -1.0)
            q = flat.reshape(n, tokens, heads, c).permute(0, 2, 1, 3)
            return func(q, k, v)
        return func(*args, **kwargs)


def _block(net, index):
    part, name = net.block_names()[index].split(".")
    return getattr(net.unet, part)[name]


def test_edm2_identity_attention_is_value(edm2):
    """PAG on EDM2: diffusers' attention-score skip (SDPA returns V) inside the chosen block."""
    i = default_blocks("pag", edm2)[0]
    with _BlockPatch(_block(edm2, i), mode=AttentionScoreSkipFunctionMode):
        theirs = _edm2_call(edm2)
    ours = _edm2_call(edm2, Perturbation("pag").resolve(edm2))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - _edm2_call(edm2)).abs().max() > 1e-3


def test_edm2_blur_is_diffusers_blur_of_the_attention_queries(edm2):
    i = min(b for b, n in edm2.edit_blocks("blur").items() if "8x8" in n)      # an 8x8 grid: a real blur
    with _BlockPatch(_block(edm2, i), mode=lambda: _BlurQueries(1.0)):
        theirs = _edm2_call(edm2)
    ours = _edm2_call(edm2, perturbation("seg", [i], 1.0).resolve(edm2))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - _edm2_call(edm2)).abs().max() > 1e-4
    assert (ours - _edm2_call(edm2, perturbation("seg", [i]).resolve(edm2))).abs().max() > 1e-4  # inf differs


def test_edm2_skip_is_identity_block(edm2):
    i = max(edm2.edit_blocks("skip"))
    with _BlockPatch(_block(edm2, i), forward=lambda x, emb: x):
        theirs = _edm2_call(edm2)
    assert torch.equal(_edm2_call(edm2, perturbation("slg", [i]).resolve(edm2)), theirs)


def test_one_token_attention_is_already_the_identity(edm2):
    """On a 4x4 input the lowest level is 1x1: softmax over one token is 1, the mean of one query is itself."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 4, 4, generator=g)
    labels = F.one_hot(torch.tensor([2]), 10).float()
    i = default_blocks("pag", edm2)[0]
    with torch.no_grad():
        plain = edm2(x, 1.0, labels)
        for p in (perturbation("pag", [i]), perturbation("seg", [i])):
            torch.testing.assert_close(edm2(x, 1.0, labels, edit=p.resolve(edm2)), plain, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Settings and validation.

def test_defaults_of_the_released_dit():
    with torch.device("meta"):
        xl = create_dit("DiT-XL/2")
    assert default_blocks("pag", xl) == default_blocks("seg", xl) == (14,)
    assert default_blocks("slg", xl) == (8, 9, 10)
    assert Perturbation("pag").resolve(xl).blocks == (14,)


def test_refused_blocks_name_the_valid_ones(edm2, dit):
    with pytest.raises(PerturbationError) as exc:
        perturbation("pag", "0").resolve(edm2)
    msg = str(exc.value)
    assert "`perturb_blocks`" in msg and "0 (enc.16x16_block0)" in msg and "self-attention" in msg
    assert all(f"{i} {n}" in msg for i, n in edm2.edit_blocks("identity").items())
    with pytest.raises(PerturbationError, match=r"^`perturb_blocks`: this network has no block 5 \(its blocks run "
                                                 r"0-2\); valid blocks are 0-2 "):
        perturbation("slg", [1, 5]).resolve(dit)
    with pytest.raises(PerturbationError, match="keeps its input's shape"):
        perturbation("slg", [min(set(edm2.edit_blocks("identity")) - set(edm2.edit_blocks("skip")))]).resolve(edm2)


@pytest.mark.parametrize("args,match", [
    (("pgg",), "unknown perturbation"),
    (("seg", None, 0), "`seg_sigma` must be > 0"),
    (("seg", None, "wide"), "`seg_sigma`: cannot parse"),
    (("pag", None, 2.0), "does not use it"),
    (("pag", "1,x"), "`perturb_blocks`: cannot parse"),
    (("pag", "-1"), ">= 0"),
])
def test_bad_values_are_refused_without_a_network(args, match):
    with pytest.raises(PerturbationError, match=match):
        perturbation(*args)


def test_network_refuses_bad_edits_itself(dit, edm2):
    x, t, y = _dit_inputs()
    with pytest.raises(ValueError, match="valid blocks are 0, 1, 2"):
        dit(x, t, y, edit=Perturbation("pag", (3,)))
    with pytest.raises(ValueError, match="unknown block edit"):
        edm2.edit_blocks("mean")


def test_edm2_weight_cache_serves_the_perturbed_pass(edm2):
    """The perturbed pass uses the cached inference weights of the plain pass (no re-normalisation), and the
    plain pass after it is the same, bit for bit."""
    from networks.edm2 import MPConv

    plain = _edm2_call(edm2)
    cached = {name: m.cached_weight(torch.float32) for name, m in edm2.named_modules()
              if isinstance(m, MPConv) and m.cached_weight(torch.float32) is not None}
    assert len(cached) > 10
    for kind in ("pag", "seg", "slg"):
        _edm2_call(edm2, Perturbation(kind).resolve(edm2))
    after = {name: m.cached_weight(torch.float32) for name, m in edm2.named_modules()
             if isinstance(m, MPConv) and m.cached_weight(torch.float32) is not None}
    assert after.keys() == cached.keys() and all(after[k] is cached[k] for k in cached)
    assert torch.equal(_edm2_call(edm2), plain)


# --------------------------------------------------------------------------------------------------
# In a guided denoiser.

def test_guided_pag_and_pag_swg_equations_and_counted_cost(dit):
    from guidance import guide
    from guidance.perturb import perturber

    x, t, y = _dit_inputs()
    den = DiTDenoiser(dit)
    with torch.no_grad():
        pos = den(x, t, y)
        pert = den(x, t, y, edit=perturbation("pag", [1]).resolve(dit))
        g = guide(den, "pag", 2.0, perturb=perturber(den, dit, ["pag"], blocks=[1]))
        g.begin_step(0)
        torch.testing.assert_close(g(x, t, y), pos + 2.0 * (pos - pert))
        assert g.cost()["evals_per_call"] == 2.0                  # D_pos and D_pag, each once
        both = guide(den, "pag-swg", (2.0, 0.5), perturb=perturber(den, dit, ["pag"], blocks=[1]),
                     window_size=6, window_steps=2, masked=False)
        swg = guide(den, "swg", 0.5, window_size=6, window_steps=2, masked=False)
        torch.testing.assert_close(both(x, t, y), swg(x, t, y) + 2.0 * (pos - pert), atol=1e-5, rtol=1e-5)
        assert both.cost()["evals_per_call"] == 2 + 4              # D_pos, D_pag, 2x2 windows


def test_guide_refuses_a_perturbation_method_without_its_pass(dit):
    from guidance import GuidanceError, guide

    with pytest.raises(GuidanceError, match="`perturb`"):
        guide(DiTDenoiser(dit), "seg-swg", (3.0, 0.2), window_size=6)
