"""metrics.stream: streamed statistics equal write-then-score, survive interruptions, and load as stats files."""

import functools
import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from metrics import api, detectors, dinov2
from metrics.cli import main as cli
from metrics.detectors import DINOv2Detector
from metrics.refs import save_ref
from metrics.scores import inception_score, inception_score_from_sums
from metrics.stream import StreamingStats
from utils import dist
from utils.errors import UsageError
from tests.tiny_detectors import TinyInception as InceptionStandIn

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS_REF = ROOT / "demo" / "refs" / "digits-ref.pkl"


# Inception stand-in: 24-d features, 1008 probabilities of which some are exactly 0 (0 log 0).
TinyInception = functools.partial(InceptionStandIn, dim=24, seed=1, sharpness=3, zero_from=500, spatial_dim=12)


def tiny_dinov2():
    torch.manual_seed(3)
    return DINOv2Detector(dinov2.build_dinov2(embed_dim=16, depth=1, num_heads=2).eval())


@pytest.fixture(autouse=True)
def tiny_detectors(monkeypatch):
    monkeypatch.setitem(detectors.LOADERS, "inception", lambda device, **kw: TinyInception())
    monkeypatch.setitem(detectors.LOADERS, "dinov2", lambda device, **kw: tiny_dinov2())
    detectors.clear_cache()
    yield
    detectors.clear_cache()


def make_images(seeds, size=16, grey=False):
    """uint8 NCHW images, one per seed, a pure function of the seed (as a sampler's)."""
    out = []
    for s in seeds:
        rng = np.random.default_rng(1000 + s)
        base = rng.integers(0, 256, (1 if grey else 3, size, size), dtype=np.uint8)
        out.append(base // (1 + s % 3))
    return torch.from_numpy(np.stack(out))


def write_pngs(folder, seeds, images):
    folder.mkdir(parents=True, exist_ok=True)
    for s, x in zip(seeds, images):
        a = x.permute(1, 2, 0).numpy()
        PIL.Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / f"{s:07d}.png")
    return folder


def feed(st, sampler_batch, grey=False, stop_after=None):
    """Sample this rank's plan (batches of ``sampler_batch``) into ``st``; stop early after ``stop_after`` batches."""
    plan = st.plan(sampler_batch)
    for i, seeds in enumerate(plan):
        if stop_after is not None and i >= stop_after:
            return plan[i:]
        st.update(seeds, make_images(seeds, grey=grey))
    return []


def run_cli(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout) if args[0] == "calc" else res.stdout


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


SEEDS = list(range(5, 5 + 150))
TINY = "fid,fd_dinov2,is,saturation"
FAST = "fid,is,saturation,sfid,pr,kid,dc"  # no DINOv2: for the tests that start processes
ROWS = "fid,sfid,is,pr,kid,dc,kid_dinov2,dc_dinov2"  # the metrics that keep float16 rows per chunk


def rows_ref(seed=7):
    """A reference with rows for the row metrics (random, 24-d and 12-d for the stand-in)."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((40, 24)) * 0.3
    return {"fid": {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False), "features": f.astype(np.float16)},
            "sfid": {"mu": np.zeros(12), "sigma": np.eye(12)}}


def test_inception_score_from_sums_matches_rows():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(7, 0.3), size=53)
    p[p < 0.02] = 0
    p /= p.sum(1, keepdims=True)
    splits = 4
    bounds = [i * 53 // splits for i in range(splits + 1)]
    parts = [p[a:b] for a, b in zip(bounds, bounds[1:])]
    plogp = [np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0).sum() for q in parts]
    got = inception_score_from_sums([len(q) for q in parts], [q.sum(0) for q in parts], plogp)
    assert got == pytest.approx(inception_score(p, splits), rel=1e-12)


@pytest.mark.parametrize("kind", ["tiny", "rows", "digits"])
def test_stream_equals_write_then_score(tmp_path, kind):
    """Streaming (sampler batches of 7, out of seed order) == `python -m metrics calc` on the PNGs, <= 1e-9
    (FD, IS, KID on float64 sums of the same float16 rows), exactly for counts (precision, recall, density,
    coverage)."""
    if kind in ("tiny", "rows"):
        metrics, grey = (TINY if kind == "tiny" else ROWS), False
        ref = tmp_path / "ref.pkl"
        other = write_pngs(tmp_path / "other", range(40), make_images(range(1000, 1040)))
        run_cli("ref", "--images", other, "--dest", ref, "--metrics", "fid,sfid,fd_dinov2", "--features", 40)
    else:  # the real digit classifier: its features depend on the batch, so chunking matters
        metrics, grey, ref = "fd_digits,conf_digits,saturation", True, DIGITS_REF
    st = StreamingStats(metrics, SEEDS[::-1], batch=64, device="cpu")
    plan = st.plan(7)
    for seeds in plan[1::2] + plan[::2]:  # batches arrive out of order, as from several ranks
        st.update(seeds, make_images(seeds, grey=grey))
    streamed = api.calc_metrics_from_stats(st.finish(), api.load_ref(ref), api.parse_metrics(metrics))

    folder = write_pngs(tmp_path / "pngs", SEEDS, make_images(SEEDS, grey=grey))
    written = run_cli("calc", "--images", folder, "--ref", ref, "--metrics", metrics, "--device", "cpu")
    assert set(streamed) == set(written) and streamed["num_images"] == 150
    for key, value in written.items():
        if key.startswith(("precision", "recall", "density", "coverage")):
            assert streamed[key] == value, key
        else:
            assert rel(streamed[key], value) <= 1e-9, (key, streamed[key], value)
    if kind == "rows":
        assert {"sfid", "kid_inception", "kid_dinov2", "coverage_dinov2", "recall_inception"} <= set(written)


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    whole = StreamingStats(TINY, SEEDS, batch=16, device="cpu")
    feed(whole, 5)
    expect = whole.finish()

    state = tmp_path / "state"
    first = StreamingStats(TINY, SEEDS, batch=16, device="cpu", state_dir=state, save_every=40)
    feed(first, 5, stop_after=14)  # 70 images: chunks 0-3 complete, saved after chunk 2 (48 >= 40)
    del first  # killed: unsaved chunk 3 and the partial chunk 4 are lost
    files = sorted(p.name for p in state.iterdir())
    assert files == ["stream-g0001-r0000.pt"]
    (state / ".stream-g0001-r0000.pt.k9x2.tmp.pt").write_bytes(b"half a save")  # killed while saving

    second = StreamingStats(TINY, SEEDS, batch=16, device="cpu", state_dir=state, save_every=40)
    assert second.done_before == {0, 1, 2}
    assert second.pending_seeds() == SEEDS[48:]
    feed(second, 5)
    got = second.finish()
    assert sorted(p.name for p in state.iterdir()) == ["stream-g0003-r0000.pt"]  # one complete file
    for key in ("fid", "fd_dinov2"):
        np.testing.assert_allclose(got[key]["mu"], expect[key]["mu"], rtol=1e-12, atol=0)
        np.testing.assert_allclose(got[key]["sigma"], expect[key]["sigma"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["probs_splits"]["sum"], expect["probs_splits"]["sum"], rtol=1e-12, atol=1e-15)
    assert got["saturation"] == pytest.approx(expect["saturation"], rel=1e-12)

    # A finished run samples nothing and reports the same statistics; nothing is rewritten.
    before = (state / "stream-g0003-r0000.pt").stat().st_mtime_ns
    third = StreamingStats(TINY, SEEDS, batch=16, device="cpu", state_dir=state)
    assert third.plan(5) == [] and third.pending_seeds() == []
    again = third.finish()
    assert np.array_equal(again["fid"]["sigma"], got["fid"]["sigma"]) and again["num_images"] == 150
    assert (state / "stream-g0003-r0000.pt").stat().st_mtime_ns == before


def test_other_settings_are_refused(tmp_path):
    state = tmp_path / "state"
    st = StreamingStats("fid,is", SEEDS, device="cpu", state_dir=state, save_every=1, settings={"g_weight": [0.2]})
    feed(st, 64, stop_after=1)
    for kwargs, word in [(dict(metrics="fid"), "metrics"), (dict(seeds=SEEDS[:-1]), "seeds"),
                         (dict(batch=32), "batch"), (dict(settings={"g_weight": [0.3]}), "run.g_weight")]:
        args = dict(metrics="fid,is", seeds=SEEDS, settings={"g_weight": [0.2]}) | kwargs
        with pytest.raises(UsageError, match=word) as err:
            StreamingStats(args.pop("metrics"), args.pop("seeds"), device="cpu", state_dir=state, **args)
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="at least 10 images"):
        StreamingStats("is", range(9), device="cpu")


def test_stats_file_round_trip(tmp_path):
    """--save_stats layout: `metrics calc` scores it without images and uses it as a reference."""
    ref = tmp_path / "ref.pkl"
    other = write_pngs(tmp_path / "other", range(40), make_images(range(1000, 1040)))
    run_cli("ref", "--images", other, "--dest", ref, "--metrics", "fid,fd_dinov2")
    st = StreamingStats(TINY, SEEDS, device="cpu")
    feed(st, 32)
    stats = st.finish()
    direct = api.calc_metrics_from_stats(stats, api.load_ref(ref), api.parse_metrics(TINY))
    path = save_ref(stats, tmp_path / "run_stats.pkl")
    from_file = run_cli("calc", "--images", path, "--ref", ref, "--metrics", TINY)
    assert from_file == pytest.approx(direct, rel=1e-12)
    with open(path, "rb") as f:  # EDM2's layout: plain dicts of numpy arrays
        raw = pickle.load(f)
    assert raw["fid"]["sigma"].shape == (24, 24) and raw["probs_splits"]["sum"].shape == (10, 1008)
    # As a reference: the images it was made from are at distance ~0.
    folder = write_pngs(tmp_path / "pngs", SEEDS, make_images(SEEDS))
    self_fd = run_cli("calc", "--images", folder, "--ref", path, "--metrics", "fid")["fid"]
    assert abs(self_fd) < 1e-9 * np.trace(raw["fid"]["sigma"])
    res = CliRunner().invoke(cli, ["calc", "--images", str(path), "--ref", str(ref), "--metrics", "fd_dinov2,conf_digits"])
    assert res.exit_code == 2 and "probs_digits_splits" in res.stderr


def test_resume_keeps_the_saves_other_ranks_begin_after_the_barrier(tmp_path, monkeypatch):
    """Rank 0 of a resumed launch deletes the temporary files of killed saves, but not another rank's save
    in progress: once the load's barrier releases them the other ranks save rows (this raced under load)."""
    state = tmp_path / "state"
    first = StreamingStats("fid,kid", SEEDS, batch=16, device="cpu", state_dir=state, save_every=16)
    feed(first, 16, stop_after=2)
    rows = state / "rows"
    assert sorted(p.name for p in rows.iterdir()) == ["chunk-000000.pt", "chunk-000001.pt"]
    dead = rows / ".chunk-000002.pt.k9x2.tmp.pt"
    dead.write_bytes(b"half a save")  # the first launch was killed while saving
    live = rows / ".chunk-000003.pt.a1b2.tmp.pt"

    def barrier():  # the other rank passes the barrier and starts saving a chunk before rank 0 goes on
        live.write_bytes(b"being written")

    monkeypatch.setattr(dist, "barrier", barrier)
    second = StreamingStats("fid,kid", SEEDS, batch=16, device="cpu", state_dir=state, save_every=16)
    assert second.done_before == {0, 1}
    assert not dead.exists() and live.exists()


def _dist_worker(rank, store, state, out, threads):
    import torch.distributed as tdist
    torch.set_num_threads(threads)  # the parent's: float32 features then round alike (sFID differed by 2e-9 under load)
    detectors.LOADERS["inception"] = lambda device, **kw: TinyInception()
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        first = StreamingStats(FAST, SEEDS, batch=16, device="cpu", state_dir=state, save_every=16)
        feed(first, 8, stop_after=3 + rank)  # both ranks save some chunks, then "die"
        tdist.barrier()
        second = StreamingStats(FAST, SEEDS, batch=16, device="cpu", state_dir=state, save_every=16)
        feed(second, 8)
        stats = second.finish()
        if rank == 0:
            with open(out, "wb") as f:
                pickle.dump(stats, f)
    finally:
        if tdist.is_initialized():  # a lost peer has destroyed it already (utils.dist): report that error
            tdist.destroy_process_group()


def test_two_ranks_with_resume_equal_one(tmp_path):
    single = StreamingStats(FAST, SEEDS, batch=16, device="cpu")
    feed(single, 8)
    expect = single.finish()
    torch.multiprocessing.spawn(_dist_worker, args=(str(tmp_path / "store"), str(tmp_path / "state"),
                                                    str(tmp_path / "r.pkl"), torch.get_num_threads()),
                                 nprocs=2, join=True)
    with open(tmp_path / "r.pkl", "rb") as f:
        multi = pickle.load(f)
    np.testing.assert_array_equal(multi["fid"]["features"], expect["fid"]["features"])  # rows gathered in seed order
    ref = rows_ref()
    a = api.calc_metrics_from_stats(multi, ref, api.parse_metrics(FAST))
    b = api.calc_metrics_from_stats(expect, ref, api.parse_metrics(FAST))
    for key in b:
        # is_std is a spread of ten split scores: its rounding error scales with the scores, not with itself
        scale = abs(b["is"]) if key == "is_std" else abs(b[key])
        assert abs(a[key] - b[key]) <= 1e-9 * scale, key
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["rows", "stream-g0003-r0000.pt"]
    assert len(list((tmp_path / "state" / "rows").glob("chunk-*.pt"))) == 10  # 150 images in chunks of 16


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_metrics_stream import TinyInception, make_images, SEEDS, FAST
    from metrics import detectors
    from metrics.stream import StreamingStats
    detectors.LOADERS["inception"] = lambda device, **kw: TinyInception()
    st = StreamingStats(FAST, SEEDS, batch=16, device="cpu", state_dir={state!r}, save_every=16)
    for seeds in st.plan(8):
        st.update(seeds, make_images(seeds))
        time.sleep(0.05)
    print("finished", flush=True)
""")


def test_kill_minus_nine_then_rerun(tmp_path):
    state = tmp_path / "state"
    script = _KILL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), state=str(state))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (state.is_dir() and any(state.glob("stream-*.pt"))):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    time.sleep(0.1)
    proc.kill()  # SIGKILL, possibly in the middle of a save
    proc.wait()
    assert b"finished" not in proc.stdout.read()
    resumed = StreamingStats(FAST, SEEDS, batch=16, device="cpu", state_dir=state, save_every=16)
    assert 0 < len(resumed.done_before) < len(resumed.chunks)
    feed(resumed, 8)
    got = resumed.finish()
    whole = StreamingStats(FAST, SEEDS, batch=16, device="cpu")
    feed(whole, 8)
    expect = whole.finish()
    np.testing.assert_allclose(got["fid"]["sigma"], expect["fid"]["sigma"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["fid"]["mu"], expect["fid"]["mu"], rtol=1e-12, atol=1e-15)
    assert got["saturation"] == pytest.approx(expect["saturation"], rel=1e-12)
    np.testing.assert_array_equal(got["fid"]["features"], expect["fid"]["features"])  # the float16 rows survive
    a = api.calc_metrics_from_stats(got, rows_ref(), api.parse_metrics(FAST))
    b = api.calc_metrics_from_stats(expect, rows_ref(), api.parse_metrics(FAST))
    for key in b:
        scale = abs(b["is"]) if key == "is_std" else abs(b[key])
        assert abs(a[key] - b[key]) <= 1e-9 * scale, key


def test_combine_equals_statistics_of_the_union(tmp_path):
    parts = []
    for seeds in (SEEDS[:60], SEEDS[60:]):
        st = StreamingStats("fid,saturation", seeds, device="cpu")
        feed(st, 32)
        parts.append(save_ref(st.finish(), tmp_path / f"part{len(parts)}.pkl"))
    res = CliRunner().invoke(cli, ["combine", "--stats", str(parts[0]), "--stats", str(parts[1]),
                                   "--dest", str(tmp_path / "all.pkl")])
    assert res.exit_code == 0, res.stderr
    whole = StreamingStats("fid,saturation", SEEDS, device="cpu")
    feed(whole, 32)
    expect = whole.finish()
    got = api.load_ref(tmp_path / "all.pkl")
    assert got["num_images"] == 150
    np.testing.assert_allclose(got["fid"]["mu"], expect["fid"]["mu"], rtol=1e-12)
    np.testing.assert_allclose(got["fid"]["sigma"], expect["fid"]["sigma"], rtol=1e-9, atol=1e-12)
    assert got["saturation"] == pytest.approx(expect["saturation"], rel=1e-12)
    # The same file twice would count its images twice: refused, nothing written.
    res = CliRunner().invoke(cli, ["combine", "--stats", str(parts[0]), "--stats", str(parts[0]),
                                   "--dest", str(tmp_path / "twice.pkl")])
    assert res.exit_code == 2 and "is given more than once" in res.stderr and not (tmp_path / "twice.pkl").exists()
