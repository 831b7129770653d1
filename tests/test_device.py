"""utils.device and benchmarks/bench_swg.py: a --device this machine lacks is one line, exit 2."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

from utils.device import resolve_device
from utils.errors import UsageError

ROOT = pathlib.Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


def test_cpu_and_default():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name,pattern", [("gpu", "'gpu' is not a device"), ("cuda:-1", "not a device"),
                                          ("meta", "only cpu, cuda and mps")])
def test_bad_names(name, pattern):
    with pytest.raises(UsageError, match=pattern):
        resolve_device(name, "--device")


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
def test_cuda_without_gpu_names_the_flag():
    with pytest.raises(UsageError, match=r"^--dev cuda:1: no CUDA GPU is available here .*; use --dev cpu"):
        resolve_device("cuda:1", "--dev")


@pytest.mark.skipif(NO_GPU, reason="needs a GPU")
def test_cuda_index_past_the_last_gpu():
    n = torch.cuda.device_count()
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UsageError, match=f"has {n} CUDA GPU"):
        resolve_device(f"cuda:{n}")


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
def test_bench_swg_cuda_without_gpu():
    r = subprocess.run([sys.executable, "benchmarks/bench_swg.py", "--device", "cuda"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: --device cuda: no CUDA GPU") and r.stderr.count("\n") == 1
