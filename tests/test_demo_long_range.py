"""The long-range experiment: its dataset rule, the quadrant-consistency metric, and a tiny run of the demo."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest
import torch

from training.data import load_digits_images, load_quad_digits, quadrants, to_uint8
from utils.errors import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "demo"))

import long_range  # noqa: E402


# ----------------------------------------------------------------------------
# Dataset.

def test_quad_digits_obey_the_rule():
    """Every quadrant is one of the 16x16 training digits, of the image's class; the set is fixed by its seed."""
    x, y = load_quad_digits(64, seed=3)
    assert x.shape == (64, 1, 32, 32) and y.shape == (64,) and x.dtype == torch.float32
    digits, labels = load_digits_images(16, split="train")
    flat = digits.reshape(len(digits), -1)
    q = quadrants(x)                                                      # [64, 4, 1, 16, 16]
    for i in range(64):
        for j in range(4):
            match = (flat == q[i, j].reshape(1, -1)).all(dim=1).nonzero().flatten()
            assert len(match) >= 1, (i, j)
            assert (labels[match] == y[i]).all(), (i, j)
    # Quadrants are drawn independently: most images show four different samples of their class.
    distinct = [len({tuple(q[i, j].flatten().tolist()) for j in range(4)}) for i in range(64)]
    assert np.mean(np.asarray(distinct) == 4) > 0.9
    assert set(y.tolist()) == set(range(10))
    x2, y2 = load_quad_digits(64, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(load_quad_digits(64, seed=4)[0], x)


def test_quadrants_reading_order():
    x = torch.arange(2 * 1 * 4 * 4).reshape(2, 1, 4, 4)
    q = quadrants(x)
    assert torch.equal(q[1, 0, 0], x[1, 0, :2, :2]) and torch.equal(q[1, 1, 0], x[1, 0, :2, 2:])
    assert torch.equal(q[1, 2, 0], x[1, 0, 2:, :2]) and torch.equal(q[1, 3, 0], x[1, 0, 2:, 2:])
    assert np.array_equal(quadrants(x.numpy()), q.numpy())


# ----------------------------------------------------------------------------
# The consistency metric.

def test_consistency_on_labels():
    same = np.array([[3, 3, 3, 3], [0, 0, 0, 0]])
    mixed = np.array([[3, 3, 3, 4], [1, 0, 0, 0], [0, 1, 2, 3]])
    assert long_range.consistency(same) == 1.0
    assert long_range.consistency(mixed) == 0.0
    assert long_range.consistency(np.concatenate([same, mixed[:2]])) == 0.5
    probs = np.eye(10)[[7, 7, 7, 7, 1, 2, 1, 1]] * 0.9 + 0.01
    assert long_range.quadrant_labels(probs).tolist() == [[7, 7, 7, 7], [1, 2, 1, 1]]
    with pytest.raises(ValueError, match="4N"):
        long_range.quadrant_labels(np.ones((6, 10)))


def _grids(digits: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    """uint8 32x32 images whose quadrants are ``digits[idx[i, 0..3]]``."""
    q = digits[torch.from_numpy(idx)]
    img = torch.cat([torch.cat([q[:, 0], q[:, 1]], -1), torch.cat([q[:, 2], q[:, 3]], -1)], -2)
    return to_uint8(img).numpy()


def test_consistency_through_the_classifier():
    """Real held-out digits: four of one class -> 1, four different classes -> 0 (the classifier is 99% right)."""
    from metrics.refs import load_ref
    from networks.zoo import DEMO_REF

    digits, labels = load_digits_images(16, split="test")
    by_class = [np.flatnonzero(labels.numpy() == c) for c in range(10)]
    same = np.stack([by_class[c][[0, 1, 2, 3]] for c in (0, 1, 3, 4, 5, 6, 7, 9)])     # 8 images
    mixed = np.stack([[by_class[(c + j) % 10][j] for j in range(4)] for c in range(8)])  # classes c..c+3
    ref = load_ref(DEMO_REF)
    res_same = long_range.score_images(_grids(digits, same), ref, np.array([0, 1, 3, 4, 5, 6, 7, 9]))
    res_mixed = long_range.score_images(_grids(digits, mixed), ref)
    assert res_same["consistency"] == 1.0 and res_same["class_match"] == 1.0
    assert res_mixed["consistency"] == 0.0 and np.isnan(res_mixed["class_match"])
    assert 1 <= res_mixed["confidence"] <= 10 and np.isfinite(res_same["fd"])


def test_window_steps_overlap():
    for k in (4, 8, 12, 16, 20, 24, 28):
        n = long_range.window_steps(k)
        from guidance.windows import window_origins
        origins = window_origins(32, k, n)
        assert origins[0] == 0 and origins[-1] == 32 - k
        assert all(b - a <= k // 2 for a, b in zip(origins, origins[1:])), (k, origins)
    assert long_range.window_steps(32) == 1


# ----------------------------------------------------------------------------
# A tiny run through the real pipeline with the shipped models.

def test_tiny_long_range_run(tmp_path):
    chosen = [long_range.Row("uncond/none", "uncond"),
              long_range.Row("uncond/m-swg-k12-w1", "uncond", "swg", 1.0, window=12),
              long_range.Row("uncond/swg-k12-w1", "uncond", "swg", 1.0, window=12, masked=0),
              long_range.Row("cond/cfg-1", "cond", "cfg", 1.0, "uncond"),
              long_range.Row("cond/apg-1", "cond", "apg", 1.0, "uncond", params="eta=0,momentum=-0.5")]
    out = tmp_path / "lr"
    log = []
    table = long_range.run_long_range(out, num=4, steps=2, batch=3, chosen=chosen, log=log.append, progress=False)
    assert [r["method"] for r in table] == ["training data"] + [r.name for r in chosen]
    for r in table:
        assert 0 <= r["consistency"] <= 1 and 1 <= r["confidence"] <= 10 + 1e-9 and np.isfinite(r["fd"])
    assert np.isnan(table[1]["class_match"]) and 0 <= table[4]["class_match"] <= 1
    for row in chosen:
        assert sorted(p.name for p in (out / long_range.folder_name(row)).glob("*.png")) == \
            [f"{s:07d}.png" for s in range(4)]
    img = {r.name: long_range.read_images(out / long_range.folder_name(r), range(4)) for r in chosen}
    assert img["uncond/none"].shape == (4, 3, 32, 32)
    assert (img["uncond/none"] != img["uncond/m-swg-k12-w1"]).any()
    assert (img["uncond/m-swg-k12-w1"] != img["uncond/swg-k12-w1"]).any()
    assert (img["cond/cfg-1"] != img["cond/apg-1"]).any()   # APG's projection and momentum reach the sampler
    defaults = [r.name for r in long_range.default_rows(long_range.DEFAULT)]
    assert {"cond/apg-1", "cond/cfg-zero-1", "cond/slg-1"} <= set(defaults)
    for name in ("results.csv", "results.md", "results.png", "samples.png"):
        assert (out / name).stat().st_size > 100, name
    md = (out / "results.md").read_text()
    assert "| uncond/m-swg-k12-w1 | uncond | m-swg | 1 | 12 (5) |" in md
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {r.name for r in chosen} and all(t["images"] == 4 for t in timings.values())
    # The same settings again: the table is printed; other settings are refused with one line.
    log.clear()
    long_range.run_long_range(out, num=4, steps=2, chosen=chosen, log=log.append, progress=False)
    assert "nothing to do" in log[-1]
    with pytest.raises(UsageError, match="different settings"):
        long_range.run_long_range(out, num=4, steps=3, chosen=chosen, log=log.append, progress=False)


def test_cli_refuses_bad_windows(tmp_path):
    from click.testing import CliRunner

    r = CliRunner().invoke(long_range.main, ["--outdir", str(tmp_path / "x"), "--windows", "10"])
    assert r.exit_code == 2 and "divisible by 4" in r.output and not (tmp_path / "x").exists()
    r = CliRunner().invoke(long_range.main, ["--outdir", str(tmp_path / "x"), "--positives", "big"])
    assert r.exit_code == 2 and "unknown --positives big" in r.output
    for weights in ("nan", "0.5,inf"):  # was "`g_weight`: nan is not finite", naming no flag of this command
        r = CliRunner().invoke(long_range.main, ["--outdir", str(tmp_path / "x"), "--weights", weights])
        assert r.exit_code == 2 and "--weights: " in r.output and "not finite" in r.output and "`" not in r.output
        assert not (tmp_path / "x").exists()


def test_every_panel_has_a_legend(tmp_path, monkeypatch):
    """results.png: the consistency panels name their lines too, not only the FD panels (issue 23 #11)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def row(method, pos, g, weight="", window="", masked="", c=0.5, fd=20.0):
        return {"method": method, "positive": pos, "g_method": g, "weight": weight, "window": window,
                "masked": masked, "consistency": c, "fd": fd}

    table = [row("training data", "-", "-", c=1.0, fd=1.0)]
    for pos in ("cond", "uncond"):
        table += [row(f"{pos}/none", pos, "none"), row(f"{pos}/autoguidance-1", pos, "autoguidance", "1"),
                  row(f"{pos}/m-swg-k16-w1", pos, "m-swg", "1", 16, 1, 0.6, 18.0),
                  row(f"{pos}/swg-k16-w1", pos, "swg", "1", 16, 0, 0.55, 19.0)]
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    long_range.plot(table, tmp_path / "results.png")
    axes = figs[0].axes
    assert len(axes) == 4
    for ax in axes:
        assert ax.get_legend() is not None, ax.get_title()
        labels = {t.get_text() for t in ax.get_legend().get_texts()}
        assert {"M-SWG k=16", "SWG k=16", "autoguidance", "unguided", "training data"} <= labels
