"""``sample_edm2.py --preset demo-digits*`` runs the shipped digits models from any working directory."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_sample_edm2_with_demo_presets_from_another_directory(tmp_path):
    for preset, method in (("demo-digits", "swg"), ("demo-digits-rct-mswg", "wmg-swg")):
        out = tmp_path / preset
        cmd = [sys.executable, str(REPO / "sample_edm2.py"), "--preset", preset, "--outdir", str(out),
               "--seeds", "0-3", "--steps", "2", "--batch", "4"]
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        pngs = sorted(out.glob("*.png"))
        assert [p.name for p in pngs] == [f"{s:07d}.png" for s in range(4)]
        args = json.loads((out / "settings.json").read_text())
        assert args["g_method"] == method and args["swg_sizes"] == [12]
        assert args["net_pos_pkl"] == str(REPO / "demo" / "models" / "digits-cond.safetensors")
        assert args["ref_path"] == str(REPO / "demo" / "refs" / "digits-ref.pkl")
    # Same seeds, same positive network: M-SWG and its combination with RCT give different images.
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "demo-digits" / "0000000.png"))
    b = np.asarray(Image.open(tmp_path / "demo-digits-rct-mswg" / "0000000.png"))
    assert a.shape[:2] == (16, 16) and (a != b).any()


def test_demo_preset_fills_metrics_and_reference(tmp_path):
    """``--preset demo-digits`` computes fd_digits against the shipped reference; conf_digits needs none."""
    out = tmp_path / "m"
    cmd = [sys.executable, str(REPO / "sample_edm2.py"), "--preset", "demo-digits", "--outdir", str(out),
           "--seeds", "0-15", "--steps", "4"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((out / "metrics.json").read_text())["results"]
    assert saved["num_images"] == 16 and np.isfinite(saved["fd_digits"]) and saved["fd_digits"] > 0
    from metrics.api import calc_metrics
    from sampling.writer import ImageIndex

    expect = calc_metrics(ImageIndex(out).batches(list(range(16))), "fd_digits",
                          ref_path=str(REPO / "demo" / "refs" / "digits-ref.pkl"), device="cpu", progress=False)
    assert saved["fd_digits"] == expect["fd_digits"] or abs(saved["fd_digits"] / expect["fd_digits"] - 1) < 1e-6
    r = subprocess.run([sys.executable, str(REPO / "sample_edm2.py"), "--net_pos_pkl", "demo-digits-cond",
                        "--outdir", str(tmp_path / "c"), "--seeds", "0-9", "--steps", "4", "--metrics", "conf_digits"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 1.0 <= json.loads(r.stdout.strip().splitlines()[-1])["conf_digits"] <= 10.0
