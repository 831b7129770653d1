"""Runs on preemptible clusters: SIGTERM / SIGUSR1, torchrun on two "nodes", a node lost, world-size and
batch changes between launches, torchrun restarts, one run per folder, damaged finished images.

Every check compares the final images (sha256 of each PNG, of each tar member) and metrics with one
uninterrupted single-process run of the same seeds (the module's references).  torchrun launches are
few and small (two CPU processes, Gloo, a tiny EDM2 network); tests/cluster_job.py is the worker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest
import torch

import sample_edm2
from benchmarks import edm2_snapshot as WR
from metrics import api, detectors, stream
from metrics.refs import save_ref
from sampling import run, writer as W
from tests.tiny_detectors import TinyInception
from utils import lock as L
from utils.preempt import EXIT_RESUMABLE, Preempted, Preemption

ROOT = pathlib.Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "cluster_job.py"
TINY = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=8,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
Inception = functools.partial(TinyInception, dim=24, seed=1, sharpness=3, zero_from=500)  # as tests/cluster_job.py
SEEDS = {"png": "0-39", "subdirs": "0-39", "tar": "0-39", "none": "3-140"}  # streaming: chunks of 64, 64, 10
MODE_ARGS = {"png": [], "subdirs": ["--subdirs"], "tar": ["--save", "tar"],
             "none": ["--save", "none", "--batch", "8"]}


@pytest.fixture(autouse=True)
def tiny_detector(monkeypatch):
    monkeypatch.setitem(detectors.LOADERS, "inception", lambda device, **kw: Inception())
    detectors.clear_cache()
    yield
    detectors.clear_cache()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    torch.manual_seed(0)
    WR.write_edm2_pickle(d / "pos.pkl", WR.make_precond(**TINY), half=False)
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (30, 16, 16, 3), generator=g, dtype=torch.uint8).numpy()
    saved = detectors.LOADERS["inception"]
    detectors.LOADERS["inception"] = lambda device, **kw: Inception()
    try:
        save_ref(api.compute_stats([images], ["inception"], progress=False), d / "ref.pkl")
    finally:
        detectors.LOADERS["inception"] = saved
        detectors.clear_cache()
    return {"dir": d, "net": d / "pos.pkl", "ref": d / "ref.pkl", "refs": {}}


@pytest.fixture(autouse=True)
def one_thread():
    """Every run here computes features with one thread, as the torchrun workers (OMP_NUM_THREADS=1) do:
    float32 features then round alike wherever an image is scored (FID differed by 7e-9 with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def args(assets, mode: str, out: pathlib.Path, *extra, metrics: bool = True) -> list[str]:
    """The sampler command line of a test run (``--batch 2`` unless the mode or ``extra`` say otherwise)."""
    m = ["--metrics", "fid,is,saturation", "--ref_path", str(assets["ref"])] if metrics or mode == "none" else []
    return ["--net_pos_pkl", str(assets["net"]), "--outdir", str(out), "--seeds", SEEDS[mode], "--steps", "2",
            "--batch", "2", "--g_method", "swg", "--g_weight", "0.3", "--swg_sizes", "12", "--device", "cpu",
            *m, *MODE_ARGS[mode], *extra]


def outputs(folder: pathlib.Path) -> dict:
    """sha256 of every image by file name: loose PNGs and tar members (a member stored twice fails)."""
    out = {}
    for p in sorted(folder.rglob("*.png")):
        out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                assert m.name not in out, f"{m.name} stored twice ({shard.name})"
                out[m.name] = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
    return out


def metrics_of(folder: pathlib.Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())["results"]


def reference(assets, mode: str) -> tuple[dict, dict]:
    """(images, metrics) of one uninterrupted single-process run (made once per mode)."""
    if mode not in assets["refs"]:
        out = assets["dir"] / f"ref-{mode}"
        assert sample_edm2.main(args(assets, mode, out)) == 0
        assets["refs"][mode] = (outputs(out), metrics_of(out))
    return assets["refs"][mode]


def assert_same_as_reference(assets, mode: str, out: pathlib.Path) -> None:
    images, metrics = reference(assets, mode)
    assert outputs(out) == images  # every image, bit for bit, once
    got = metrics_of(out)
    assert got["num_images"] == metrics["num_images"]
    for key, value in metrics.items():  # float64 sums in another order across ranks: ~1e-16
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert W.scan_outputs(out)[1] == [] and not [p for p in out.rglob("*") if ".tmp" in p.name]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOB_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", SWG_DIST_TIMEOUT="20")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun(launcher: list[str], argv: list[str], **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(JOB), *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(argv: list[str], **env) -> list[subprocess.Popen]:
    """Two torchrun launchers of one process each, meeting at 127.0.0.1 like two nodes of a SLURM job."""
    port = free_port()
    return [torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--rdzv_backend", "c10d",
                      "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"test-{port}"], argv, **env)
            for rank in (0, 1)]


def stop_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("stopped:")]


def stopped_in_process(assets, mode: str, out: pathlib.Path, monkeypatch, capsys, at_batch: int) -> None:
    """A single-process run that SIGUSR1 (SLURM's --signal) stops before batch ``at_batch``."""
    real, seen = run.Backend.images, []

    def images(self, seeds, device):
        seen.append(seeds)
        if len(seen) == at_batch:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, seeds, device)

    monkeypatch.setattr(run.Backend, "images", images)
    capsys.readouterr()
    assert sample_edm2.main(args(assets, mode, out)) == EXIT_RESUMABLE
    err = capsys.readouterr().err
    (line,) = stop_lines(err)
    assert "SIGUSR1 received" in line and "rerun the same command to resume" in line and str(out) in line
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the command leaves its handlers as it found them
    monkeypatch.setattr(run.Backend, "images", real)


# ----------------------------------------------------------------------------
# Preemption: in one process, then SIGTERM at three points under torchrun with 2 ranks.

def test_preemption_handler_drops_work_but_never_cuts_a_deferred_block():
    with Preemption() as p:
        with pytest.raises(Preempted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal interrupts this
        assert info.value.signal == "SIGTERM" and info.value.exit_code == EXIT_RESUMABLE
        os.kill(os.getpid(), signal.SIGUSR1)  # raised once only: later signals are just noted
    with Preemption() as p:
        finished = []
        with pytest.raises(Preempted):
            with p.deferred():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.2)
                finished.append(True)  # still reached: raised on leaving the block
        assert finished == [True] and p.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("mode", ["png", "subdirs", "tar", "none"])
def test_sigusr1_in_one_process_then_two_nodes_finish(assets, mode, tmp_path, monkeypatch, capsys):
    """World size 1 -> 2 (two launchers, --nnodes 2, c10d at 127.0.0.1): the images of one process."""
    out = tmp_path / "run"
    stopped_in_process(assets, mode, out, monkeypatch, capsys, at_batch=10 if mode == "none" else 4)
    done = W.done_seeds(out)
    assert (0 < len(done) < 40) if mode != "none" else (out / stream.STATE_DIR).is_dir()
    first = {name: digest for name, digest in outputs(out).items()}
    procs = two_nodes(args(assets, mode, out, "--batch", "3" if mode != "none" else "8"))
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert_same_as_reference(assets, mode, out)
    assert all(outputs(out)[name] == digest for name, digest in first.items())  # finished images kept


@pytest.mark.parametrize("mode,hook", [("subdirs", "term-launcher@3"), ("none", "term-in-save"),
                                       ("tar", "term-in-metrics")])
def test_sigterm_on_two_ranks_stops_cleanly_and_resumes_on_one(assets, mode, hook, tmp_path, capsys):
    """SIGTERM to torchrun (forwarded to both ranks) during sampling, a streaming save, the final metrics;
    then world size 2 -> 1 with another --batch: the same images and metrics as an uninterrupted run."""
    out = tmp_path / "run"
    code, err = finish(torchrun(["--standalone", "--nproc_per_node", "2"], args(assets, mode, out),
                                JOB_HOOK=hook, JOB_DELAY=0.1, JOB_SAVE_EVERY=10))
    assert code == 1, err[-3000:]  # torchrun's own status after a SIGTERM (its workers exit 75)
    (line,) = stop_lines(err)
    assert "SIGTERM received" in line and "rerun the same command to resume" in line, line
    assert not [p for p in out.rglob("*") if ".tmp" in p.name] and W.scan_outputs(out)[1] == []
    assert not (out / L.LOCK_NAME).exists() and not (out / "metrics.json").exists()
    if mode == "subdirs":
        assert 0 < len(W.done_seeds(out)) < 40
    if mode == "none":
        assert any((out / stream.STATE_DIR).glob("stream-*.pt"))
    if mode == "tar":
        assert len(W.done_seeds(out)) == 40  # stopped while scoring
    capsys.readouterr()
    assert sample_edm2.main(args(assets, mode, out, "--batch", "3")) == 0
    assert_same_as_reference(assets, mode, out)


# ----------------------------------------------------------------------------
# Two nodes, one lost; torchrun restarts.

def test_a_lost_node_stops_the_other_within_the_timeout_and_one_node_finishes(assets, tmp_path, capsys):
    """Two launchers (PNG); node 1 vanishes; node 0 stops with one line; a rerun on one node completes."""
    out = tmp_path / "run"
    ready = tmp_path / "ready"
    procs = two_nodes(args(assets, "png", out), JOB_DELAY=0.3, JOB_READY=ready, SWG_DIST_TIMEOUT=10)
    deadline = time.monotonic() + 120
    while not (pathlib.Path(f"{ready}.1").exists() and (out / "0000002.png").exists()) \
            and time.monotonic() < deadline:  # node 1 has published an image
        time.sleep(0.1)
    worker = int(pathlib.Path(f"{ready}.1").read_text())
    os.kill(worker, signal.SIGKILL)  # node 1 goes away: its worker and its launcher
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    code, err = finish(procs[0], timeout=60)
    assert time.monotonic() - t0 < 10 + 15
    procs[1].communicate()
    assert code != 0
    (line,) = stop_lines(err)
    assert "lost contact with the other processes" in line and "rerun the same command to resume" in line
    # (torchrun's own report varies: node 1's launcher may have hosted the rendezvous store)
    done = W.done_seeds(out)
    assert 0 < len(done) < 40 and any(s // 2 % 2 for s in done)  # node 1 (batches 2-3, 6-7, ...) wrote too
    capsys.readouterr()
    assert sample_edm2.main(args(assets, "png", out)) == 0  # the rerun on one node
    assert_same_as_reference(assets, "png", out)


@pytest.mark.parametrize("mode", ["tar", "none"])
def test_torchrun_restart_after_a_killed_rank_gives_the_same_result(assets, mode, tmp_path):
    out = tmp_path / "run"
    code, err = finish(torchrun(["--standalone", "--nproc_per_node", "2", "--max-restarts", "1"],
                                args(assets, mode, out), JOB_HOOK="kill-self@3", JOB_RANK=1, JOB_SAVE_EVERY=10))
    assert code == 0, err[-3000:]
    assert len(stop_lines(err)) == 1  # the first attempt's rank 0 stopped cleanly when torchrun stopped it
    assert_same_as_reference(assets, mode, out)


# ----------------------------------------------------------------------------
# One run per folder.

def test_a_second_run_on_a_busy_folder_is_refused_and_a_stale_lock_is_taken_over(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert sample_edm2.main(args(assets, "png", out, "--seeds", "0-3", metrics=False)) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with L.FolderLock(out) as held:  # another live run (this process) holds the folder
        capsys.readouterr()
        assert sample_edm2.main(args(assets, "png", out, "--seeds", "0-7", metrics=False)) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and "is in use by another run" in err[0]
        assert f"host {socket.gethostname()}, pid {os.getpid()}, started {held.record['started']}" in err[0]
        assert "--outdir" in err[0]
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != L.LOCK_NAME} == before
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / L.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "token": "x",
                                               "started": "2026-01-01T00:00:00+00:00"}))
    capsys.readouterr()
    assert sample_edm2.main(args(assets, "png", out, "--seeds", "0-7", metrics=False)) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of an earlier run in {out}" in err and f"its process {gone.pid} has ended" in err
    assert sorted(W.done_seeds(out)) == list(range(8)) and not (out / L.LOCK_NAME).exists()


def test_lock_file_rules(tmp_path, monkeypatch):
    held = L.FolderLock(tmp_path, stale_s=60).acquire()
    with pytest.raises(L.FolderBusy, match="pid"):
        L.FolderLock(tmp_path, stale_s=60).acquire()
    held.release()
    assert not (tmp_path / L.LOCK_NAME).exists()
    path = tmp_path / L.LOCK_NAME
    other = {"host": "node-elsewhere", "pid": 1, "token": "t", "started": "then"}
    path.write_text(json.dumps(other))  # another host, refreshed just now: busy
    with pytest.raises(L.FolderBusy, match="host node-elsewhere, pid 1, started then"):
        L.FolderLock(tmp_path, stale_s=60).acquire()
    os.utime(path, (time.time() - 61, time.time() - 61))  # not refreshed for longer than stale_s: gone
    taken = L.FolderLock(tmp_path, stale_s=60).acquire()
    assert "last refreshed 61 s ago" in taken.note
    # The holder refreshes its file while it runs (every stale_s / 4).
    os.utime(path, (time.time() - 50, time.time() - 50))
    taken.stale_s = 2.0
    taken.release()
    beat = L.FolderLock(tmp_path, stale_s=2.0).acquire()
    os.utime(path, (time.time() - 50, time.time() - 50))
    time.sleep(1.2)
    assert time.time() - path.stat().st_mtime < 1.0
    beat.release()
    # A pid reused by a newer process on this host is not the holder.
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "proc_start": "1",
                                "token": "t", "started": "then"}))
    assert "another process" in L.FolderLock(tmp_path).acquire().note


# ----------------------------------------------------------------------------
# Damaged finished images (issue 23, item 2).

@pytest.mark.parametrize("mode", ["png", "tar"])
def test_damaged_finished_images_are_drawn_again(assets, mode, tmp_path, capsys):
    out = tmp_path / "run"
    assert sample_edm2.main(args(assets, mode, out, metrics=False)) == 0
    if mode == "png":
        (out / "0000003.png").write_bytes((out / "0000003.png").read_bytes()[:100])  # truncated
        (out / "0000007.png").write_bytes(b"")  # empty
        damaged = ["0000003.png", "0000007.png"]
    else:
        shard = out / "0000000-0000039.tar"
        shard.write_bytes(shard.read_bytes()[:3000])
        damaged = [shard.name]
    capsys.readouterr()
    assert sample_edm2.main(args(assets, mode, out, metrics=False)) == 0
    err = capsys.readouterr().err
    assert "damaged image file(s)" in err and all(name in err for name in damaged)
    assert sorted(p.name for p in out.rglob("*.damaged")) == [f"{name}.damaged" for name in damaged]
    assert_images = reference(assets, mode)[0]
    assert outputs(out) == assert_images
    assert sample_edm2.main(args(assets, mode, out)) == 0  # and scoring them works
    assert metrics_of(out) == pytest.approx(reference(assets, mode)[1], rel=1e-12)
