"""PAG, SEG and SLG through sample_edm2.py and sample_dit.py on tiny random-weight checkpoints: alone and with
M-SWG, the images against the library computed directly, counted evaluations, block errors, and 2 ranks."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import sample_dit
import sample_edm2
from benchmarks import edm2_snapshot as WR
from tests.tiny_dit import write_tiny_dit, write_tiny_vae
from guidance import guide
from guidance.dit import dit_guidance
from guidance.perturb import perturber
from networks.edm2_pickle import load_checkpoint
from sampling.edm import edm_sampler
from sampling.gaussian_diffusion import create_diffusion
from sampling.seeds import StackedRandomGenerator

ROOT = pathlib.Path(__file__).resolve().parents[1]
EDM2 = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=8,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
DIT = {"hidden_size": 32, "depth": 2, "num_heads": 2}
KINDS = ("pag", "seg", "slg")
WEIGHT = {"pag": "2", "seg": "2", "slg": "1.5"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("perturb_assets")
    torch.manual_seed(0)
    net = WR.make_precond(**EDM2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("_gain"):
                p.fill_(1.0)   # EDM2's zero-initialised gains make D = c_skip x: nothing to perturb
    WR.write_edm2_pickle(root / "edm2.pkl", net, half=False)
    dit = write_tiny_dit(root / "dit.pt", **DIT)
    vae = write_tiny_vae(root / "vae")
    return {"root": root, "dit": dit, "vae": vae}


def _pngs(folder: pathlib.Path) -> dict:
    return {p.name: np.asarray(PIL.Image.open(p)) for p in sorted(folder.rglob("*.png"))}


# --------------------------------------------------------------------------------------------------
# EDM2.

def _edm2(assets, out, *extra):
    return ["--net_pos_pkl", str(assets["root"] / "edm2.pkl"), "--outdir", str(out), "--seeds", "0-1",
            "--steps", "2", "--batch", "2", *map(str, extra)]


def _edm2_method(kind, swg):
    if swg:
        return ["--g_method", f"{kind}-swg", "--g_weight", f"{WEIGHT[kind]},0.3", "--swg_sizes", "12"]
    return ["--g_method", kind, "--g_weight", WEIGHT[kind]]


@pytest.mark.parametrize("swg", [False, True], ids=["alone", "mswg"])
@pytest.mark.parametrize("kind", KINDS)
def test_edm2_each_perturbation_alone_and_with_mswg(assets, tmp_path, capsys, kind, swg):
    out = tmp_path / "out"
    assert sample_edm2.main(_edm2(assets, out, *_edm2_method(kind, swg))) == 0, capsys.readouterr().err
    images = _pngs(out)
    assert sorted(images) == ["0000000.png", "0000001.png"] and images["0000000.png"].std() > 0
    plain = tmp_path / "plain"
    assert sample_edm2.main(_edm2(assets, plain)) == 0
    assert max(np.abs(images[k].astype(int) - v.astype(int)).max() for k, v in _pngs(plain).items()) > 2
    evals = json.loads((out / "evals.json").read_text())
    assert evals["evals_per_call"] == 2 + (4 if swg else 0)          # D_pos, D_pert (+ 2x2 windows)
    saved = json.loads((out / "settings.json").read_text())
    assert saved["g_method"] == (f"{kind}-swg" if swg else kind)


def test_edm2_image_equals_the_library(assets, tmp_path, capsys):
    """Chosen blocks and a finite SEG width: the PNGs equal edm_sampler(guide(net, seg, perturb)) computed here."""
    out = tmp_path / "out"
    code = sample_edm2.main(_edm2(assets, out, "--g_method", "seg", "--g_weight", "2", "--perturb_blocks", "4,5",
                                  "--seg_sigma", "0.8", "--class", "3"))
    assert code == 0, capsys.readouterr().err
    net = load_checkpoint(assets["root"] / "edm2.pkl").net
    den = lambda x, s, c, edit=None: net(x, s, c, edit=edit)  # noqa: E731
    rnd = StackedRandomGenerator("cpu", [0, 1])
    noise = rnd.randn([2, 3, 16, 16])
    rnd.randint(10, size=[2])
    D = guide(den, "seg", 2.0, perturb=perturber(den, net, ["seg"], blocks=[4, 5], seg_sigma=0.8))
    with torch.no_grad():
        x = edm_sampler(D, noise, torch.eye(10)[[3, 3]], num_steps=2, randn_like=rnd.randn_like)
    expect = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    got = _pngs(out)
    np.testing.assert_array_equal(got["0000000.png"], expect[0])
    np.testing.assert_array_equal(got["0000001.png"], expect[1])
    saved = json.loads((out / "settings.json").read_text())
    assert saved["perturb_blocks"] == [4, 5] and saved["seg_sigma"] == 0.8


@pytest.mark.parametrize("args,expect", [
    (["--g_method", "pag", "--g_weight", "2", "--perturb_blocks", "0"], "--perturb_blocks"),
    (["--g_method", "slg", "--g_weight", "2", "--perturb_blocks", "7"], "valid blocks are 0,4-6"),
    (["--g_method", "seg", "--g_weight", "2", "--seg_sigma", "-1"], "--seg_sigma"),
    (["--g_method", "swg", "--g_weight", "0.2", "--swg_sizes", "12", "--perturb_blocks", "4"], "pag"),
])
def test_edm2_bad_perturbation_one_line_before_any_image(assets, tmp_path, capsys, args, expect):
    out = tmp_path / "out"
    capsys.readouterr()
    assert sample_edm2.main(_edm2(assets, out, *args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert not _pngs(out) if out.exists() else True


def test_edm2_two_ranks_equal_one(assets, tmp_path, capsys):
    common = ["--g_method", "seg-swg", "--g_weight", "2,0.3", "--swg_sizes", "12", "--seeds", "0-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): the same float summation order
    try:
        assert sample_edm2.main(_edm2(assets, one, *common)) == 0
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "sample_edm2.py", *_edm2(assets, two, *common)], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _pngs(one), _pngs(two)
    assert len(a) == 4 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# DiT.

def _dit(assets, out, *extra):
    return ["--model", "DiT-S/2", "--model-kwargs", json.dumps(DIT), "--ckpt", str(assets["root"] / "dit.pt"),
            "--image-size", "64", "--num-classes", "10", "--sample-dir", str(out), "--num-sampling-steps", "2",
            "--metrics", "none", "--per-proc-batch-size", "2", "--device", "cpu", "--vae-path",
            str(assets["root"] / "vae"), *map(str, extra)]


def _run_dir(out: pathlib.Path) -> pathlib.Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run / "samples"


@pytest.mark.parametrize("swg", [False, True], ids=["alone", "mswg"])
@pytest.mark.parametrize("kind", KINDS)
def test_dit_each_perturbation_alone_and_with_mswg(assets, tmp_path, capsys, kind, swg):
    flags = (["--method", f"{kind}-swg", "--weights", f"{WEIGHT[kind]},0.3", "--mask", "1", "--window-size", "6"]
             if swg else ["--method", kind, "--weights", WEIGHT[kind]])
    out = tmp_path / "out"
    assert sample_dit.main(_dit(assets, out, "--seeds", "0", *flags)) == 0, capsys.readouterr().err
    run = _run_dir(out)
    evals = json.loads((run / "evals.json").read_text())
    assert evals["evals_per_call"] == 2 + (4 if swg else 0)
    # The image equals DiT's diffusion over dit_guidance(..., perturb) computed here, with the default blocks.
    diffusion = create_diffusion("2")
    den = dit_guidance(assets["dit"], f"{kind}-swg" if swg else kind, mask=swg, window_size=6,
                       weights=(float(WEIGHT[kind]), 0.3) if swg else (float(WEIGHT[kind]),),
                       sigma_of=diffusion.sigma_of, perturb=_dit_perturber(assets["dit"], kind))
    g = torch.Generator().manual_seed(0)
    z = torch.randn([1, 4, 8, 8], generator=g)
    y = torch.randint(10, [1], generator=g)
    with torch.no_grad():
        x = diffusion.p_sample_loop(den, z, y, randn_like=lambda x: torch.randn(x.shape[1:], generator=g)[None])
        img = assets["vae"].decode(x / 0.18215).sample
    expect = torch.clamp(127.5 * img + 128.0, 0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    got = np.asarray(PIL.Image.open(run / "0000000.png"))
    assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1


def _dit_perturber(net, kind, **kw):
    from guidance.dit import DiTDenoiser

    return perturber(DiTDenoiser(net), net, [kind], **kw)


def test_dit_bad_block_names_the_flag_and_the_valid_blocks(assets, tmp_path, capsys):
    capsys.readouterr()
    assert sample_dit.main(_dit(assets, tmp_path, "--seeds", "0", "--method", "pag", "--weights", "2",
                                "--perturb-blocks", "2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--perturb-blocks" in err and "valid blocks are 0-1" in err, err


def test_dit_two_ranks_equal_one(assets, tmp_path):
    flags = ["--seeds", "0-3", "--method", "slg", "--weights", "1.5", "--perturb-blocks", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert sample_dit.main(_dit(assets, one, *flags, "--per-proc-batch-size", "4")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "sample_dit.py"), *_dit(assets, two, *flags)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _pngs(_run_dir(one)), _pngs(_run_dir(two))
    assert len(a) == 4 and a.keys() == b.keys()
    assert all(np.abs(a[k].astype(int) - b[k].astype(int)).max() <= 1 for k in a)
