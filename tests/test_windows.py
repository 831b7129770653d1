"""Window geometry: coverage, bounds, reference origins, errors (property-based)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance import WindowError, WindowGrid, sliding_window_predict, window_origins


@st.composite
def axis(draw):
    size = draw(st.integers(1, 96))
    k = draw(st.integers(1, size))
    n_min = 1 if k == size else -(-(size - k) // k) + 1  # fewest windows that can cover
    n = draw(st.integers(max(n_min, 1), min(max(n_min, 1) + 6, size - k + 1)))  # at most the distinct positions
    return size, k, n


@given(axis())
@settings(max_examples=300, deadline=None)
def test_origins_cover_and_stay_in_bounds(a):
    size, k, n = a
    origins = window_origins(size, k, n)
    assert len(origins) == n
    assert origins[0] == 0 and origins[-1] == size - k
    assert origins == sorted(origins)
    covered = torch.zeros(size)
    for o in origins:
        assert 0 <= o <= size - k
        covered[o:o + k] += 1
    assert (covered >= 1).all()


@given(st.integers(1, 64), st.integers(2, 8), st.integers(1, 16))  # stride 0 repeats a position: refused
@settings(max_examples=300, deadline=None)
def test_reference_origins_when_divisible(k, n, stride):
    stride = min(stride, k)  # windows touch or overlap: the reference covers the image
    size = k + (n - 1) * stride
    assert window_origins(size, k, n) == [i * ((size - k) // (n - 1)) for i in range(n)]


@given(st.integers(2, 64), st.data())
@settings(max_examples=200, deadline=None)
def test_too_few_windows_refused(size, data):
    k = data.draw(st.integers(1, size - 1))
    n = data.draw(st.integers(1, max(1, -(-(size - k) // k))))  # one fewer than needed to cover
    with pytest.raises(WindowError):
        window_origins(size, k, n)


@pytest.mark.parametrize("size,k,n,match", [(16, 17, 2, "exceeds"), (16, 0, 2, "positive"), (16, -3, 2, "positive"),
                                            (16, 8, 0, "at least one"), (16, 12, 1, "cannot cover"),
                                            (16, 4, 2, "gaps")])
def test_bad_configurations(size, k, n, match):
    with pytest.raises(WindowError, match=match):
        window_origins(size, k, n)


@given(st.integers(1, 64), st.data())
@settings(max_examples=200, deadline=None)
def test_at_most_one_window_per_distinct_position(size, data):
    """Up to ``size - k + 1`` windows every origin is distinct; one more is refused, naming that maximum."""
    k = data.draw(st.integers(1, size))
    positions = size - k + 1
    lo = 1 if k == size else -(-(size - k) // k) + 1
    origins = window_origins(size, k, positions) if positions >= lo else None
    if origins is not None:
        assert len(set(origins)) == positions == len(origins)
    extra = data.draw(st.integers(positions + 1, positions + 200))
    with pytest.raises(WindowError) as e:
        window_origins(size, k, extra)
    assert f"`window_steps` <= {positions}" in str(e.value) and "\n" not in str(e.value)


def test_too_many_windows_named_per_command_line(tmp_path, capsys):
    """12x12 windows on 16x16 have 5 positions per axis; DiT-XL/2 at 256 px: 24 on a 32 latent, 9 positions.

    The refusal is one line naming each command line's flag and the maximum, before anything is written
    (the EDM2 flag ``--swg_steps`` is covered by tests/test_edm2_cli.py's ``window-repeats`` case).
    """
    from sampling.dit_flags import main as dit_main

    with pytest.raises(WindowError, match="<= 5"):
        WindowGrid.create(16, 16, 12, (2, 100))
    assert WindowGrid.create(16, 16, 12, 5).xs == (0, 1, 2, 3, 4)
    out = tmp_path / "dit"
    capsys.readouterr()
    assert dit_main(["--image-size", "256", "--crop", "1", "--g-scale", "0.5", "--window-size", "24",
                     "--window-steps", "30", "--sample-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--window-steps <= 9" in err
    assert not out.exists()


def test_error_is_one_line_with_a_fix():
    with pytest.raises(WindowError) as e:
        window_origins(32, 40, 2)
    assert "\n" not in str(e.value) and "`window_size`" in str(e.value)  # the parameter; each CLI names its flag


@given(st.integers(4, 40), st.integers(4, 40), st.data())
@settings(max_examples=100, deadline=None)
def test_non_square_grid_count(h, w, data):
    kh, kw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    lo_h = 1 if kh == h else -(-(h - kh) // kh) + 1
    lo_w = 1 if kw == w else -(-(w - kw) // kw) + 1
    nh = data.draw(st.integers(lo_h, min(lo_h + 4, h - kh + 1)))  # at most the distinct positions
    nw = data.draw(st.integers(lo_w, min(lo_w + 4, w - kw + 1)))
    grid = WindowGrid.create(h, w, (kh, kw), (nh, nw))
    count = grid.count()
    assert count.shape == (h, w) and (count >= 1).all()
    assert count.sum().item() == grid.num_windows * kh * kw


def test_spread_origins_when_not_divisible():
    # 16 - 10 = 6 is not divisible by 5 windows - 1: the reference leaves pixels uncovered.
    ref = [i * ((16 - 10) // 4) for i in range(5)]
    assert ref[-1] + 10 < 16
    assert window_origins(16, 10, 5) == [0, 1, 3, 4, 6]


def test_sliding_window_identity_on_local_function():
    """A per-pixel function gives the same result on windows as on the whole image."""
    x = torch.randn(2, 3, 12, 20)
    f = lambda x, sigma, labels: torch.tanh(x) * sigma.reshape(-1, 1, 1, 1) + 2
    sigma = torch.tensor([0.5, 3.0])
    grid = WindowGrid.create(12, 20, (8, 12), (2, 3))
    pred, count = sliding_window_predict(f, x, sigma, None, grid, max_batch=5)
    torch.testing.assert_close(pred, f(x, sigma, None))
    assert count.shape == (1, 1, 12, 20)


def test_windows_see_only_their_crop():
    """Each window is processed on its own: a function of the window mean reveals the crop."""
    x = torch.arange(16.0).repeat(16, 1)[None, None]  # value = column index
    f = lambda x, sigma, labels: x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    grid = WindowGrid.create(16, 16, (16, 8), (1, 2))
    pred, _ = sliding_window_predict(f, x, torch.tensor(1.0), None, grid)
    assert pred[0, 0, 0, 0].item() == pytest.approx(3.5)   # window 0..7
    assert pred[0, 0, 0, 15].item() == pytest.approx(11.5)  # window 8..15
