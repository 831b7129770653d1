"""metrics.api and the ``python -m metrics`` CLI on synthetic images with tiny detectors."""

import functools
import io
import json
import os
import pickle
import re
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from metrics import api, detectors, dinov2
from metrics.cli import main as cli
from metrics.detectors import DINOv2Detector
from metrics.scores import saturation_sum
from tests.tiny_detectors import TinyInception as InceptionStandIn
from utils.errors import UsageError


# Inception stand-in: 64-d features (cheap FD), 1008 probabilities.
TinyInception = functools.partial(InceptionStandIn, dim=64, seed=0, sharpness=4)


def tiny_dinov2():
    torch.manual_seed(3)
    return DINOv2Detector(dinov2.build_dinov2(embed_dim=16, depth=1, num_heads=2).eval())


@pytest.fixture(autouse=True)
def tiny_detectors(monkeypatch):
    monkeypatch.setitem(detectors.LOADERS, "inception", lambda device, **kw: TinyInception())
    monkeypatch.setitem(detectors.LOADERS, "dinov2", lambda device, **kw: tiny_dinov2())
    detectors.clear_cache()
    yield
    detectors.clear_cache()


def make_images(n, seed, size=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def png_bytes(a):
    buf = io.BytesIO()
    PIL.Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root, imgs, per_dir=5):
    for i, a in enumerate(imgs):
        d = root / f"{i // per_dir * per_dir:06d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:07d}.png").write_bytes(png_bytes(a))
    return root


def run_cli(*args):
    """(exit code, stdout, stderr) of the CLI run in-process."""
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def test_sources_agree_and_saturation(tmp_path):
    imgs = make_images(12, 0)
    folder = write_folder(tmp_path / "folder", imgs)
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i, a in enumerate(imgs):
            data = png_bytes(a)
            info = tarfile.TarInfo(f"{i:07d}.png"); info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for i, a in enumerate(imgs):
            zf.writestr(f"x/{i:07d}.png", png_bytes(a))
    np.savez(tmp_path / "samples.npz", imgs)
    shards = tmp_path / "shards"; shards.mkdir()
    os.replace(tmp_path / "shard.tar", shards / "000000.tar")
    expect = api.compute_stats(iter([imgs[:7], imgs[7:]]), ["inception"], saturation=True, progress=False)
    sat = saturation_sum(torch.from_numpy(imgs).permute(0, 3, 1, 2)) / 12
    assert expect["saturation"] == pytest.approx(sat)
    for src in (folder, shards, tmp_path / "imgs.zip", tmp_path / "samples.npz"):
        got = api.compute_stats(src, ["inception"], saturation=True, batch=5, progress=False)
        assert got["num_images"] == 12
        # float32 features: batch composition changes the last bits of the matmul.
        np.testing.assert_allclose(got["fid"]["mu"], expect["fid"]["mu"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["fid"]["sigma"], expect["fid"]["sigma"], rtol=1e-5, atol=1e-5)
        assert got["saturation"] == pytest.approx(sat)


def test_ref_then_calc_cli(tmp_path):
    gen = write_folder(tmp_path / "gen", make_images(20, 1))
    other = write_folder(tmp_path / "other", make_images(20, 2) // 2)
    ref = tmp_path / "ref.pkl"
    code, out, err = run_cli("ref", "--images", gen, "--dest", ref, "--features", 20)
    assert code == 0, err
    with open(ref, "rb") as f:
        stored = pickle.load(f)
    assert stored["num_images"] == 20 and stored["fid"]["mu"].shape == (64,)
    assert stored["fd_dinov2"]["sigma"].shape == (16, 16) and stored["fid"]["features"].shape == (20, 64)

    metrics = "fid,fd_dinov2,is,saturation,pr_inception,pr_dinov2"
    code, out, err = run_cli("calc", "--images", gen, "--ref", ref, "--metrics", metrics, "--out", tmp_path / "run")
    assert code == 0, err
    same = json.loads(out)
    assert abs(same["fid"]) < 1e-6 * np.trace(stored["fid"]["sigma"])
    assert abs(same["fd_dinov2"]) < 1e-6 * np.trace(stored["fd_dinov2"]["sigma"])
    assert same["precision_inception"] == 1.0 and same["recall_dinov2"] == 1.0
    assert same["is"] >= 1.0 and 0 < same["saturation"] < 1 and same["num_images"] == 20
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["results"]["fid"] == same["fid"]

    diff = api.calc_metrics(other, "fid,fd_dinov2", ref_path=ref, progress=False)
    direct = api.calc_metrics(other, "fid", ref_path=gen, progress=False)  # ref given as images
    assert diff["fid"] > 1.0 and diff["fd_dinov2"] > 0
    assert direct["fid"] == pytest.approx(diff["fid"], rel=1e-9)

    # --num picks a seeded subset: same seed -> same subset, other seed -> other subset.
    a = api.calc_metrics(other, "fid", ref_path=ref, num=10, seed=1, progress=False)
    b = api.calc_metrics(other, "fid", ref_path=ref, num=10, seed=1, progress=False)
    c = api.calc_metrics(other, "fid", ref_path=ref, num=10, seed=2, progress=False)
    assert a == b and a["num_images"] == 10 and a["fid"] != c["fid"]


def one_error_line(code, out, err, pattern):
    """Exit 2, nothing on stdout, one 'error: ...' line on stderr (progress-bar redraws aside)."""
    lines = [l for l in re.split(r"[\r\n]", err) if l.strip() and not re.match(r"^\S*( images)?:\s+\d+%", l)]
    assert code == 2 and not out and len(lines) == 1, (code, out, err)
    assert lines[0].startswith("error:") and pattern in lines[0], lines[0]
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    gen = write_folder(tmp_path / "gen", make_images(6, 3))
    ref = tmp_path / "ref.pkl"
    one_error_line(*run_cli("calc", "--images", gen, "--ref", tmp_path / "none.pkl"), "not found")
    one_error_line(*run_cli("calc", "--images", tmp_path / "nowhere", "--ref", ref), "images not found")
    one_error_line(*run_cli("calc", "--images", gen, "--ref", ref, "--metrics", "fid,kidd"), "unknown metric 'kidd'")
    with open(ref, "wb") as f:
        pickle.dump({"num_images": 9, "fid": {"mu": np.zeros(1000), "sigma": np.eye(1000)}}, f)
    one_error_line(*run_cli("calc", "--images", gen, "--ref", ref, "--metrics", "fid"), "1000 features")
    one_error_line(*run_cli("calc", "--images", gen, "--ref", ref, "--metrics", "fd_dinov2"), "no 'fd_dinov2'")
    one_error_line(*run_cli("calc", "--images", gen, "--ref", ref, "--metrics", "fid", "--num", 50),
                   "asked for 50 images but only 6")
    one_error_line(*run_cli("calc", "--images", gen, "--metrics", "is"), "needs at least 10 images")
    one_error_line(*run_cli("ref", "--images", gen, "--dest", ref), "already exists")
    (gen / "000000" / "0000002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    one_error_line(*run_cli("ref", "--images", gen, "--dest", tmp_path / "new.pkl", "--metrics", "fid"), "0000002.png")
    assert not (tmp_path / "new.pkl").exists()


def test_write_metrics_keeps_earlier_results(tmp_path):
    j1, c1 = api.write_metrics(tmp_path, {"fid": 2.5, "num_images": 10}, {"g_weight": [1.2, 0.1], "seeds": "0-9"})
    j2, c2 = api.write_metrics(tmp_path, {"fid": 3.0, "num_images": 10}, {"seeds": "0-9"})
    assert j1.name == "metrics.json" and c1.name == "metrics.csv" and j2.name == "metrics-1.json"
    assert json.loads(j1.read_text())["results"]["fid"] == 2.5
    rows = c1.read_text().strip().splitlines()
    assert rows[0] == "g_weight,seeds,fid,num_images" and rows[1] == '"[1.2, 0.1]",0-9,2.5,10'


def _dist_worker(rank, store, folder, out):
    import torch.distributed as tdist
    detectors.LOADERS["inception"] = lambda device, **kw: TinyInception()
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        st = api.compute_stats(folder, ["inception"], probs=True, saturation=True, keep_features=True,
                               batch=3, device="cpu", progress=False)
        if rank == 0:
            with open(out, "wb") as f:
                pickle.dump(st, f)
    finally:
        tdist.destroy_process_group()


def test_two_ranks_equal_one(tmp_path):
    folder = write_folder(tmp_path / "imgs", make_images(11, 4))
    single = api.compute_stats(folder, ["inception"], probs=True, saturation=True, keep_features=True,
                               batch=3, progress=False)
    torch.multiprocessing.spawn(_dist_worker, args=(str(tmp_path / "store"), str(folder), str(tmp_path / "r.pkl")),
                                nprocs=2, join=True)
    with open(tmp_path / "r.pkl", "rb") as f:
        multi = pickle.load(f)
    assert multi["num_images"] == 11
    np.testing.assert_allclose(multi["fid"]["mu"], single["fid"]["mu"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(multi["fid"]["sigma"], single["fid"]["sigma"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(multi["fid"]["features"], single["fid"]["features"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(multi["probs"], single["probs"], rtol=1e-5, atol=1e-8)
    assert multi["saturation"] == pytest.approx(single["saturation"], rel=1e-12)


def test_unwritable_out_or_dest_refused_before_any_work(tmp_path, monkeypatch):
    from metrics import cli as metrics_cli

    def no_work(*a, **k):
        raise AssertionError("computed before checking the output folder")

    monkeypatch.setattr(metrics_cli, "calc_metrics", no_work)
    monkeypatch.setattr(metrics_cli, "compute_stats", no_work)
    gen = write_folder(tmp_path / "gen", make_images(6, 3))
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    one_error_line(*run_cli("calc", "--images", gen, "--ref", gen, "--metrics", "fid", "--out", blocker / "run"),
                   f"cannot write {blocker / 'run'}: ")
    one_error_line(*run_cli("calc", "--images", gen, "--ref", gen, "--metrics", "fid", "--out", "/proc/swg-test"),
                   "cannot write /proc/swg-test: ")
    one_error_line(*run_cli("ref", "--images", gen, "--dest", blocker / "sub" / "ref.pkl", "--metrics", "fid"),
                   "choose another --dest")
    assert blocker.read_text() == "keep"
    # A bad input found after the output check leaves no empty output folder behind.
    monkeypatch.undo()
    one_error_line(*run_cli("calc", "--images", tmp_path / "nowhere", "--ref", gen, "--out", tmp_path / "o" / "run"),
                   "images not found")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_without_gpu_is_one_line(tmp_path):
    gen = write_folder(tmp_path / "gen", make_images(6, 3))
    one_error_line(*run_cli("calc", "--images", gen, "--ref", gen, "--device", "cuda"), "--device cuda: no CUDA GPU")
    one_error_line(*run_cli("ref", "--images", gen, "--dest", tmp_path / "r.pkl", "--device", "gpu0"),
                   "--device 'gpu0' is not a device")
    assert not (tmp_path / "r.pkl").exists()


# ----------------------------------------------------------------------------
# What a new user met in a fresh-clone trial of 'python -m metrics' (each: one line, exit 2).

def test_missing_statistics_name_the_metric_asked_for_and_what_it_reads(tmp_path):
    gen = write_folder(tmp_path / "gen", make_images(6, 3))
    ref = tmp_path / "ref.pkl"
    with open(ref, "wb") as f:  # FD-DINOv2 statistics only: no Inception block, no feature rows
        pickle.dump({"num_images": 9, "fd_dinov2": {"mu": np.zeros(16), "sigma": np.eye(16)}}, f)
    line = one_error_line(*run_cli("calc", gen, "--ref", ref, "--metrics", "kid"), "kid_inception (kid) needs")
    assert "Inception feature rows" in line and "'fid' statistics" not in line, line
    assert "'fd_dinov2' (mu, sigma)" in line and "--metrics fid --features" in line, line
    line = one_error_line(*run_cli("calc", gen, "--ref", ref, "--metrics", "kid_dinov2"), "kid_dinov2 needs")
    assert "DINOv2 feature rows" in line and "--metrics fd_dinov2 --features" in line, line
    # A --save_stats file without rows: the same words.
    stats = tmp_path / "stats.pkl"
    with open(stats, "wb") as f:
        pickle.dump({"num_images": 9, "fid": {"mu": np.zeros(64), "sigma": np.eye(64)}}, f)
    line = one_error_line(*run_cli("calc", stats, "--ref", ref, "--metrics", "kid"), "kid_inception (kid) needs")
    assert "Inception feature rows" in line, line


def test_too_few_images_is_worded_as_a_sentence(tmp_path):
    gen = write_folder(tmp_path / "gen", make_images(6, 3))
    line = one_error_line(*run_cli("calc", gen, "--metrics", "is"), "metric 'is' needs at least 10 images, found 6")
    assert "is need " not in line
    line = one_error_line(*run_cli("calc", gen, "--metrics", "is,saturation"),
                          "metric 'is' needs at least 10 images, found 6")  # saturation needs 2: not named
    with pytest.raises(UsageError, match="metric 'is' needs at least 10 images, the run makes 4"):
        api.check_image_count(["is"], 4)
    with pytest.raises(UsageError, match="^`metrics`: metric 'is' needs at least 10 images, the run makes 4; sample "
                                         "at least 10 images or drop is$"):
        api.check_image_count(["fid", "is"], 4)
    with pytest.raises(UsageError, match=r"metrics 'pr_inception', 'is' need more images \(pr_inception: 4, is: "
                                         r"10\), the run makes 3; sample at least 10 images or drop pr_inception, is"):
        api.check_image_count(["fid", "pr_inception", "is"], 3)


def test_missing_images_named_the_way_they_were_given(tmp_path):
    line = one_error_line(*run_cli("calc", tmp_path / "nowhere", "--metrics", "saturation"), "images not found")
    assert "as IMAGES" in line and "--images" not in line, line
    line = one_error_line(*run_cli("calc", "--images", tmp_path / "nowhere", "--metrics", "saturation"),
                          "images not found")
    assert "as --images" in line, line
    line = one_error_line(*run_cli("calc", "--metrics", "saturation"), "no images given")
    assert "calc IMAGES" in line and "--images" not in line, line


def test_ref_takes_the_images_positionally_as_calc_does(tmp_path):
    """`metrics ref FOLDER --dest F` (was click's "Missing option '--images'"); --images still works, the same stats."""
    gen = write_folder(tmp_path / "gen", make_images(6, 3))
    code, out, err = run_cli("ref", gen, "--dest", tmp_path / "pos.pkl", "--metrics", "fid")
    assert code == 0, err
    code, out, err = run_cli("ref", "--images", gen, "--dest", tmp_path / "flag.pkl", "--metrics", "fid")
    assert code == 0, err
    pos, flag = api.load_ref(tmp_path / "pos.pkl"), api.load_ref(tmp_path / "flag.pkl")
    assert pos["num_images"] == flag["num_images"] == 6
    assert np.array_equal(pos["fid"]["mu"], flag["fid"]["mu"]) and np.array_equal(pos["fid"]["sigma"], flag["fid"]["sigma"])
    line = one_error_line(*run_cli("ref", tmp_path / "nowhere", "--dest", tmp_path / "r.pkl"), "images not found")
    assert "as IMAGES ('python -m metrics ref IMAGES --dest FILE')" in line and "--save_stats" not in line, line
    line = one_error_line(*run_cli("ref", "--images", tmp_path / "nowhere", "--dest", tmp_path / "r.pkl"),
                          "images not found")
    assert line.endswith("as --images"), line
    line = one_error_line(*run_cli("ref", "--dest", tmp_path / "r.pkl"), "no images given")
    assert "'python -m metrics ref IMAGES --dest FILE" in line, line
    one_error_line(*run_cli("ref", gen, "--images", tmp_path / "other", "--dest", tmp_path / "r.pkl"),
                   "two image sources")
    assert not (tmp_path / "r.pkl").exists()


def _bar_states(err: str, desc: str) -> list:
    """The states of the bar ``desc`` drawn on a non-terminal stderr (tqdm separates them with carriage returns)."""
    return [s.strip() for s in err.split("\r") if s.strip().startswith(f"{desc}:")]


def test_progress_bar_ends_at_its_count_and_is_absent_with_nothing_to_do(tmp_path, capsys):
    imgs = make_images(12, 5)
    api.compute_stats([imgs[:6], imgs[6:]], ["inception"], device="cpu", progress=True)
    states = _bar_states(capsys.readouterr().err, "images")
    assert states and "2/2" in states[-1] and "100%" in states[-1], states
    # Nothing to read: no bar at all, only the error.
    with pytest.raises(UsageError, match="found 0 image"):
        api.compute_stats([], ["inception"], device="cpu", progress=True)
    assert _bar_states(capsys.readouterr().err, "images") == []
    # The metrics after a sampling run: the bar knows its length (not 'images: 0batch').
    from sampling.outputs import run_metrics

    run = tmp_path / "run"
    run.mkdir()
    for i, a in enumerate(imgs):
        (run / f"{i:07d}.png").write_bytes(png_bytes(a))
    res = run_metrics(run, range(12), ["saturation"], device="cpu")
    states = _bar_states(capsys.readouterr().err, "images")
    assert res["num_images"] == 12 and states and "1/1" in states[-1] and "100%" in states[-1], states
    assert not any(s.startswith("images: 0batch") for s in states), states  # the unknown-length bar of before


def test_missing_reference_names_this_commands_flag(tmp_path):
    gen = write_folder(tmp_path / "gen", make_images(3, 3))
    line = one_error_line(*run_cli("calc", gen, "--metrics", "fid"), "metric 'fid' needs reference statistics")
    assert line.endswith("; pass --ref") and "ref_path" not in line and "`" not in line, line
