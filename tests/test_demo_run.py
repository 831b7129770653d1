"""The offline demo end to end at a reduced count: every kind of guidance, results table, plot, no overwrite."""

from __future__ import annotations

import csv
import pathlib
import subprocess
import sys

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "demo"))

import run_demo  # noqa: E402

# Unguided, plain SWG, M-SWG and both combinations (they exercise the cfg / wmg negatives too).
ROWS = "none,swg,m-swg,wmg-swg-RCT,cfg-swg"


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, str(REPO / "demo" / "run_demo.py"), "--outdir", str(out), "--num", "4", "--steps", "2",
           "--methods", ROWS]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["method"] for row in rows] == ROWS.split(",")
    for row in rows:
        assert len(list((out / row["method"]).glob("*.png"))) == 4
        assert np.isfinite(float(row["fd"])) and 1.0 <= float(row["confidence"]) <= 10.0 + 1e-9
    assert (out / "results.png").stat().st_size > 1000
    assert "| m-swg | swg | 0.2 |" in (out / "results.md").read_text()
    # Guidance changes the images; plain SWG and M-SWG differ only in the mask.
    none, swg = run_demo.read_images(out / "none", range(4)), run_demo.read_images(out / "swg", range(4))
    assert none.shape[0] == 4 and none.shape[2:] == (16, 16) and (none != swg).any()
    # A finished table is never overwritten.
    before = (out / "results.csv").read_bytes()
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (out / "results.csv").read_bytes() == before
    r = subprocess.run(cmd[:4] + ["--methods", "nope"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown --methods" in r.stderr


def test_requested_classes_match_sampler_labels():
    """The demo's class bookkeeping reproduces the labels the EDM2 pipeline draws per seed."""
    from sampling.edm2_run import _make_labels
    from sampling.seeds import StackedRandomGenerator

    seeds = [5, 0, 17, 3]
    rnd = StackedRandomGenerator("cpu", seeds)
    rnd.randn([4, 1, 16, 16])
    labels = _make_labels(rnd, 10, None, 4, "cpu")
    assert (labels.argmax(1).numpy() == run_demo.requested_classes(seeds)).all()
    assert torch.allclose(labels.sum(1), torch.ones(4))
