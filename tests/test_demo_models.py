"""Shipped demo models (digits), their training recipe, the digit detector and its reference statistics."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from networks.edm2_pickle import load_checkpoint
from training.data import load_digits_images, one_hot, to_uint8
from metrics.digits import DEFAULT_CLASSIFIER, DEFAULT_REF, DigitsDetector, confidence_score
from training.eval_denoiser import evaluate, frechet_to_ref, load_ref_pickle, sample_digits
from training.train_classifier import accuracy
from training.train_edm2 import PowerEMA, TrainConfig, ema_exponent, learning_rate, train

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = REPO / "demo" / "models"
ROLES = {"digits-cond": 10, "digits-uncond": 0, "digits-rt": 10, "digits-rct": 10}


@pytest.fixture(scope="module")
def detector():
    return DigitsDetector(DEFAULT_CLASSIFIER)


@pytest.fixture(scope="module")
def ref():
    return load_ref_pickle(DEFAULT_REF)


def _net(name):
    return load_checkpoint(MODELS / f"{name}.safetensors").net


# ----------------------------------------------------------------------------
# Shipped files.

@pytest.mark.parametrize("name,label_dim", sorted(ROLES.items()))
def test_shipped_model_loads(name, label_dim):
    path = MODELS / f"{name}.safetensors"
    assert path.stat().st_size < 3 << 20
    meta = json.loads(path.with_suffix(".json").read_text())
    net = _net(name)
    assert net.label_dim == label_dim and net.img_resolution == 16 and net.img_channels == 1
    assert meta["other"]["training"]["seed"] in (0, 1, 2)
    x = torch.randn(2, 1, 16, 16)
    labels = one_hot(torch.tensor([3, 7])) if label_dim else None
    out = net(x, torch.tensor([1.0, 1.0]), labels)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_reduced_models_match_their_recipe():
    cond = json.loads((MODELS / "digits-cond.json").read_text())["other"]["training"]
    rt = json.loads((MODELS / "digits-rt.json").read_text())["other"]["training"]
    rct = json.loads((MODELS / "digits-rct.json").read_text())["other"]["training"]
    assert rt["snapshot_step"] * 16 == cond["steps"] == cond["snapshot_step"]
    assert rct["steps"] * 16 == cond["steps"] and rct["model_channels"] < cond["model_channels"]
    n = lambda name: sum(p.numel() for p in _net(name).parameters())
    assert n("digits-rct") < n("digits-cond") / 3


# ----------------------------------------------------------------------------
# Samples are digits of the requested class.

def test_conditional_samples_are_recognised(detector, ref):
    net = _net("digits-cond")
    images, classes = sample_digits(lambda x, s, l: net(x, s, l), 40, seed=0, num_steps=12)
    res = evaluate(images, classes, detector, ref)
    assert res["class_match"] > 0.7          # chance is 0.1
    assert res["confidence"] > 5.0           # IS-like score lies in [1, 10]
    # Noise sent through the same evaluation is far from the digits.
    noise = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8)
    assert frechet_to_ref(detector.features(noise), ref) > 2 * res["fd"]


def test_unconditional_samples_cover_digits(detector):
    net = _net("digits-uncond")
    images, _ = sample_digits(lambda x, s, l: net(x, s, l), 32, seed=100, num_steps=12, label_dim=0)
    probs = detector.probs(images)
    assert probs.max(1).mean() > 0.7
    assert len(np.unique(probs.argmax(1))) >= 6


# ----------------------------------------------------------------------------
# Detector and reference statistics.

def test_classifier_heldout_accuracy():
    x, y = load_digits_images(16, split="test")
    assert accuracy(DigitsDetector().net, x, y) >= 0.95


def test_reference_layout_and_values(detector, ref):
    assert ref["num_images"] == 1497
    mu, sigma = ref["fd_digits"]["mu"], ref["fd_digits"]["sigma"]
    assert mu.shape == (128,) and sigma.shape == (128, 128)
    np.testing.assert_allclose(sigma, sigma.T, atol=1e-10)
    x, _ = load_digits_images(16, split="train")
    feats = detector.features(to_uint8(x))
    np.testing.assert_allclose(feats.mean(0), mu, rtol=1e-4, atol=1e-5)
    assert abs(frechet_to_ref(feats, ref)) < 1e-3
    shifted = feats + 0.5
    assert frechet_to_ref(shifted, ref) == pytest.approx(0.25 * 128, rel=1e-3)


def test_detector_interface_shapes(detector):
    x, _ = load_digits_images(16, split="test")
    u8 = to_uint8(x[:5])
    out = detector(u8)
    assert out["features"].shape == (5, 128) and out["probs"].shape == (5, 10)
    np.testing.assert_allclose(out["probs"].sum(1).numpy(), 1, rtol=1e-9)
    up = torch.nn.functional.interpolate(u8.float(), size=32, mode="nearest").to(torch.uint8).repeat(1, 3, 1, 1)
    assert (detector.probs(up).argmax(1) == detector.probs(u8).argmax(1)).all()


def test_confidence_score_limits():
    assert confidence_score(np.eye(10)) == pytest.approx(10)
    assert confidence_score(np.full((7, 10), 0.1)) == pytest.approx(1)
    assert confidence_score(np.eye(10)[[0, 0, 1, 1]]) == pytest.approx(2)


# ----------------------------------------------------------------------------
# Training recipe.

def test_learning_rate_schedule():
    assert learning_rate(0, 128, 1e-2, 100, 0) == 1e-2
    assert learning_rate(400 * 128, 128, 1e-2, 100, 0) == pytest.approx(1e-2 / 2)
    assert learning_rate(1000, 128, 1e-2, 0, 2.0) == pytest.approx(1e-2 / 2)


def test_ema_exponent_matches_relative_width():
    for std in (0.05, 0.1, 0.2):
        g = ema_exponent(std)
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(std, rel=1e-9)
    net = torch.nn.Linear(2, 1)
    ema = PowerEMA(net, 0.1)
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.net.weight.clone()
    ema.update(net, cur_nimg=1000, batch=100)
    beta = 0.9 ** (ema.gamma + 1)
    torch.testing.assert_close(ema.net.weight, beta * before + (1 - beta) * net.weight)


def test_training_loss_decreases():
    cfg = TrainConfig(model_channels=8, channel_mult=(1, 2), batch=32, steps=40, rampup_kimg=0.1, seed=3, threads=1)
    x, y = load_digits_images(16, split="train")
    losses = train(cfg, data=(x[:256], y[:256]))["losses"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2


def test_train_cli_writes_loadable_checkpoint_and_never_overwrites(tmp_path):
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "training.train_edm2", "--out", str(out), "--steps", "3", "--batch", "8",
           "--model-channels", "8", "--channel-mult", "1,2", "--threads", "1", "--snapshot", f"2:{tmp_path / 'snap'}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(out.with_suffix(".safetensors"))
    assert ckpt.net.label_dim == 10
    assert (tmp_path / "snap.safetensors").is_file()
    before = out.with_suffix(".safetensors").read_bytes()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert out.with_suffix(".safetensors").read_bytes() == before
    r = subprocess.run(cmd[:5] + ["--channel-mult", "1,x"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "--channel-mult" in r.stderr
