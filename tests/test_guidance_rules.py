"""The composition model's rules against diffusers' guiders (an implementation nobody here wrote), by hand,
and the counted cost.

Weight conventions: the project writes ``D = D_pos + w * rule(D_pos, D_neg)``; diffusers' guiders take
``guidance_scale = 1 + w`` (``pred_uncond + s (pred_cond - pred_uncond)``), or ``guidance_scale = w`` with
``use_original_formulation=True`` (``pred_cond + s (pred_cond - pred_uncond)``).
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeGuidance,  # noqa: E402
                               ClassifierFreeZeroStarGuidance, TangentialClassifierFreeGuidance)

from guidance import GuidanceError, Evaluation, guide, method_spec  # noqa: E402
from guidance.rules import low_frequencies  # noqa: E402
from guidance.table import METHODS  # noqa: E402
from sampling.edm import edm_sampler  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)
torch.manual_seed(0)
POS = torch.randn(3, 4, 16, 16)
NEG = 0.8 * POS + 0.5 * torch.randn(3, 4, 16, 16)
X = torch.randn(3, 4, 16, 16)


def ours(method, weights, step=0, pos=POS, neg=NEG, **params):
    """The project's guider fed the two predictions (the positive and the negative network return them)."""
    guider = method_spec(method).make(weights, **params)
    return guider, guider(Evaluation(lambda x, s, c: pos, lambda x, s, c: neg, X, 1.0, None, step=step))


def theirs(guider, step=0, steps=10, pos=POS, neg=NEG):
    guider.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(999 - step))
    return guider.forward(pos, neg).pred


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_cfg_equals_diffusers(w):
    assert rel(ours("cfg", (w,))[1], theirs(ClassifierFreeGuidance(guidance_scale=1 + w))) <= 1e-6


@pytest.mark.parametrize("w", [0.5, 3.0])
def test_cfg_zero_star_equals_diffusers_including_zero_steps(w):
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=1 + w, zero_init_steps=2)
    mine = method_spec("cfg-zero").make((w,), zero_steps=2)
    for step in range(4):
        got = mine(Evaluation(lambda x, s, c: POS, lambda x, s, c: NEG, X, 1.0, None, step=step))
        want = theirs(guider, step)
        if step < 2:
            assert torch.equal(got, torch.zeros_like(POS)) and torch.equal(want, torch.zeros_like(POS))
        else:
            assert rel(got, want) <= 1e-6
    # The scale is per sample: s* = <pos, neg> / |neg|^2 by hand.
    s = (POS * NEG).flatten(1).sum(1) / (NEG * NEG).flatten(1).sum(1)
    torch.testing.assert_close(ours("cfg-zero", (w,), step=5)[1], POS + w * (POS - s[:, None, None, None] * NEG))


@pytest.mark.parametrize("eta,cap,beta", [(0.0, 0.0, 0.0), (0.3, 20.0, 0.0), (0.0, 15.0, -0.5), (1.0, 0.0, 0.25)])
def test_apg_equals_diffusers_paper_formulation_over_steps(eta, cap, beta):
    """APG as the paper writes it (anchor D_pos: diffusers' use_original_formulation=True, guidance_scale = w)."""
    w = 2.0
    ref = AdaptiveProjectedGuidance(guidance_scale=w, eta=eta, adaptive_projected_guidance_rescale=cap,
                                    adaptive_projected_guidance_momentum=beta or None,
                                    use_original_formulation=True)
    mine = method_spec("apg").make((w,), eta=eta, norm_threshold=cap, momentum=beta)
    for step in range(3):
        pos, neg = POS + 0.1 * step, NEG - 0.2 * step
        ref.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(999 - step))
        ref.prepare_inputs({})   # diffusers starts its momentum buffer at step 0
        assert (ref.momentum_buffer is not None) == bool(beta)
        got = mine(Evaluation(lambda x, s, c: pos, lambda x, s, c: neg, X, 1.0, None, step=step))
        assert rel(got, theirs(ref, step, pos=pos, neg=neg)) <= 1e-6


def test_apg_differs_from_diffusers_default_where_the_paper_says():
    """diffusers' default APG anchors at D_uncond: D_uncond + s u.  The paper anchors at D_pos: D_pos + (s - 1) u
    (u = d_orth + eta d_par).  They agree only when u = d (eta = 1, no cap); otherwise they differ by u - d."""
    w, d = 2.0, POS - NEG
    default = AdaptiveProjectedGuidance(guidance_scale=1 + w, eta=0.0, adaptive_projected_guidance_rescale=0.0)
    _, paper = ours("apg", (w,), eta=0.0)
    u = (paper - POS) / w
    torch.testing.assert_close(theirs(default) - paper, u - d, rtol=1e-5, atol=1e-5)
    assert float((u - d).abs().max()) > 0.1
    same = AdaptiveProjectedGuidance(guidance_scale=1 + w, eta=1.0, adaptive_projected_guidance_rescale=0.0)
    assert rel(ours("apg", (w,), eta=1.0)[1], theirs(same)) <= 1e-6


def test_apg_projection_by_hand():
    """eta = 0 keeps only the part of D_pos - D_neg orthogonal to D_pos: the guided update is orthogonal to D_pos."""
    _, out = ours("apg", (1.5,), eta=0.0)
    upd = (out - POS).flatten(1).double()
    cos = (upd * POS.flatten(1).double()).sum(1) / (upd.norm(dim=1) * POS.flatten(1).double().norm(dim=1))
    assert float(cos.abs().max()) < 1e-6


@pytest.mark.parametrize("w", [0.5, 4.0])
def test_tcfg_equals_diffusers(w):
    assert rel(ours("tcfg", (w,))[1], theirs(TangentialClassifierFreeGuidance(guidance_scale=1 + w))) <= 1e-6


@pytest.mark.parametrize("w_low,w_high", [(0.2, 2.0), (1.5, 0.5), (-0.5, 1.0)])
def test_fdg_equals_diffusers(w_low, w_high):
    pytest.importorskip("kornia")
    from diffusers.guiders import FrequencyDecoupledGuidance

    # diffusers lists the levels from high to low frequency.
    ref = FrequencyDecoupledGuidance(guidance_scales=[1 + w_high, 1 + w_low])
    assert rel(ours("fdg", (w_low, w_high))[1], theirs(ref)) <= 1e-6


def test_fdg_with_an_unguided_band_where_diffusers_fails():
    """w_low = 0 (low band unguided, scale 1 in diffusers): diffusers 0.42.1 puts the previous level's tensor in
    the skipped level's place and fails on the shapes; the paper's equation is D_pos + w_high H(D_pos - D_neg)."""
    pytest.importorskip("kornia")
    from diffusers.guiders import FrequencyDecoupledGuidance

    with pytest.raises(RuntimeError, match="size of tensor"):
        theirs(FrequencyDecoupledGuidance(guidance_scales=[3.0, 1.0]))
    d = POS - NEG
    torch.testing.assert_close(ours("fdg", (0.0, 2.0))[1], POS + 2.0 * (d - low_frequencies(d)))


def test_frequency_split_properties():
    """L keeps constants and removes the highest frequency (a checkerboard); L + H = identity."""
    const = torch.full((1, 2, 8, 12), 3.0)
    torch.testing.assert_close(low_frequencies(const), const)
    ii, jj = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((-1.0) ** (ii + jj))[None, None]
    assert float(low_frequencies(checker).abs().max()) < 0.1
    odd = torch.randn(2, 3, 9, 7)
    assert low_frequencies(odd).shape == odd.shape
    _, out = ours("fdg", (0.7, 0.7))
    torch.testing.assert_close(out, POS + 0.7 * (POS - NEG))  # equal band weights are CFG


def windowed(x, sigma, labels):
    return 0.5 * x + x.mean(dim=(1, 2, 3), keepdim=True) + torch.as_tensor(sigma).reshape(-1, 1, 1, 1)


def uncond(x, sigma, labels):
    return 0.3 * x - 0.1


@pytest.mark.parametrize("name", [n for n in METHODS if METHODS[n].base and n.endswith("-swg")
                                  and n not in ("wmg-swg", "cfg-swg")])
def test_every_pairing_is_its_method_plus_the_swg_term(name):
    spec = METHODS[name]
    base = METHODS[spec.base]
    ws = spec.example
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0])
    perturb = lambda kind: uncond  # noqa: E731  (stands for the perturbed pass of pag / seg / slg)
    paired = guide(windowed, name, ws, neg_denoiser=uncond, window_size=12, perturb=perturb)(x, sigma, None)
    alone = guide(windowed, spec.base, ws[:-1], neg_denoiser=uncond, perturb=perturb)(x, sigma, None)
    swg = guide(windowed, "swg", ws[-1], window_size=12)(x, sigma, None)
    pos = windowed(x, sigma, None)
    torch.testing.assert_close(paired, alone + (swg - pos), rtol=1e-5, atol=1e-5)
    assert base.negative == spec.negative and spec.windows


def test_sigma_interval_is_open_below_closed_above_per_term():
    """EDM2's guidance interval: a term is on where lo < sigma <= hi; the window term has its own."""
    x = torch.zeros(4, 1, 2, 2)
    sig = torch.tensor([0.999, 1.0, 2.0, 2.001])
    pos = lambda x, s, c: torch.ones_like(x)  # noqa: E731
    d = guide(pos, "cfg", 1.0, neg_denoiser=lambda x, s, c: torch.zeros_like(x), sigma_interval=(1.0, 2.0))
    assert d(x, sig, None)[:, 0, 0, 0].tolist() == [1.0, 1.0, 2.0, 1.0]
    win = lambda x, s, c: torch.ones_like(x) * x.shape[-1]  # noqa: E731  (windows see another width)
    d = guide(win, "cfg-swg", (1.0, 0.5), neg_denoiser=lambda x, s, c: torch.zeros_like(x), window_size=3,
              window_steps=2, masked=False, sigma_interval=(0.0, 1.5), swg_sigma_interval=(1.5, 10))
    out = guide(win, "none", None)(torch.zeros(4, 1, 4, 4), sig, None)[:, 0, 0, 0]
    got = d(torch.zeros(4, 1, 4, 4), sig, None)[:, 0, 0, 0]
    # pos = 4, uncond 0, windows 3: cfg adds 4 below 1.5, the window term adds 0.5 above it.
    assert got.tolist() == [8.0, 8.0, 4.5, 4.5] and out.tolist() == [4.0] * 4
    with pytest.raises(GuidanceError, match="lo < hi"):
        guide(pos, "cfg", 1.0, neg_denoiser=pos, sigma_interval=(2.0, 1.0))
    with pytest.raises(GuidanceError, match="has no window term|has none"):
        guide(pos, "cfg", 1.0, neg_denoiser=pos, swg_sigma_interval=(0.1, 1.0))


class Net:
    """Counts the samples it sees (the independent count of network evaluations)."""

    def __init__(self):
        self.samples = 0

    def __call__(self, x, sigma, labels):
        self.samples += x.shape[0]
        return 0.9 * x


@pytest.mark.parametrize("method,weights,win", [("none", None, None), ("cfg", 1.0, None), ("swg", 0.5, 12),
                                                ("fdg-swg", (0.1, 0.5, 0.2), 12), ("apg", 1.0, None)])
def test_counted_evaluations_per_step(method, weights, win):
    pos, neg = Net(), Net()
    d = guide(pos, method, weights, neg_denoiser=neg, window_size=win, window_steps=2)
    steps, n = 4, 2
    edm_sampler(d, torch.randn(n, 3, 16, 16), num_steps=steps)
    total = pos.samples + neg.samples
    cost = d.cost()
    assert cost["evals_per_step"] == pytest.approx(total / (n * steps), abs=1e-3)
    assert cost["evals_per_call"] == pytest.approx(total / (n * (2 * steps - 1)), abs=1e-3)
    per_call = {"none": 1, "cfg": 2, "swg": 5, "fdg-swg": 6, "apg": 2}[method]
    assert cost["evals_per_call"] == per_call
    area = 4 * 144 / 256 if win else 0.0
    assert cost["cost_per_call"] == pytest.approx(per_call - (4 - area if win else 0), abs=1e-3)


def test_outside_the_interval_only_the_positive_is_counted():
    pos, neg = Net(), Net()
    d = guide(pos, "cfg", 1.0, neg_denoiser=neg, sigma_interval=(0.0, 1.0))
    d(torch.zeros(2, 1, 4, 4), torch.tensor(5.0), None)
    assert neg.samples == 0 and d.cost()["evals_per_call"] == 1


def test_unknown_method_and_parameter_messages():
    with pytest.raises(GuidanceError, match="did you mean apg"):
        method_spec("apgg")
    with pytest.raises(GuidanceError, match="has no parameter eta"):
        guide(lambda x, s, c: x, "cfg", 1.0, neg_denoiser=lambda x, s, c: x, eta=0.5)
    with pytest.raises(GuidanceError, match="`zero_steps` of method cfg-zero must be an integer"):
        guide(lambda x, s, c: x, "cfg-zero", 1.0, neg_denoiser=lambda x, s, c: x, zero_steps=1.5)


def test_cfg_zero_still_prediction_for_an_edm_denoiser():
    """With ``still = x`` (EDM's D = x: zero ODE velocity) the first steps leave the sample where it is."""
    d = guide(lambda x, s, c: 0.5 * x, "cfg-zero", 1.0, neg_denoiser=lambda x, s, c: 0.2 * x, zero_steps=1,
              still=lambda x: x)
    d.begin_step(0)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(d(x, torch.tensor(3.0), None), x)
    d.begin_step(1)
    assert not torch.allclose(d(x, torch.tensor(3.0), None), x)


def test_apg_momentum_is_per_sampler_step():
    """Both Heun calls of a step use the previous step's running sum; a step index going back restarts it."""
    from guidance.rules import APG

    rule = APG(eta=1.0, momentum=-0.5)          # eta 1, no cap: the rule returns the running sum itself
    d = [torch.full((1, 1, 2, 2), v) for v in (4.0, 2.0, 3.0, 1.0)]
    pos = torch.ones(1, 1, 2, 2)
    assert float(rule(pos, pos - d[0], step=0).mean()) == pytest.approx(4.0)
    assert float(rule(pos, pos - d[0], step=0).mean()) == pytest.approx(4.0)          # same step: no d_prev yet
    assert float(rule(pos, pos - d[1], step=1).mean()) == pytest.approx(2.0 - 0.5 * 4.0)
    assert float(rule(pos, pos - d[2], step=1).mean()) == pytest.approx(3.0 - 0.5 * 4.0)  # not - 0.5 * 0.0
    assert float(rule(pos, pos - d[3], step=2).mean()) == pytest.approx(1.0 - 0.5 * 1.0)  # the step's last sum
    assert float(rule(pos, pos - d[1], step=0).mean()) == pytest.approx(2.0)          # a new trajectory
