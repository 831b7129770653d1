"""Detector weights: the Inception file's name-embedded sha256 prefix is enforced; an unreachable Hub fails fast."""

import hashlib
import pickle
import socket
import time

import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants

from metrics import dinov2, inception
from metrics.cli import main as cli
from utils import cache
from utils.errors import UsageError

NAME = "pt_inception-2015-12-05-6726825d.pth"


def test_inception_name_hash_mismatch_is_refused(tmp_path):
    bad = tmp_path / NAME
    bad.write_bytes(b"not the inception weights")
    assert not hashlib.sha256(bad.read_bytes()).hexdigest().startswith("6726825d")
    with pytest.raises(UsageError, match=r"sha256 [0-9a-f]{8}\.\.\., not the 6726825d") as err:
        inception.load_inception(bad)
    assert "\n" not in str(err.value)

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):
        PIL.Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(folder / f"{i}.png")
    res = CliRunner().invoke(cli, ["calc", "--images", str(folder), "--metrics", "is", "--inception_weights", str(bad)])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "6726825d" in lines[0]


def test_inception_name_hash_match_passes_the_check(tmp_path):
    data = b"still not a state dict"
    prefix = hashlib.sha256(data).hexdigest()[:8]
    good = tmp_path / f"pt_inception-2015-12-05-{prefix}.pth"
    good.write_bytes(data)
    inception.check_name_hash(good)  # the name's digits match the content
    with pytest.raises(UsageError, match="cannot read Inception weights"):  # refused later, for its content
        inception.load_inception(good)
    plain = tmp_path / "inception.pth"  # no digits in the name: nothing to check
    plain.write_bytes(data)
    inception.check_name_hash(plain)


@pytest.fixture
def online_mode(monkeypatch):
    """As a compute node without HF_HUB_OFFLINE whose Hub endpoint cannot be reached (no real network)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a) or time.sleep(30))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a) or time.sleep(30))
    return calls


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dinov2_download_fails_fast_on_refused_endpoint(online_mode, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(cache.OfflineError, match="cannot connect to http://127.0.0.1") as err:
        dinov2.load_dinov2()
    assert time.monotonic() - start < 5 and online_mode == []
    assert "place it at" in str(err.value) and "model.safetensors" in str(err.value)


def test_hub_fails_fast_on_black_hole(online_mode, monkeypatch):
    """A firewall that drops packets: the probe's short timeout ends it, not huggingface_hub's retries."""
    seen = []

    def hang(address, timeout=None, **kw):
        seen.append(timeout)
        raise socket.timeout("timed out")

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setenv("SWG_CONNECT_TIMEOUT", "2")
    with pytest.raises(cache.OfflineError, match="timed out"):
        cache.fetch(dinov2.DINOV2_SOURCE)
    with pytest.raises(cache.OfflineError, match="timed out"):
        cache.hf_snapshot("stabilityai/sd-vae-ft-mse")
    assert seen == [2.0, 2.0] and online_mode == []


def test_local_weights_named_without_a_hash_replace_the_download(tmp_path, monkeypatch):
    """$SWG_INCEPTION_WEIGHTS picks a local file (random weights in benchmarks/real_scale.py); a file that still
    carries the official name is checked against it."""
    bad = tmp_path / NAME
    bad.write_bytes(b"random benchmark weights")
    monkeypatch.setenv("SWG_INCEPTION_WEIGHTS", str(bad))
    with pytest.raises(UsageError, match="not the 6726825d"):
        inception.load_inception()
    local = tmp_path / "pt_inception-random.pth"
    torch.save(inception.InceptionV3().state_dict(), local)
    monkeypatch.setenv("SWG_INCEPTION_WEIGHTS", str(local))
    model = inception.load_inception()
    assert torch.equal(model.fc.weight, torch.load(local, weights_only=True)["fc.weight"])


def test_metrics_offline_names_its_own_flags_not_the_samplers_prefetch(tmp_path, monkeypatch):
    """`python -m metrics` has no --prefetch: offline, it names the flag that takes a local copy."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        PIL.Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(folder / f"{i}.png")
    ref = tmp_path / "ref.pkl"
    with open(ref, "wb") as f:
        pickle.dump({"num_images": 9, "fd_dinov2": {"mu": np.zeros(1024), "sigma": np.eye(1024)}}, f)

    def one_line(*args):
        res = CliRunner().invoke(cli, [str(a) for a in args])
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        assert "--prefetch" not in lines[0], lines[0]
        return lines[0]

    line = one_line("calc", folder, "--ref", ref, "--metrics", "fd_dinov2")
    assert str(cache.cache_path(dinov2.DINOV2_SOURCE)) in line and "--dinov2_weights FILE" in line, line
    line = one_line("ref", "--images", folder, "--dest", tmp_path / "new.pkl", "--metrics", "fd_dinov2")
    assert "--dinov2_weights FILE" in line and not (tmp_path / "new.pkl").exists(), line
    url = f"http://127.0.0.1:{_closed_port()}/refs/img512.pkl"
    line = one_line("calc", folder, "--ref", url, "--metrics", "fd_dinov2")
    assert str(cache.cache_path(url)) in line and "--ref FILE" in line, line
    # The cache's own advice names no command's flag (only the samplers have --prefetch: utils.cli.offline_advice).
    with pytest.raises(cache.OfflineError, match=r"with the same \$SWG_CACHE\)$") as err:
        cache.fetch(dinov2.DINOV2_SOURCE)
    assert "--prefetch" not in str(err.value)
