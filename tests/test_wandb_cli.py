"""--use_wandb 1 in both samplers: an offline wandb run with the arguments and a sample grid."""

from __future__ import annotations

import pytest
import torch

import sample_dit
import sample_edm2
from benchmarks import edm2_snapshot as WR
from tests.test_dit_cli import _base, assets  # noqa: F401  (module fixture: tiny DiT + VAE)
from tests.test_wandb_log import wait_for_records

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=8,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    import wandb

    wandb.teardown()  # wandb keeps process-wide settings (WANDB_DIR) from an earlier test
    yield tmp_path / "wb" / "wandb"
    wandb.teardown()


def _edm2(argv) -> int:
    return sample_edm2.main([str(a) for a in argv])


def _check_run(root, name: bytes):
    (run,) = root.glob("offline-run-*")
    log = wait_for_records(next(run.glob("*.wandb")), (name,))
    assert name in log
    assert any(p.suffix == ".png" for p in (run / "files").rglob("*")), "a sample grid is logged"


def test_edm2_use_wandb_offline(tmp_path, offline_wandb):
    torch.manual_seed(0)
    WR.write_edm2_pickle(tmp_path / "pos.pkl", WR.make_precond(**TINY), half=False)
    argv = ["--net_pos_pkl", tmp_path / "pos.pkl", "--steps", "2", "--batch", "4", "--outdir", tmp_path / "out",
            "--seeds", "0-3", "--use_wandb", "1", "--wandb_runname", "tiny-edm2-run"]
    assert _edm2(argv) == 0
    _check_run(offline_wandb, b"tiny-edm2-run")


def test_dit_use_wandb_offline(assets, tmp_path, offline_wandb):  # noqa: F811
    argv = _base(assets, tmp_path / "out", "--seeds", "0-1", "--crop", "1", "--g-scale", "0.5",
                 "--use_wandb", "1", "--wandb_runname", "tiny-dit-run")
    assert sample_dit.main(argv) == 0
    _check_run(offline_wandb, b"tiny-dit-run")


def test_wandb_disabled_by_default_writes_nothing(tmp_path, offline_wandb):
    torch.manual_seed(0)
    WR.write_edm2_pickle(tmp_path / "pos.pkl", WR.make_precond(**TINY), half=False)
    argv = ["--net_pos_pkl", tmp_path / "pos.pkl", "--steps", "2", "--batch", "4", "--outdir", tmp_path / "out",
            "--seeds", "0-1"]
    assert _edm2(argv) == 0
    assert not offline_wandb.exists()
