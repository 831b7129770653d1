"""utils.cache against a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import socket
import threading

import pytest

from utils import cache
from utils.errors import UsageError

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # spans several download chunks


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):  # noqa: N802 (http.server naming)
        _Handler.hits.append(self.path)
        if self.path.endswith("/truncated.bin"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
            return
        if not self.path.endswith("/weights.pkl"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWG_CACHE", str(tmp_path / "cache"))
    _Handler.hits.clear()


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    assert cache.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("SWG_CACHE")
    assert cache.cache_dir() == cache.pathlib.Path("~/.cache/swg").expanduser()


def test_download_is_cached_at_host_and_path(server, tmp_path):
    url = f"{server}/edm2/raw/weights.pkl"
    path = cache.fetch(url)
    assert path == tmp_path / "cache" / "127.0.0.1" / "edm2" / "raw" / "weights.pkl"
    assert path.read_bytes() == PAYLOAD
    assert (path.parent / "weights.pkl.sha256").read_text().strip() == hashlib.sha256(PAYLOAD).hexdigest()
    assert [p.name for p in path.parent.iterdir() if "part" in p.name] == []  # temp file renamed away
    # Second call: served from the cache, no request.
    assert cache.fetch(url) == path
    assert _Handler.hits == ["/edm2/raw/weights.pkl"]


def test_sha256_checked(server):
    good = hashlib.sha256(PAYLOAD).hexdigest()
    path = cache.fetch(f"{server}/a/weights.pkl", sha256=good)
    assert path.read_bytes() == PAYLOAD
    bad = "0" * 64
    with pytest.raises(UsageError, match="sha256") as info:
        cache.fetch(f"{server}/b/weights.pkl", sha256=bad)
    assert "\n" not in str(info.value)
    target = cache.cache_path(f"{server}/b/weights.pkl")
    assert not target.exists()
    assert not any(target.parent.iterdir())  # the bad download was discarded, no temp file left
    # A corrupted cached file is detected against the known digest.
    path.write_bytes(b"corrupt")
    (path.parent / "weights.pkl.sha256").unlink()
    with pytest.raises(UsageError, match="delete it"):
        cache.fetch(f"{server}/a/weights.pkl", sha256=good)


def test_truncated_download_leaves_nothing(server):
    url = f"{server}/t/truncated.bin"
    with pytest.raises(cache.OfflineError):
        cache.fetch(url)
    target = cache.cache_path(url)
    assert not target.exists() and not any(target.parent.iterdir())


def test_unreachable_is_one_line_offline_error():
    url = f"http://127.0.0.1:{_free_port()}/edm2/net.pkl"
    with pytest.raises(cache.OfflineError) as info:
        cache.fetch(url)
    msg = str(info.value)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    assert "\n" not in msg and url in msg and str(cache.cache_path(url)) in msg
    # Placing the file at the named path makes the command work offline.
    target = cache.cache_path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"placed by hand")
    assert cache.fetch(url).read_bytes() == b"placed by hand"


def test_local_paths(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    assert cache.fetch(str(f)) == f
    assert cache.fetch(f"file://{f}") == f
    assert cache.fetch(str(f), sha256=hashlib.sha256(b"abc").hexdigest()) == f
    with pytest.raises(UsageError, match="not found"):
        cache.fetch(str(tmp_path / "missing.pkl"))


def test_hf_paths_and_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = cache.cache_path("hf://timm/vit_large_patch14_dinov2.lvd142m/model.safetensors")
    assert path == tmp_path / "cache" / "hf" / "timm" / "vit_large_patch14_dinov2.lvd142m" / "model.safetensors"
    with pytest.raises(cache.OfflineError) as info:
        cache.fetch("hf://org/repo/model.safetensors")
    assert str(cache.cache_path("hf://org/repo/model.safetensors")) in str(info.value)
    with pytest.raises(cache.OfflineError) as info:
        cache.hf_snapshot("stabilityai/sd-vae-ft-mse")
    assert str(tmp_path / "cache" / "hf" / "stabilityai" / "sd-vae-ft-mse") in str(info.value)
    # A folder placed by hand is used without the network.
    snap = tmp_path / "cache" / "hf" / "stabilityai" / "sd-vae-ft-mse"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    assert cache.hf_snapshot("stabilityai/sd-vae-ft-mse") == snap
    with pytest.raises(UsageError, match="malformed"):
        cache.fetch("hf://only-org")


def test_prefetch(server, tmp_path):
    f = tmp_path / "local.bin"
    f.write_bytes(b"1")
    paths = cache.prefetch([f"{server}/p/weights.pkl", str(f), None])
    assert paths[0].read_bytes() == PAYLOAD and paths[1] == f


def _fake_ranks(monkeypatch, rank, local_rank, world, barriers):
    from utils import dist

    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "get_local_rank", lambda: local_rank)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(dist, "barrier", lambda: barriers.append(1))


@pytest.mark.parametrize("rank,local_rank,shared,expect_work", [
    (4, 0, False, True),    # first process of a second node, node-local cache: it downloads its copy
    (4, 0, True, False),    # shared cache: rank 0's file is there, no second download
    (5, 1, False, False),   # other processes of that node wait for their local rank 0
    (0, 0, False, True),    # rank 0 downloads first
])
def test_multi_node_cache_not_shared(monkeypatch, tmp_path, rank, local_rank, shared, expect_work):
    target = tmp_path / "weights.pkl"
    if shared and rank != 0:
        target.write_bytes(b"from rank 0")
    calls, barriers = [], []
    _fake_ranks(monkeypatch, rank, local_rank, 8, barriers)

    def work():
        calls.append(rank)
        target.write_bytes(b"x")

    fail = lambda: cache.OfflineError("missing")  # noqa: E731
    if expect_work or shared:
        cache._rank0_first(work, target.is_file, fail)
        assert target.is_file()
    else:  # a waiting rank whose local rank 0 did not fetch (simulated) reports the missing file
        with pytest.raises(cache.OfflineError):
            cache._rank0_first(work, target.is_file, fail)
    assert calls == ([rank] if expect_work else [])
    assert len(barriers) == 2  # every rank passes the same barriers, whatever happened


def test_rank0_failure_keeps_barriers_aligned(monkeypatch, tmp_path):
    barriers = []
    _fake_ranks(monkeypatch, 0, 0, 8, barriers)

    def work():
        raise cache.OfflineError("no internet")

    with pytest.raises(cache.OfflineError, match="no internet"):
        cache._rank0_first(work, lambda: False, lambda: cache.OfflineError("missing"))
    assert len(barriers) == 2
