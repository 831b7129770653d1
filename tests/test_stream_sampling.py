"""Samplers with --save none --metrics: scores while sampling, no image files, resumable, equal to write-then-score."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

import sample_edm2
from metrics import api, detectors, stream
from metrics.refs import save_ref
from sampling import edm2_run
from benchmarks import edm2_snapshot as WR
from tests.test_metrics_stream import TinyInception
from utils.errors import UsageError

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=8,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
METRICS = "fid,is,saturation"


@pytest.fixture(autouse=True)
def tiny_detector(monkeypatch):
    monkeypatch.setitem(detectors.LOADERS, "inception", lambda device, **kw: TinyInception())
    detectors.clear_cache()
    yield
    detectors.clear_cache()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "pos.pkl"
    torch.manual_seed(0)
    WR.write_edm2_pickle(path, WR.make_precond(**TINY), half=False)
    return path


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.pkl"
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (30, 16, 16, 3), generator=g, dtype=torch.uint8).numpy()
    detectors.LOADERS["inception"], saved = (lambda device, **kw: TinyInception()), detectors.LOADERS["inception"]
    try:
        save_ref(api.compute_stats([images], ["inception"], progress=False), path)
    finally:
        detectors.LOADERS["inception"] = saved
        detectors.clear_cache()
    return path


def config(net, outdir, **kw):
    opts = dict(net_pos_pkl=str(net), outdir=str(outdir), seeds="3-40", steps=2, batch=5, device="cpu",
                g_method="swg", g_weight="0.3", swg_sizes="12")
    opts.update(kw)
    return edm2_run.build_config(**opts)


def image_files(folder: pathlib.Path) -> list:
    return sorted(p.name for p in folder.rglob("*") if p.suffix in (".png", ".tar", ".npz"))


def test_streaming_equals_write_then_score_and_writes_no_image(net, ref, tmp_path):
    out = tmp_path / "stream"
    cfg = config(net, out, save="none", metrics=METRICS, ref_path=str(ref), save_stats=str(tmp_path / "s.pkl"))
    streamed = edm2_run.generate(cfg, progress=False)["metrics"]
    assert image_files(out) == [] and (out / stream.STATE_DIR).is_dir()
    assert json.loads((out / "metrics.json").read_text())["results"] == pytest.approx(streamed, rel=1e-15)

    png = tmp_path / "png"
    edm2_run.generate(config(net, png, metrics="none"), progress=False)
    assert len(image_files(png)) == 38
    written = api.calc_metrics(str(png), METRICS, ref_path=str(ref), progress=False)  # `python -m metrics calc`
    assert streamed["num_images"] == written["num_images"] == 38
    for key, value in written.items():
        assert abs(streamed[key] - value) <= 1e-9 * abs(value), key
    # The statistics file scores the same without images.
    assert api.calc_metrics(str(tmp_path / "s.pkl"), METRICS, ref_path=str(ref)) == pytest.approx(streamed, rel=1e-12)


def test_interrupted_run_resumes_and_finished_run_only_reports(net, ref, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seeds = "3-140"  # 138 images: chunks of 64, 64 and 10
    whole = edm2_run.generate(config(net, tmp_path / "whole", seeds=seeds, save="none", metrics=METRICS,
                                     ref_path=str(ref)), progress=False)["metrics"]
    monkeypatch.setattr(stream, "DEFAULT_SAVE_EVERY", 10)
    calls = []
    real_update = stream.StreamingStats.update

    def dying_update(self, seeds, images):
        calls.append(list(seeds))
        if len(calls) == 15:  # 70 images in, the first chunk saved: the process "dies"
            raise KeyboardInterrupt
        return real_update(self, seeds, images)

    monkeypatch.setattr(stream.StreamingStats, "update", dying_update)
    monkeypatch.setattr(stream.StreamingStats, "write", dying_update)
    cfg = config(net, out, seeds=seeds, save="none", metrics=METRICS, ref_path=str(ref))
    with pytest.raises(KeyboardInterrupt):
        edm2_run.generate(cfg, progress=False)
    assert any((out / stream.STATE_DIR).iterdir()) and not (out / "metrics.json").exists()
    monkeypatch.setattr(stream.StreamingStats, "update", real_update)
    monkeypatch.setattr(stream.StreamingStats, "write", real_update)
    resumed = edm2_run.generate(cfg, progress=False)
    assert resumed["pending"] == 138 - 64
    for key, value in whole.items():
        assert abs(resumed["metrics"][key] - value) <= 1e-9 * abs(value), key
    again = edm2_run.generate(cfg, progress=False)
    assert again["pending"] == 0 and again["metrics"] == resumed["metrics"]
    assert sorted(p.name for p in out.glob("metrics*.json")) == ["metrics.json"]  # reported, not rewritten


def test_keep_writes_the_first_images_only(net, ref, tmp_path):
    out = tmp_path / "keep"
    edm2_run.generate(config(net, out, save="none", keep=4, metrics="is,saturation"), progress=False)
    assert image_files(out) == [f"{s:07d}.png" for s in (3, 4, 5, 6)]


def test_cli_flags_and_refusals(net, ref, tmp_path, capsys):
    common = ["--net_pos_pkl", str(net), "--steps", "2", "--batch", "5", "--seeds", "0-11", "--device", "cpu"]
    assert sample_edm2.main([*common, "--outdir", str(tmp_path / "a"), "--save", "none",
                             "--metrics", "is,saturation"]) == 0
    assert image_files(tmp_path / "a") == []
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_images"] == 12
    assert sample_edm2.settings([*common, "--outdir", str(tmp_path / "b"), "--save_tar"]).save == "tar"
    assert sample_edm2.settings([*common, "--outdir", str(tmp_path / "b"), "--save", "tar"]).save_tar
    for extra, needle in [(["--save", "none"], "--metrics"),
                          (["--save", "none", "--save_tar", "--metrics", "is"], "--save_tar"),
                          (["--save", "none", "--metrics", "pr_inception", "--ref_path", str(ref)], "pr_inception"),
                          (["--keep", "3", "--metrics", "is"], "--keep"),
                          (["--save", "gif"], "--save")]:
        capsys.readouterr()
        assert sample_edm2.main([*common, "--outdir", str(tmp_path / "c"), *extra]) == 2, extra
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (extra, err)
    # The statistics file is a finished output: never overwritten.
    (tmp_path / "taken.pkl").write_bytes(b"x")
    with pytest.raises(UsageError, match="taken.pkl"):
        edm2_run.generate(config(net, tmp_path / "d", save="none", metrics="is", save_stats=str(tmp_path / "taken.pkl")),
                          progress=False)
    assert (tmp_path / "taken.pkl").read_bytes() == b"x" and not (tmp_path / "d").exists()
