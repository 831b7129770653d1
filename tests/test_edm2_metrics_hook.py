"""sample_edm2.py --metrics/--ref_path: metrics of exactly the run's images, written beside them."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import PIL.Image
import pytest
import torch

import sample_edm2
from metrics import api, detectors
from metrics.refs import save_ref
from benchmarks import edm2_snapshot as WR
from tests.test_metrics_api import TinyInception

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=8,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)


@pytest.fixture(autouse=True)
def tiny_detector(monkeypatch):
    monkeypatch.setitem(detectors.LOADERS, "inception", lambda device, **kw: TinyInception())
    detectors.clear_cache()
    yield
    detectors.clear_cache()


def _cli(args):
    return sample_edm2.main([str(a) for a in args])


def _stats_of(paths):
    images = np.stack([np.asarray(PIL.Image.open(p).convert("RGB")) for p in paths])
    return api.compute_stats([images], detectors=("inception",), progress=False)


def test_metrics_after_sampling_use_exactly_the_runs_seeds(tmp_path):
    torch.manual_seed(0)
    WR.write_edm2_pickle(tmp_path / "pos.pkl", WR.make_precond(**TINY), half=False)
    common = ["--net_pos_pkl", tmp_path / "pos.pkl", "--steps", "2", "--batch", "4",
              "--g_method", "swg", "--g_weight", "0.3", "--swg_sizes", "12", "--swg_steps", "2"]
    out = tmp_path / "out"
    # An earlier run of the same settings left more seeds in the folder.
    assert _cli([*common, "--outdir", out, "--seeds", "0-9"]) == 0
    run_seeds = [0, 2, 4, 6, 8, 9]
    ref = _stats_of([out / f"{s:07d}.png" for s in run_seeds])
    save_ref(ref, tmp_path / "ref.pkl")

    assert _cli([*common, "--outdir", out, "--seeds", ",".join(map(str, run_seeds)),
                 "--metrics", "fid", "--ref_path", tmp_path / "ref.pkl"]) == 0
    results = json.loads((out / "metrics.json").read_text())
    fid = results["fid"] if "fid" in results else results["results"]["fid"]
    assert abs(fid) < 1e-6, "the run's own images against their own statistics"
    assert (out / "metrics.csv").exists()

    # Against the statistics of other seeds the distance is clearly positive.
    save_ref(_stats_of([out / f"{s:07d}.png" for s in (1, 3, 5, 7)]), tmp_path / "ref2.pkl")
    out2 = tmp_path / "out2"
    assert _cli([*common, "--outdir", out2, "--seeds", ",".join(map(str, run_seeds)),
                 "--metrics", "fid", "--ref_path", tmp_path / "ref2.pkl"]) == 0
    res2 = json.loads((out2 / "metrics.json").read_text())
    assert (res2["fid"] if "fid" in res2 else res2["results"]["fid"]) > 1e-3

