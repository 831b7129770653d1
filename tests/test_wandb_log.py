"""sampling.wandb_log: arguments, metrics and a sample grid land in an offline wandb run."""

from __future__ import annotations

import pathlib
import time

import numpy as np
import PIL.Image
import pytest

from utils.errors import UsageError
from sampling.wandb_log import WandbLogger, first_images, image_grid


def wait_for_records(log: pathlib.Path, needles, timeout: float = 30.0) -> bytes:
    """The offline run log; wandb's service process may still be flushing it on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        data = log.read_bytes()
        if all(n in data for n in needles) or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


def test_image_grid_layout():
    imgs = np.stack([np.full((4, 5, 3), 10 * (i + 1), dtype=np.uint8) for i in range(5)])
    grid = image_grid(imgs, nrow=3, pad=1)
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 2, 3)
    assert grid[0, 0, 0] == 10 and grid[0, 6, 0] == 20 and grid[5, 0, 0] == 40 and grid[5, 6, 0] == 50
    assert grid[5, 12, 0] == 0  # the empty sixth cell
    nchw = imgs.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(image_grid(nchw, nrow=3, pad=1), grid)
    with pytest.raises(ValueError):
        image_grid(imgs.astype(np.float32))


def test_disabled_logger_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for logger in (WandbLogger(0, rank=0), WandbLogger(1, rank=1)):
        assert not logger.enabled
        logger.log_run(tmp_path, {"fid": 1.0})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not WandbLogger(1, rank=0).enabled
    assert not (tmp_path / "wandb").exists()


def test_offline_run_records_args_metrics_and_grid(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "samples" / "000000"
    run_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for seed in range(6):
        PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(run_dir / f"{seed:07d}.png")
    assert [im.shape for im in first_images(tmp_path / "samples", 4)] == [(8, 8, 3)] * 4

    config = {"g_method": "swg", "g_weight": [0.2], "swg_sizes": [40], "seeds": "0-5"}
    logger = WandbLogger(1, project="swg-test", config=config, name="mswg-0.2", dir=tmp_path / "wb", rank=0)
    assert logger.enabled
    logger.log_run(tmp_path / "samples", {"fid": 2.55, "fd_dinov2": 81.35, "num_images": 6, "note": "x"},
                   max_images=4, finish=False)
    assert logger.run.summary["metrics/fid"] == 2.55 and logger.run.summary["metrics/fd_dinov2"] == 81.35
    assert "metrics/note" not in logger.run.summary.keys()
    assert logger.run.config["g_method"] == "swg" and logger.run.config["swg_sizes"] == [40]
    logger.finish()
    assert not logger.enabled

    (offline,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    files = offline / "files"
    # The run log that a later `wandb sync` uploads holds the metrics (key, JSON value) and the arguments.
    (log,) = offline.glob("*.wandb")
    needles = (b"metrics/fid", b"2.55", b"metrics/fd_dinov2", b"81.35", b"g_method", b"swg_sizes", b"mswg-0.2")
    data = wait_for_records(log, needles)
    for needle in needles:
        assert needle in data, needle
    (png,) = (files / "media" / "images").glob("samples_*.png")
    grid = np.asarray(PIL.Image.open(png).convert("RGB"))
    assert grid.shape == (2 * 8 + 2, 2 * 8 + 2, 3)  # 4 images, 2 per row, 2 px gaps
    first = np.asarray(PIL.Image.open(run_dir / "0000000.png"))
    np.testing.assert_array_equal(grid[:8, :8], first)


def test_missing_wandb_is_a_usage_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UsageError, match="--use_wandb 0"):
        WandbLogger(1, rank=0)
