"""sample_edm2.py end to end on CPU with tiny official-layout checkpoints the tests write."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import pickle
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import sample_edm2
from guidance import guide
from networks.edm2_pickle import load_checkpoint
from sampling import edm2_run
from sampling.edm import edm_sampler
from sampling.seeds import StackedRandomGenerator
from benchmarks import edm2_snapshot as WR

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=8,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
FAST = ["--steps", "2", "--batch", "4"]


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    WR.write_edm2_pickle(d / "pos.pkl", WR.make_precond(**TINY), half=False)
    torch.manual_seed(1)
    WR.write_edm2_pickle(d / "neg.pkl", WR.make_precond(**dict(TINY, model_channels=4)), half=False)
    torch.manual_seed(2)
    WR.write_edm2_pickle(d / "uncond.pkl", WR.make_precond(**dict(TINY, label_dim=0)), half=False)
    (d / "evil.pkl").write_bytes(pickle.dumps({"ema": _Evil(d / "PWNED")}))
    (d / "trunc.pkl").write_bytes((d / "pos.pkl").read_bytes()[:3000])
    return d


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run_cli(args, capsys):
    """Run the CLI in-process; return (exit code, stderr)."""
    capsys.readouterr()
    code = sample_edm2.main([str(a) for a in args])
    return code, capsys.readouterr().err


def _pngs(d: pathlib.Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.png"))}


METHOD_ARGS = {
    "none": [],
    "cfg": ["--g_method", "cfg", "--g_weight", "0.5", "--net_neg_pkl", "uncond.pkl"],
    "wmg": ["--g_method", "wmg", "--g_weight", "0.5", "--net_neg_pkl", "neg.pkl"],
    "swg": ["--g_method", "swg", "--g_weight", "0.3", "--swg_sizes", "12", "--swg_steps", "2"],
    "wmg-swg": ["--g_method", "wmg-swg", "--g_weight", "1.2,0.14", "--net_neg_pkl", "neg.pkl", "--swg_sizes", "8",
                "--swg_steps", "3", "--scale_window_guide", "0"],
    "cfg_swg": ["--g_method", "cfg_swg", "--g_weight", "0.3,0.3", "--net_neg_pkl", "uncond.pkl", "--swg_sizes",
                "12", "--g_interval", "0,0", "--clean_combos"],
}


def _with_nets(args, nets):
    return [str(nets / a) if str(a).endswith(".pkl") else a for a in args]


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_every_method_through_cli(method, nets, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["--net_pos_pkl", nets / "pos.pkl", "--outdir", out, "--seeds", "0-1", *FAST,
                         *_with_nets(METHOD_ARGS[method], nets)], capsys)
    assert code == 0, err
    pngs = _pngs(out)
    assert sorted(pngs) == ["0000000.png", "0000001.png"]
    img = np.asarray(PIL.Image.open(out / "0000000.png"))
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and img.std() > 0
    args = json.loads((out / "settings.json").read_text())
    assert args["g_method"] == method.replace("_", "-") and args["seeds"] == "0-1"


def test_cli_image_equals_direct_api(nets, tmp_path, capsys):
    """The PNG of a seed equals sampler(guide(net)) with EDM2's per-seed draws, computed here directly."""
    out = tmp_path / "out"
    code, err = run_cli(["--net_pos_pkl", nets / "pos.pkl", "--outdir", out, "--seeds", "5,9", "--class", "3",
                         *FAST, *METHOD_ARGS["swg"]], capsys)
    assert code == 0, err
    net = load_checkpoint(nets / "pos.pkl").net
    rnd = StackedRandomGenerator("cpu", [5, 9])
    noise = rnd.randn([2, 3, 16, 16])
    rnd.randint(10, size=[2])  # the label draw happens even with --class
    labels = torch.eye(10)[[3, 3]]
    D = guide(lambda x, s, c: net(x, s, c), method="swg", weight=0.3, window_size=12, window_steps=2, masked=True)
    with torch.no_grad():
        x = edm_sampler(D, noise, labels, num_steps=2, randn_like=rnd.randn_like)
    expect = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / "0000005.png")), expect[0])
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / "0000009.png")), expect[1])


def test_resume_equals_uninterrupted_and_keeps_files(nets, tmp_path, capsys):
    common = ["--net_pos_pkl", nets / "pos.pkl", *FAST, *METHOD_ARGS["swg"], "--subdirs"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli([*common, "--outdir", a, "--seeds", "0-3"], capsys)[0] == 0
    first = {p: (a / p).stat().st_ino for p in _pngs(a)}
    code, err = run_cli([*common, "--outdir", a, "--seeds", "0-7"], capsys)
    assert code == 0, err
    assert {p: (a / p).stat().st_ino for p in first} == first  # finished files untouched
    assert run_cli([*common, "--outdir", b, "--seeds", "0-7"], capsys)[0] == 0
    assert _pngs(a) == _pngs(b) and len(_pngs(b)) == 8
    assert all(p.startswith("000000/") for p in _pngs(b))
    # Nothing left to do: a rerun writes nothing and says so.
    code, err = run_cli([*common, "--outdir", a, "--seeds", "0-7"], capsys)
    assert code == 0 and "already exist" in err


def test_tar_output_and_resume(nets, tmp_path, capsys):
    out = tmp_path / "t"
    common = ["--net_pos_pkl", nets / "pos.pkl", *FAST, "--save_tar", "--outdir", out]
    assert run_cli([*common, "--seeds", "0-2"], capsys)[0] == 0
    assert run_cli([*common, "--seeds", "0-4"], capsys)[0] == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["0000000-0000002.tar", "0000003-0000004.tar"]
    from sampling.writer import done_seeds
    assert done_seeds(out) == {0, 1, 2, 3, 4}


def test_latent_model_with_vae(tmp_path, capsys):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    net = WR.make_precond(**dict(TINY, img_resolution=8, img_channels=4))
    WR.write_edm2_pickle(tmp_path / "lat.pkl", net,
                         encoder=WR.OfficialStabilityVAEEncoder(vae_name=str(tmp_path / "vae")))
    out = tmp_path / "out"
    code, err = run_cli(["--net_pos_pkl", tmp_path / "lat.pkl", "--outdir", out, "--seeds", "0", *FAST,
                         "--g_method", "swg", "--g_weight", "0.2", "--swg_sizes", "4"], capsys)
    assert code == 0, err
    assert np.asarray(PIL.Image.open(out / "0000000.png")).shape == (16, 16, 3)


def test_presets_resolve(nets):
    cfg = edm2_run.build_config(preset="swg-edm2-s-rct-mswg", outdir=None, require_outdir=False)
    assert cfg.net_pos_pkl.endswith("edm2-img512-s/edm2-img512-s-2147483-0.100.pkl")
    assert cfg.net_neg_pkl.endswith("edm2-img512-xs/edm2-img512-xs-0134217-0.100.pkl")
    g = cfg.guidance
    assert (g.method, g.weights, g.window_size, g.window_steps) == ("wmg-swg", (1.2, 0.14), (40,), (2,))
    assert cfg.ref_path.endswith("dataset-refs/img512.pkl")
    # The command line wins over the preset.
    cfg = edm2_run.build_config(preset="swg-edm2-s-mswg-0.2", net_pos_pkl=str(nets / "pos.pkl"), g_weight="0.7",
                                outdir=None, require_outdir=False)
    assert cfg.net_pos_pkl == str(nets / "pos.pkl") and cfg.guidance.weights == (0.7,) and cfg.guidance.method == "swg"
    cfg = edm2_run.build_config(preset="edm2-img512-s-guid-dino", outdir=None, require_outdir=False)
    assert cfg.guidance.method == "cfg" and cfg.guidance.weights == (0.9,)


def test_preset_through_cli(nets, tmp_path, capsys):
    out = tmp_path / "p"
    code, err = run_cli(["--preset", "swg-edm2-s-mswg-1.1", "--net_pos_pkl", nets / "pos.pkl", "--swg_sizes", "8",
                         "--outdir", out, "--seeds", "0", *FAST], capsys)
    assert code == 0, err
    args = json.loads((out / "settings.json").read_text())
    assert args["g_weight"] == [1.1] and args["swg_sizes"] == [8] and args["preset"] == "swg-edm2-s-mswg-1.1"


def _free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SWG_CACHE", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{_free_port()}/edm2/raw-snapshots/edm2-img512-s/edm2-img512-s-2147483-0.100.pkl"
    out = tmp_path / "out"
    code, err = run_cli(["--net_pos_pkl", url, "--outdir", out], capsys)
    assert code == 2 and err.count("\n") == 1
    assert url in err and str(tmp_path / "cache" / "127.0.0.1" / "edm2" / "raw-snapshots") in err
    assert "or run with --prefetch where there is internet" in err  # this command's own remedy
    assert not out.exists()
    code, err = run_cli(["--net_pos_pkl", url, "--prefetch"], capsys)
    assert code == 2 and url in err


def test_prefetch_local(nets, tmp_path, capsys):
    ref = tmp_path / "ref.pkl"
    ref.write_bytes(b"stats")
    capsys.readouterr()
    assert sample_edm2.main(["--net_pos_pkl", str(nets / "pos.pkl"), "--ref_path", str(ref), "--prefetch"]) == 0
    out = capsys.readouterr().out
    assert f"cached: {nets / 'pos.pkl'}" in out and f"cached: {ref}" in out


BAD = {
    "seeds-decreasing": (["--seeds", "5-1"], "decreasing"),
    "seeds-text": (["--seeds", "a-b"], "--seeds"),
    "seeds-negative": (["--seeds", "-3"], "0..9999999"),
    "unknown-method": (["--g_method", "foo"], "unknown --g_method"),
    "swg-two-weights": (["--g_method", "swg", "--g_weight", "0.2,0.3", "--swg_sizes", "8"], "takes 1 weight"),
    "combo-one-weight": (["--g_method", "wmg-swg", "--g_weight", "1.2", "--net_neg_pkl", "neg.pkl",
                          "--swg_sizes", "8"], "takes 2 weight"),
    "weight-not-number": (["--g_method", "swg", "--g_weight", "x", "--swg_sizes", "8"], "--g_weight"),
    "weight-without-method": (["--g_weight", "0.2"], "--g_method is none"),
    "window-too-large": (["--g_method", "swg", "--g_weight", "0.2", "--swg_sizes", "40"], "exceeds"),
    "window-not-divisible": (["--g_method", "swg", "--g_weight", "0.2", "--swg_sizes", "6", "--swg_steps", "3"],
                             "divisible"),
    "window-uncovered": (["--g_method", "swg", "--g_weight", "0.2", "--swg_sizes", "12", "--swg_steps", "1"],
                         "cover"),
    "window-repeats": (["--g_method", "swg", "--g_weight", "0.2", "--swg_sizes", "12", "--swg_steps", "100"],
                       "--swg_steps <= 5"),  # 16 - 12 + 1 distinct positions (issue 23 item 6)
    "no-window-size": (["--g_method", "swg", "--g_weight", "0.2"], "--swg_sizes"),
    "missing-negative": (["--g_method", "wmg", "--g_weight", "1"], "--net_neg_pkl"),
    "corrupt-negative": (["--g_method", "wmg", "--g_weight", "1", "--net_neg_pkl", "trunc.pkl"], "corrupt"),
    "malicious-positive": (["--net_pos_pkl", "evil.pkl"], "refusing"),
    "missing-positive": (["--net_pos_pkl", "nothere.pkl"], "not found"),
    "bad-interval": (["--g_method", "swg", "--g_weight", "0.2", "--swg_sizes", "8", "--g_interval", "5,2"],
                     "--g_interval"),
    "interval-past-end": (["--g_method", "swg", "--g_weight", "0.2", "--swg_sizes", "8", "--g_interval", "0,9"],
                          "last step"),
    "mask-flag": (["--g_method", "swg", "--g_weight", "0.2", "--swg_sizes", "8", "--scale_window_guide", "2"],
                  "scale_window_guide"),
    "batch-zero": (["--batch", "0"], "--batch"),
    "batch-text": (["--batch", "many"], "batch"),
    "sigma": (["--sigma_min", "0"], "sigma_min"),
    "metrics-no-ref": (["--metrics", "fid"], "--ref_path"),
    "metrics-unknown": (["--metrics", "kidd", "--ref_path", "x.pkl"], "unknown metric"),
    "class-range": (["--class", "10"], "out of range"),
    "unknown-preset": (["--preset", "nope"], "unknown preset"),
    "tar-and-subdirs": (["--save_tar", "--subdirs"], "--subdirs"),
    "settings-changed": (["--steps", "3"], "different settings"),
    "outdir-is-file": (["--outdir", "FILE"], "is a file"),
    "outdir-under-file": (["--outdir", "FILE/sub"], "is a file"),
}


@pytest.fixture(scope="module")
def finished_outdir(nets, tmp_path_factory):
    """An outdir with a finished run (seed 0, steps 2) that bad commands must leave untouched."""
    out = tmp_path_factory.mktemp("finished") / "out"
    code = edm2_run.generate(edm2_run.build_config(net_pos_pkl=str(nets / "pos.pkl"), outdir=str(out), seeds="0",
                                                   steps=2, batch=4), progress=False)
    assert code["pending"] == 1
    return out


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit2_untouched(case, nets, finished_outdir, tmp_path, capsys):
    args, expect = BAD[case]
    blocker = tmp_path / "FILE"
    blocker.write_text("keep")
    before = {p: p.read_bytes() for p in finished_outdir.rglob("*")}
    full = ["--net_pos_pkl", nets / "pos.pkl", "--outdir", finished_outdir, "--seeds", "0-2", "--steps", "2",
            "--batch", "4"]
    args = [str(blocker) + a[4:] if isinstance(a, str) and a.startswith("FILE") else a for a in args]
    code, err = run_cli(full + _with_nets(args, nets), capsys)
    assert code == 2, (case, err)
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0], lines[0]
    assert {p: p.read_bytes() for p in finished_outdir.rglob("*")} == before
    assert blocker.read_text() == "keep"
    assert not (nets / "PWNED").exists()


def test_exit_code_in_subprocess(nets, tmp_path):
    r = subprocess.run([sys.executable, "sample_edm2.py", "--net_pos_pkl", str(nets / "evil.pkl"), "--outdir",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: refusing") and r.stderr.count("\n") == 1
    assert not (nets / "PWNED").exists() and not (tmp_path / "o").exists()


def test_one_vs_two_ranks_identical(nets, tmp_path, capsys):
    common = ["--net_pos_pkl", str(nets / "pos.pkl"), "--seeds", "0-7", "--steps", "2", "--batch", "4",
              "--g_method", "swg", "--g_weight", "0.3", "--swg_sizes", "12"]
    one = tmp_path / "one"
    assert run_cli([*common, "--outdir", one], capsys)[0] == 0
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "sample_edm2.py", *common, "--outdir", str(two)], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_pngs(two)) == 8 and _pngs(one) == _pngs(two)
    # Other settings into the same folder: every rank refuses (none waits at a barrier); the line is printed once.
    before = _pngs(two)
    common[common.index("--g_weight") + 1] = "0.5"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "sample_edm2.py", *common, "--outdir", str(two)], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("holds images made with different settings") == 1, r.stderr[-3000:]  # printed once
    assert _pngs(two) == before


def test_prefetch_joins_torchrun_group_before_downloading(nets, monkeypatch):
    """Under torchrun, --prefetch must know its rank before fetching, else every rank downloads at once."""
    from utils import cache, dist

    calls = []
    monkeypatch.setattr(dist, "init", lambda: calls.append("init"))
    real_fetch = cache.fetch
    monkeypatch.setattr(cache, "fetch", lambda *a, **k: calls.append("fetch") or real_fetch(*a, **k))
    cfg = edm2_run.build_config(net_pos_pkl=str(nets / "pos.pkl"), require_outdir=False)
    edm2_run.prefetch(cfg)
    assert calls and calls[0] == "init" and "fetch" in calls
