"""ADM's evaluation (FID, sFID, IS, precision, recall against an ADM reference batch), KID and
density/coverage, checked against implementations nobody here wrote: torch-fidelity (the
TF-port Inception's layer, KID, precision/recall) and ``prdc`` (density/coverage)."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

from metrics import api, detectors, images as images_mod
from metrics.cli import main as cli
from metrics.detectors import InceptionDetector
from metrics.inception import InceptionV3
from metrics.scores import density_coverage, kernel_distance, precision_recall
from tests.tiny_detectors import TinyInception as InceptionStandIn

# Inception stand-in with 32-d features and a 24-d sFID-like spatial output.
TinyInception = functools.partial(InceptionStandIn, dim=32, seed=5, sharpness=4, spatial_dim=24)


@pytest.fixture(autouse=True)
def tiny_detectors(monkeypatch):
    calls = []

    def load(device, **kw):
        calls.append(kw)
        return TinyInception()

    monkeypatch.setitem(detectors.LOADERS, "inception", load)
    detectors.clear_cache()
    yield calls
    detectors.clear_cache()


def make_images(n, seed, size=16, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, size, size, 3)) * scale).astype(np.uint8)


def write_folder(root, imgs):
    root.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(imgs):
        PIL.Image.fromarray(a).save(root / f"{i:06d}.png")
    return root


def run_cli(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def one_error_line(code, out, err, pattern):
    lines = [l for l in re.split(r"[\r\n]", err) if l.strip()]
    assert code == 2 and not out and len(lines) == 1, (code, out, err)
    assert lines[0].startswith("error:") and re.search(pattern, lines[0]), lines[0]


def rows16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float64)


# ---------------------------------------------------------------------------- parity

def test_spatial_tap_equals_torch_fidelity_tf_port_inception(tmp_path):
    """sFID's tap (mixed_6/conv, first 7 channels, NHWC) == torch-fidelity's Inception at Mixed_6d.branch1x1."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    net = InceptionV3()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.05)
    net.eval()
    torch.save(net.state_dict(), tmp_path / "inception.pth")  # our own random weights, written here
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                         feature_extractor_weights_path=str(tmp_path / "inception.pth"))
    tapped = {}
    theirs.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: tapped.__setitem__("x", o.clone()))
    x = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8, generator=g)
    ours = InceptionDetector(net)(x)
    (pool3,) = theirs(x)
    expect = tapped["x"][:, :7].permute(0, 2, 3, 1).reshape(3, -1)  # TF's NHWC flattening, as ADM
    assert ours["spatial"].shape == (3, 2023) and float(expect.std()) > 0.1
    assert float((ours["spatial"] - expect).abs().max()) <= 1e-5 * float(expect.abs().max())
    assert float((ours["features"] - pool3).abs().max()) <= 1e-5 * float(pool3.abs().max())


def test_kid_equals_torch_fidelity():
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    rng = np.random.default_rng(0)
    fake, real = rows16(rng.standard_normal((70, 12)) + 0.3), rows16(rng.standard_normal((55, 12)))
    mean, std = kernel_distance(fake, real, subsets=25, subset_size=40, seed=7)
    theirs = kid_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), kid_subsets=25,
                                    kid_subset_size=40, rng_seed=7, verbose=False)
    assert mean == pytest.approx(theirs[KEY_METRIC_KID_MEAN], rel=1e-9)
    assert std == pytest.approx(theirs[KEY_METRIC_KID_STD], rel=1e-9)
    assert mean > 0.01  # shifted distributions: clearly positive


def test_precision_recall_equals_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(1)
    for shift in (0.0, 0.7):
        fake, real = rows16(rng.standard_normal((60, 8)) + shift), rows16(rng.standard_normal((45, 8)))
        p, r = precision_recall(real, fake, k=3)
        theirs = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=3,
                                        prc_batch_size=10000, save_cpu_ram=False, verbose=False)
        # the same counts; torch-fidelity averages the 0/1 flags in float32 (hence ~1e-8 apart)
        assert round(p * 60) == round(theirs["precision"] * 60) and round(r * 45) == round(theirs["recall"] * 45)
        assert (p, r) == pytest.approx((theirs["precision"], theirs["recall"]), rel=1e-6)


def test_density_coverage_equal_prdc(capsys):
    from prdc import compute_prdc

    rng = np.random.default_rng(2)
    for shift in (0.0, 0.5):
        real, fake = rows16(rng.standard_normal((50, 6))), rows16(rng.standard_normal((40, 6)) + shift)
        density, coverage = density_coverage(real, fake, k=5)
        theirs = compute_prdc(real, fake, nearest_k=5)
        assert density == pytest.approx(float(theirs["density"]), rel=1e-12)
        assert coverage == pytest.approx(float(theirs["coverage"]), rel=1e-12)
    capsys.readouterr()  # prdc prints the set sizes


# ---------------------------------------------------------------------------- ADM reference batches

@pytest.fixture
def folders(tmp_path):
    real = write_folder(tmp_path / "real", make_images(24, 1))
    gen = write_folder(tmp_path / "gen", make_images(20, 2, scale=0.8))
    return real, gen


def test_ref_writes_adm_layout_and_calc_prints_the_five_numbers(tmp_path, folders, tiny_detectors):
    real, gen = folders
    code, out, err = run_cli("ref", "--images", real, "--dest", tmp_path / "adm.npz", "--features", 16)
    assert code == 0, err
    with np.load(tmp_path / "adm.npz") as npz:
        assert sorted(npz.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        arr, mu, sigma, mu_s, sigma_s = (npz[k] for k in ("arr_0", "mu", "sigma", "mu_s", "sigma_s"))
    assert arr.dtype == np.uint8 and arr.shape == (16, 16, 16, 3) and mu.shape == (32,) and sigma_s.shape == (24, 24)
    # statistics of all 24 images (independent: numpy on the stand-in's outputs)
    imgs = np.stack([np.asarray(PIL.Image.open(p)) for p in sorted(real.glob("*.png"))])
    outs = TinyInception()(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    for key_mu, key_sigma, name in ((mu, sigma, "features"), (mu_s, sigma_s, "spatial")):
        f = outs[name].double().numpy()
        np.testing.assert_allclose(key_mu, f.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(key_sigma, np.cov(f, rowvar=False), rtol=1e-6, atol=1e-9)
    # arr_0 holds 16 of the 24 images, unchanged
    assert all(any(np.array_equal(a, b) for b in imgs) for a in arr)

    code, out, err = run_cli("calc", gen, "--ref", tmp_path / "adm.npz", "--metrics", "fid,sfid,is,pr")
    assert code == 0, err
    got = json.loads(out)
    assert set(got) == {"fid", "sfid", "is", "is_std", "precision_inception", "recall_inception", "num_images"}
    # independent: the FD formula with scipy's sqrtm on the generated images' stand-in outputs
    gimgs = np.stack([np.asarray(PIL.Image.open(p)) for p in sorted(gen.glob("*.png"))])
    gouts = TinyInception()(torch.from_numpy(gimgs).permute(0, 3, 1, 2))
    for name, (m2, s2), key in (("features", (mu, sigma), "fid"), ("spatial", (mu_s, sigma_s), "sfid")):
        f = gouts[name].double().numpy()
        m1, s1 = f.mean(0), np.cov(f, rowvar=False)
        fd = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
        assert got[key] == pytest.approx(fd, rel=1e-5)
    # precision/recall: against the arr_0 images' rows (float16), as torch-fidelity counts them
    p, r = precision_recall(rows16(outs["features"][[int(np.flatnonzero([np.array_equal(a, b) for b in imgs])[0])
                                                     for a in arr]]), rows16(gouts["features"]), k=3)
    assert (got["precision_inception"], got["recall_inception"]) == (p, r)
    # 'adm' is the same five numbers
    code, out2, err = run_cli("calc", gen, "--ref", tmp_path / "adm.npz", "--metrics", "adm")
    assert code == 0 and json.loads(out2) == got, err


def test_reference_rows_are_computed_once_and_cached(tmp_path, folders, tiny_detectors, monkeypatch):
    real, gen = folders
    assert run_cli("ref", "--images", real, "--dest", tmp_path / "adm.npz")[0] == 0
    seen = []
    original = images_mod.NpzSource.load
    monkeypatch.setattr(images_mod.NpzSource, "load", lambda self, i: seen.append(i) or original(self, i))
    first = api.calc_metrics(gen, "pr,kid,dc", ref_path=tmp_path / "adm.npz", progress=False)
    assert len(seen) == 24  # arr_0 read once
    from utils.cache import cache_dir
    files = sorted((cache_dir() / "ref-features").glob("*.npy"))
    assert len(files) == 1 and files[0].name.endswith("-fid.npy")
    second = api.calc_metrics(gen, "pr,kid,dc", ref_path=tmp_path / "adm.npz", progress=False)
    assert len(seen) == 24 and second == first  # from the cache
    # the cache is what is used: other rows there give other numbers
    np.save(files[0], np.load(files[0]) + np.float16(3))
    assert api.calc_metrics(gen, "kid", ref_path=tmp_path / "adm.npz", progress=False)["kid_inception"] \
        != first["kid_inception"]


def test_kid_and_density_coverage_through_the_api(tmp_path, folders, capsys):
    from prdc import compute_prdc
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    real, gen = folders
    got = api.calc_metrics(gen, "kid,dc", ref_path=real, progress=False)
    assert set(got) == {"kid_inception", "kid_inception_std", "density_inception", "coverage_inception",
                        "num_images"}
    load = lambda folder: TinyInception()(torch.from_numpy(np.stack(
        [np.asarray(PIL.Image.open(p)) for p in sorted(folder.glob("*.png"))])).permute(0, 3, 1, 2))["features"]
    fr, ff = rows16(load(real)), rows16(load(gen))
    kid = kid_features_to_metric(torch.from_numpy(ff), torch.from_numpy(fr), kid_subsets=100, kid_subset_size=20,
                                 rng_seed=2020, verbose=False)  # 20 = the smaller set (torch-fidelity would refuse 1000)
    assert got["kid_inception"] == pytest.approx(kid[KEY_METRIC_KID_MEAN], rel=1e-6)
    theirs = compute_prdc(fr, ff, nearest_k=5)
    capsys.readouterr()
    assert got["density_inception"] == pytest.approx(float(theirs["density"]), rel=1e-12)
    assert got["coverage_inception"] == pytest.approx(float(theirs["coverage"]), rel=1e-12)


def test_wrong_npz_is_one_line_before_any_image_is_read(tmp_path, folders, monkeypatch):
    real, gen = folders
    def no_reading(self, index):
        raise AssertionError("an image was read")
    monkeypatch.setattr(images_mod.FolderSource, "read_bytes", no_reading)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "fid_only.npz", mu=rng.standard_normal(32), sigma=np.eye(32))
    one_error_line(*run_cli("calc", gen, "--ref", tmp_path / "fid_only.npz", "--metrics", "fid,sfid,is,pr"),
                   r"has keys mu, sigma; sfid needs mu_s, sigma_s \(ADM reference batch layout")
    np.savez(tmp_path / "no_images.npz", mu=rng.standard_normal(32), sigma=np.eye(32), mu_s=np.zeros(24),
             sigma_s=np.eye(24))
    one_error_line(*run_cli("calc", gen, "--ref", tmp_path / "no_images.npz", "--metrics", "adm"),
                   r"has keys mu, mu_s, sigma, sigma_s; pr_inception needs arr_0")
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(2))
    one_error_line(*run_cli("calc", gen, "--ref", tmp_path / "other.npz", "--metrics", "fid"),
                   r"has keys images, labels; a reference \.npz needs ADM's layout")
    one_error_line(*run_cli("calc", gen, "--ref", tmp_path / "no_images.npz", "--metrics", "fd_dinov2"),
                   r"fd_dinov2 needs 'fd_dinov2' statistics, which only a reference pickle holds")


def test_dits_table_from_a_finished_run_folder(tmp_path, folders):
    """One command gives a DiT run's five ADM numbers, into the run's metrics file; results.collect shows them."""
    from results import collect
    from tests.test_results_collect import dit_run

    real, gen = folders
    run = dit_run(tmp_path / "samples", {"fid": 9.9, "num_images": 20},
                  **{"--cfg-crop": 1, "--mask": 1, "--g-scale": 0.6, "--num-fid-samples": 20})
    for png in sorted(gen.glob("*.png")):  # the run's images (as the sampler names them)
        (run / png.name).write_bytes(png.read_bytes())
    assert run_cli("ref", "--images", real, "--dest", tmp_path / "adm.npz")[0] == 0
    code, out, err = run_cli("calc", run, "--ref", tmp_path / "adm.npz", "--metrics", "adm", "--out", run)
    assert code == 0, err
    five = json.loads(out)
    saved = json.loads((run / "metrics-1.json").read_text())["results"]
    assert saved == five and (run / "metrics.json").exists()  # the sampler's own file is kept
    rows = collect.collect(tmp_path / "samples")
    assert len(rows) == 1 and rows[0]["sfid"] == five["sfid"] and rows[0]["N"] == 20
    table = collect.to_markdown(rows)
    head = table.splitlines()[0]
    for column in ("FID", "sFID", "IS", "precision", "recall"):
        assert f" {column} |" in head, head
    assert f"{five['precision_inception']:.3f}" in table and f"{five['sfid']:.2f}" in table
