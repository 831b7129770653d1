"""Shared fixtures: golden-vector directory (honours SWG_GOLDEN_DIR), hermetic environment."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:  # tests/ is a package (tests/__init__.py); some modules import conftest
    sys.path.append(str(ROOT / "tests"))

# Tests never touch the network.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def golden_dir() -> pathlib.Path:
    """Golden vectors: ``$SWG_GOLDEN_DIR`` when set, else the copy in ``tests/fixtures``."""
    env = os.environ.get("SWG_GOLDEN_DIR")
    return pathlib.Path(env) if env else ROOT / "tests" / "fixtures" / "reference_golden"


@pytest.fixture(scope="session")
def edm2_golden():
    path = golden_dir() / "edm2_golden.pt"
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def dit_golden():
    path = golden_dir() / "dit_golden.pt"
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own empty weights cache; nothing is read from ~/.cache."""
    monkeypatch.setenv("SWG_CACHE", str(tmp_path_factory.mktemp("swg_cache")))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``, the relative measure used for golden comparisons."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
