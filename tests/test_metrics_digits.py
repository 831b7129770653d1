"""The demo's digit classifier as a metrics detector: fd_digits and conf_digits through metrics.api and the CLI."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from metrics import api
from metrics import detectors as D
from training.data import load_digits_images, to_uint8
from metrics.digits import DEFAULT_REF, DigitsDetector, confidence_score
from training.eval_denoiser import frechet_to_ref, load_ref_pickle
from utils.errors import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def held_out():
    """The 300 held-out digits as uint8 NHWC (never used for the models or the reference)."""
    x, y = load_digits_images(16, split="test")
    return to_uint8(x).permute(0, 2, 3, 1).numpy(), y.numpy()


def test_loader_registers_the_shipped_classifier():
    D.clear_cache()
    det = D.get_detector("digits", "cpu")
    assert isinstance(det, DigitsDetector) and det.feature_dim == 128 and det.name == "digits"
    assert D.get_detector("digits", "cpu") is det  # cached
    assert api.METRICS["fd_digits"] == api.MetricSpec("digits", "features", "fd", 2) and api.STAT_KEYS["digits"] == "fd_digits"
    with pytest.raises(UsageError, match="digit classifier not found"):
        D.get_detector("digits", "cpu", weights="/nonexistent/classifier.safetensors")


def test_fd_and_confidence_match_an_independent_computation(held_out):
    images, labels = held_out
    ref = load_ref_pickle()
    got = api.calc_metrics([images[:150], images[150:]], "fd_digits,conf_digits", ref_path=str(DEFAULT_REF),
                           device="cpu", progress=False)
    det = DigitsDetector()
    nchw = images.transpose(0, 3, 1, 2)
    feats, probs = det.features(nchw), det.probs(nchw)
    # Independent: np.cov + eigenvalues of the product, and the IS formula with an epsilon.
    assert got["fd_digits"] == pytest.approx(frechet_to_ref(feats, ref), rel=1e-6)
    assert got["conf_digits"] == pytest.approx(confidence_score(probs), rel=1e-9)
    assert got["num_images"] == 300
    # Real held-out digits: close to the training statistics, confidently and evenly classified.
    assert (probs.argmax(1) == labels).mean() > 0.95 and got["conf_digits"] > 9.0
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    bad = api.calc_metrics([noise], ["fd_digits", "conf_digits"], ref=ref, device="cpu", progress=False)
    assert bad["fd_digits"] > 10 * got["fd_digits"] and bad["conf_digits"] < got["conf_digits"] - 3


def test_conf_needs_no_reference_and_fd_needs_its_block(held_out):
    images, _ = held_out
    res = api.calc_metrics([images[:20]], "conf_digits", device="cpu", progress=False)
    assert 1.0 <= res["conf_digits"] <= 10.0 and "fd_digits" not in res
    with pytest.raises(UsageError, match="no 'fd_digits' statistics"):
        api.calc_metrics([images[:20]], "fd_digits", ref={"num_images": 5, "fid": {"mu": np.zeros(3),
                                                                                    "sigma": np.eye(3)}},
                         device="cpu", progress=False)


def test_cli_calc_on_a_png_folder_from_another_directory(tmp_path, held_out):
    images, _ = held_out
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(images[:40]):
        Image.fromarray(im[..., 0], mode="L").save(folder / f"{i:06d}.png")
    cmd = [sys.executable, "-m", "metrics", "calc", "--images", str(folder), "--ref",
           str(REPO / "demo" / "refs" / "digits-ref.pkl"), "--metrics", "fd_digits,conf_digits", "--device", "cpu"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # Grey PNGs are read back as RGB; the detector averages the equal channels exactly.
    expect = api.calc_metrics([images[:40]], "fd_digits,conf_digits", ref_path=str(DEFAULT_REF), device="cpu",
                              progress=False)
    assert got["num_images"] == 40
    assert got["fd_digits"] == pytest.approx(expect["fd_digits"], rel=1e-6)  # 40 < 128: singular covariance
    assert got["conf_digits"] == pytest.approx(expect["conf_digits"], rel=1e-9)


def test_rgb_input_of_grey_images_scores_exactly_like_grey():
    det = DigitsDetector()
    x = torch.randint(0, 256, (12, 1, 16, 16), dtype=torch.uint8)
    a, b = det(x), det(x.repeat(1, 3, 1, 1))
    assert torch.equal(a["features"], b["features"]) and torch.equal(a["probs"], b["probs"])


def test_the_shipped_reference_records_its_resolution(held_out):
    """The digits reference says it was made from 16x16 images, so images of another size are refused against it
    (a new-user trial scored 64 px DiT images against it without a word)."""
    from metrics.refs import load_ref
    from training.train_classifier import reference_stats

    assert load_ref(str(DEFAULT_REF))["resolution"] == [16, 16]
    images, _ = held_out
    big = np.repeat(np.repeat(images[:8], 2, axis=1), 2, axis=2)  # 32x32
    with pytest.raises(UsageError, match="was made from 16x16 images but these images are 32x32"):
        api.calc_metrics([big], "fd_digits", ref_path=str(DEFAULT_REF), device="cpu", progress=False)
    ref = reference_stats(DigitsDetector(), torch.as_tensor(images[:8]).permute(0, 3, 1, 2).contiguous())
    assert ref["resolution"] == [16, 16]  # what training/train_classifier.py writes now
