"""Guidance equations against hand computations, intervals, the quirks option, errors."""

from __future__ import annotations

import pytest
import torch

from guidance import GuidanceError, WindowError, WindowGrid, guide, sliding_window_predict
from sampling.edm import edm_sampler

torch.manual_seed(0)
X = torch.randn(2, 3, 16, 16)
SIGMA = torch.tensor([0.7, 4.0])
LABELS = torch.eye(4)[[1, 3]]


def local_pos(x, sigma, labels):
    """Per-pixel denoiser: windows cannot change its prediction."""
    lab = 0 if labels is None else labels.argmax(1).float().reshape(-1, 1, 1, 1)
    return torch.tanh(x) / (1 + torch.as_tensor(sigma).reshape(-1, 1, 1, 1)) + 0.1 * lab


def global_pos(x, sigma, labels):
    """Depends on the whole input (its mean) and on the labels: windows see something else."""
    lab = torch.zeros(x.shape[0], 1, 1, 1) if labels is None else (labels.argmax(1).float() + 1).reshape(-1, 1, 1, 1)
    return 0.5 * x + x.mean(dim=(1, 2, 3), keepdim=True) * lab + torch.as_tensor(sigma).reshape(-1, 1, 1, 1)


def weak(x, sigma, labels):
    lab = 0 if labels is None else labels.sum(1).reshape(-1, 1, 1, 1)
    return 0.3 * x - 0.2 * lab


def windows(f, k=12, n=2, labels=LABELS):
    return sliding_window_predict(f, X, SIGMA, labels, WindowGrid.create(16, 16, k, n))


@pytest.mark.parametrize("method,weight,extra", [
    ("swg", 0.7, {}), ("swg", 1.3, {"masked": False}),
    ("wmg-swg", (1.2, 0.25), {}), ("cfg-swg", (0.3, 0.3), {}),
    ("wmg-swg", (1.2, 0.25), {"reference_quirks": True}), ("cfg-swg", (0.3, 0.5), {"reference_quirks": True}),
])
def test_local_denoiser_makes_swg_a_no_op(method, weight, extra):
    """With a per-pixel denoiser D_win = D_pos, so every SWG term vanishes."""
    pos = local_pos
    if method == "cfg-swg" and extra.get("reference_quirks"):
        # The quirk drops the windows' labels: the no-op only holds for a label-free denoiser.
        pos = lambda x, sigma, labels: local_pos(x, sigma, None)
    d = guide(pos, method, weight, neg_denoiser=weak, window_size=12, window_steps=2, **extra)
    base = {"swg": "none", "wmg-swg": "wmg", "cfg-swg": "cfg"}[method]
    ref = guide(pos, base, weight[0] if isinstance(weight, tuple) else None, neg_denoiser=weak)
    torch.testing.assert_close(d(X, SIGMA, LABELS), ref(X, SIGMA, LABELS), rtol=1e-6, atol=1e-6)


def test_swg_equations_by_hand():
    pos = global_pos(X, SIGMA, LABELS)
    win, count = windows(global_pos)
    mask = (count > 1).float()
    assert (mask == 0).any() and (mask == 1).any()
    for masked, m in ((True, mask), (False, 1.0)):
        got = guide(global_pos, "swg", 0.7, window_size=12, masked=masked)(X, SIGMA, LABELS)
        torch.testing.assert_close(got, pos + 0.7 * m * (pos - win))


def test_cfg_and_wmg_by_hand():
    pos = global_pos(X, SIGMA, LABELS)
    got = guide(global_pos, "cfg", 1.5, neg_denoiser=weak)(X, SIGMA, LABELS)
    torch.testing.assert_close(got, pos + 1.5 * (pos - weak(X, SIGMA, None)))
    got = guide(global_pos, "wmg", 0.4, neg_denoiser=weak)(X, SIGMA, LABELS)
    torch.testing.assert_close(got, pos + 0.4 * (pos - weak(X, SIGMA, LABELS)))


@pytest.mark.parametrize("quirks", [False, True])
def test_combinations_by_hand(quirks):
    pos = global_pos(X, SIGMA, LABELS)
    win_lab, count = windows(global_pos)
    win_nolab, _ = windows(global_pos, labels=None)
    m = torch.ones_like(count) if quirks else (count > 1).float()
    got = guide(global_pos, "wmg-swg", (1.2, 0.25), neg_denoiser=weak, window_size=12,
                reference_quirks=quirks)(X, SIGMA, LABELS)
    torch.testing.assert_close(got, pos + 1.2 * (pos - weak(X, SIGMA, LABELS)) + 0.25 * m * (pos - win_lab))
    got = guide(global_pos, "cfg_swg", (0.3, 0.6), neg_denoiser=weak, window_size=12,
                reference_quirks=quirks)(X, SIGMA, LABELS)
    win = win_nolab if quirks else win_lab
    torch.testing.assert_close(got, pos + 0.3 * (pos - weak(X, SIGMA, None)) + 0.6 * m * (pos - win))


def test_clean_option_differs_exactly_where_documented():
    kw = dict(neg_denoiser=weak, window_size=12, masked=True)
    _, count = windows(global_pos)
    single = (count == 1).expand_as(X)
    # wmg-swg: only the mask differs, so outputs agree where windows overlap and differ where they do not.
    a = guide(global_pos, "wmg-swg", (1.0, 0.5), reference_quirks=True, **kw)(X, SIGMA, LABELS)
    b = guide(global_pos, "wmg-swg", (1.0, 0.5), reference_quirks=False, **kw)(X, SIGMA, LABELS)
    torch.testing.assert_close(a[~single], b[~single])
    assert (a[single] - b[single]).abs().min() > 0
    # Unmasked wmg-swg: the quirk changes nothing.
    a = guide(global_pos, "wmg-swg", (1.0, 0.5), reference_quirks=True, **{**kw, "masked": False})(X, SIGMA, LABELS)
    b = guide(global_pos, "wmg-swg", (1.0, 0.5), reference_quirks=False, **{**kw, "masked": False})(X, SIGMA, LABELS)
    torch.testing.assert_close(a, b)
    # cfg-swg unmasked: only the labels of the windows differ.
    a = guide(global_pos, "cfg-swg", (0.3, 0.5), reference_quirks=True, **{**kw, "masked": False})(X, SIGMA, LABELS)
    b = guide(global_pos, "cfg-swg", (0.3, 0.5), reference_quirks=False, **{**kw, "masked": False})(X, SIGMA, LABELS)
    win_lab, _ = windows(global_pos)
    win_nolab, _ = windows(global_pos, labels=None)
    torch.testing.assert_close(b - a, 0.5 * (win_nolab - win_lab))


def test_channels_restriction():
    pos = global_pos(X, SIGMA, LABELS)
    got = guide(global_pos, "cfg", 2.0, neg_denoiser=weak, channels=slice(0, 2))(X, SIGMA, LABELS)
    torch.testing.assert_close(got[:, 2:], pos[:, 2:])
    torch.testing.assert_close(got[:, :2], (pos + 2.0 * (pos - weak(X, SIGMA, None)))[:, :2])


class Recorder:
    def __init__(self):
        self.sigmas = []

    def __call__(self, x, sigma, labels):
        self.sigmas.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return torch.zeros_like(x)


def test_step_interval_boundaries():
    neg = Recorder()
    pos_sigmas = Recorder()
    d = guide(pos_sigmas, "cfg", 1.0, neg_denoiser=neg, steps=(1, 2))
    edm_sampler(d, torch.randn(1, 1, 4, 4), num_steps=5)
    # Steps 1 and 2, each with an Euler evaluation and a correction: 4 of the 9 evaluations.
    assert len(pos_sigmas.sigmas) == 9
    assert neg.sigmas == pos_sigmas.sigmas[2:6]


def test_sigma_interval_boundaries_inclusive_and_per_sample():
    neg_calls = Recorder()
    d = guide(lambda x, s, c: torch.ones_like(x), "cfg", 1.0, neg_denoiser=lambda x, s, c: torch.zeros_like(x),
              sigma_range=(1.0, 2.0))
    x = torch.zeros(4, 1, 2, 2)
    out = d(x, torch.tensor([0.999, 1.0, 2.0, 2.001]), None)
    assert out[:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0, 1.0]
    d = guide(lambda x, s, c: torch.ones_like(x), "cfg", 1.0, neg_denoiser=neg_calls, sigma_range=(1.0, 2.0))
    d(x, torch.tensor(5.0), None)
    assert neg_calls.sigmas == []  # outside the interval no negative is evaluated


def test_outside_interval_returns_positive_not_none():
    d = guide(global_pos, "swg", 0.5, window_size=12, sigma_range=(10, 20))
    torch.testing.assert_close(d(X, SIGMA, LABELS), global_pos(X, SIGMA, LABELS))


def test_max_window_batch_caps_calls():
    sizes = []
    def f(x, s, c):
        sizes.append(x.shape[0])
        return global_pos(x, s, c)
    a = guide(f, "swg", 0.5, window_size=8, window_steps=3, max_window_batch=4)(X, SIGMA, LABELS)
    assert max(sizes[1:]) <= 4 and sum(sizes[1:]) == 2 * 9
    sizes.clear()
    b = guide(f, "swg", 0.5, window_size=8, window_steps=3)(X, SIGMA, LABELS)
    assert sizes == [2, 18]  # positive, then all windows of the batch in one call
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(method="mswg2", weight=0.1), GuidanceError, "unknown `method` 'mswg2'; did you mean swg"),
    (dict(method="wmg-swg", weight=0.1, neg_denoiser=weak, window_size=8), GuidanceError, "2 weight"),
    (dict(method="swg", weight=(0.1, 0.2), window_size=8), GuidanceError, "1 weight"),
    (dict(method="wmg", weight=0.1), GuidanceError, "negative network"),
    (dict(method="cfg-swg", weight=(0.1, 0.2), window_size=8), GuidanceError, "unconditional"),
    (dict(method="swg", weight=0.1), GuidanceError, "window size"),
    (dict(method="swg", weight=0.1, window_size=0), WindowError, "positive"),
    (dict(method="swg", weight=0.1, window_size=8, window_steps=0), WindowError, "at least one"),
    (dict(method="swg", weight=0.1, window_size=8, steps=(3, 1)), GuidanceError, "first <= last"),
])
def test_bad_configurations(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        guide(global_pos, **kwargs)


def test_window_larger_than_input_fails_at_call():
    d = guide(global_pos, "swg", 0.5, window_size=20)
    with pytest.raises(WindowError, match="exceeds"):
        d(X, SIGMA, LABELS)


@pytest.mark.parametrize("method,weight,neg,expect_evals", [
    ("cfg-swg", (0.4, 0.0), weak, 2),      # no window term: D_pos and D_uncond only
    ("cfg-swg", (0.0, 0.5), weak, 1 + 4),  # no CFG term: D_pos and the 4 windows
    ("swg", 0.0, None, 1),                 # plain sampling
    ("wmg-swg", (0.0, 0.0), weak, 1),
])
def test_zero_weight_terms_are_not_evaluated_and_add_nothing(method, weight, neg, expect_evals):
    calls = []

    def pos(x, sigma, labels):
        calls.append(x.shape[0])
        return global_pos(x, sigma, labels)

    d = guide(pos, method, weight, neg_denoiser=neg, window_size=12, window_steps=2, masked=True)
    out = d(X, SIGMA, LABELS)
    ws = weight if isinstance(weight, tuple) else (weight,)
    expect = global_pos(X, SIGMA, LABELS)
    if method == "cfg-swg" and ws[0]:
        expect = expect + ws[0] * (expect - weak(X, SIGMA, None))
    if method == "cfg-swg" and ws[1]:
        win, count = windows(global_pos)
        expect = expect + ws[1] * (count > 1) * (global_pos(X, SIGMA, LABELS) - win)
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)
    assert d.cost()["evals_per_call"] == expect_evals
