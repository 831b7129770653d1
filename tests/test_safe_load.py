"""Damaged downloads: a truncated checkpoint or reference is reported as truncated (download it again),
a complete file with foreign Python objects as unsafe; torch's advice to pass weights_only=False never shows."""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from metrics.refs import load_ref
from networks.dit import load_dit_state_dict
from utils.errors import UsageError
from utils.safe_load import global_exists, load_error_kind

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Foreign:
    pass


def _cuts(n: int) -> list[int]:
    """Every cut in the first 600 bytes (headers, pickled names), then every 97th byte, never the whole file."""
    return sorted({*range(0, min(n, 600)), *range(600, n, 97)} - {n})


@pytest.fixture(scope="module")
def state_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("state")
    sd = {"x_embedder.proj.weight": torch.randn(16, 4, 2, 2), "y_embedder.embedding_table.weight": torch.randn(11, 16)}
    torch.save(sd, d / "zip.pt")
    torch.save(sd, d / "legacy.pt", _use_new_zipfile_serialization=False)
    return d


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_every_truncation_of_a_dit_checkpoint_says_truncated(state_files, fmt, tmp_path):
    data = (state_files / f"{fmt}.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in _cuts(len(data)):
            cut.write_bytes(data[:n])
            with pytest.raises(UsageError) as info:
                load_dit_state_dict(cut)
            msg = str(info.value)
            assert msg == (f"cannot read DiT checkpoint {cut}: the file is truncated or corrupt (an interrupted "
                           f"download or copy?); delete it and download it again"), (n, msg)
    assert not [w for w in caught if "weights_only" in str(w.message)]


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("foreign", [_Foreign(), print, argparse.ArgumentParser])
def test_complete_file_with_foreign_objects_is_refused_as_unsafe(tmp_path, fmt, foreign):
    path = tmp_path / "foreign.pt"
    torch.save({"w": torch.zeros(2), "x": foreign}, path, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(UsageError, match=r"^refusing to load DiT checkpoint .*could run code; pass a DiT") as info:
        load_dit_state_dict(path)
    assert "weights_only" not in str(info.value)


def test_clipped_global_names_are_truncation():
    assert global_exists("collections.OrderedDict") and global_exists("print") and global_exists("os.system")
    assert not global_exists("collections.OrderedDic") and not global_exists("c.") and not global_exists(".")
    assert load_error_kind(EOFError()) == "truncated"
    assert load_error_kind(pickle.UnpicklingError("Unsupported global: GLOBAL collecti. was not an allowed "
                                                  "global by default")) == "truncated"
    assert load_error_kind(pickle.UnpicklingError("Unsupported global: GLOBAL os.system was not an allowed "
                                                  "global by default")) == "unsafe"


def test_truncated_ckpt_through_the_dit_cli(state_files, tmp_path):
    cut = tmp_path / "DiT-S-8.pt"
    cut.write_bytes((state_files / "legacy.pt").read_bytes()[:300])  # cut inside a pickled name
    r = subprocess.run([sys.executable, "sample_dit.py", "--model", "DiT-S/8", "--ckpt", str(cut), "--seeds", "0",
                        "--sample-dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.splitlines() == [f"error: cannot read DiT checkpoint {cut}: the file is truncated or corrupt "
                                     f"(an interrupted download or copy?); delete it and download it again"]


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_every_truncation_of_a_reference_says_truncated(tmp_path, protocol):
    rng = np.random.default_rng(0)
    ref = {"num_images": 10, "fid": {"mu": rng.standard_normal(4), "sigma": np.eye(4)},
           "fd_dinov2": {"mu": rng.standard_normal(3), "sigma": np.eye(3)}}
    data = pickle.dumps(ref, protocol=protocol)
    cut = tmp_path / "img512.pkl"
    for n in _cuts(len(data)):
        cut.write_bytes(data[:n])
        with pytest.raises(UsageError, match=r"truncated or corrupt reference pickle .*download it again"):
            load_ref(cut)
    cut.write_bytes(data)
    assert load_ref(cut)["num_images"] == 10


def test_a_complete_reference_asking_for_code_is_still_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"num_images": 1, "fid": {"mu": os.getcwd}}))
    with pytest.raises(UsageError, match=r"refused to load \(global '.*getcwd' is not allowed"):
        load_ref(path)


def test_every_truncation_of_an_edm2_snapshot_says_corrupt(tmp_path):
    """The restricted unpickler of .pkl snapshots: a cut file is corrupt, never 'refusing ... could run code'."""
    from networks.edm2_pickle import CheckpointError, load_checkpoint
    from benchmarks import edm2_snapshot as WR

    tiny = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_channels=8,
                channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
    full = tmp_path / "net.pkl"
    WR.write_edm2_pickle(full, WR.make_precond(**tiny), half=False)
    data = full.read_bytes()
    cut = tmp_path / "cut.pkl"
    for n in sorted({*range(0, 600), *range(600, len(data), 997)}):
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint") as info:
            load_checkpoint(cut)
        assert "weights_only" not in str(info.value), n
