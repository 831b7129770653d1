"""DiT's/ADM's five numbers while sampling: `--save none --metrics adm --ref_path <ADM .npz>` equals scoring the
written PNGs with `python -m metrics calc` against the same file (FD-type <= 1e-9, counts exact)."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from metrics import api, detectors
from metrics.cli import main as cli
from sampling import edm2_run
from tests.test_metrics_stream import TinyInception
from tests.test_stream_sampling import config, image_files, net  # noqa: F401  (net: a module fixture)


@pytest.fixture(autouse=True)
def tiny_detector(monkeypatch):
    monkeypatch.setitem(detectors.LOADERS, "inception", lambda device, **kw: TinyInception())
    detectors.clear_cache()
    yield
    detectors.clear_cache()


def test_adm_numbers_while_sampling_equal_write_then_score(net, tmp_path):  # noqa: F811
    rng = np.random.default_rng(4)
    (tmp_path / "real").mkdir()
    for i in range(30):
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "real" / f"{i}.png")
    res = CliRunner().invoke(cli, ["ref", "--images", str(tmp_path / "real"), "--dest", str(tmp_path / "adm.npz")])
    assert res.exit_code == 0, res.stderr

    out = tmp_path / "stream"
    streamed = edm2_run.generate(config(net, out, save="none", metrics="adm", ref_path=str(tmp_path / "adm.npz")),
                                 progress=False)["metrics"]
    assert image_files(out) == [] and json.loads((out / "metrics.json").read_text())["results"] == streamed
    assert {"fid", "sfid", "is", "precision_inception", "recall_inception"} <= set(streamed)

    png = tmp_path / "png"
    edm2_run.generate(config(net, png, metrics="none"), progress=False)
    written = api.calc_metrics(str(png), "adm", ref_path=str(tmp_path / "adm.npz"), progress=False)
    assert set(written) == set(streamed)
    for key, value in written.items():
        if key.startswith(("precision", "recall")):
            assert streamed[key] == value, key
        else:
            assert abs(streamed[key] - value) <= 1e-9 * abs(value), key
