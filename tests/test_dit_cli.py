"""sample_dit.py and its API (sampling.dit_run) end to end on CPU with a tiny DiT and a tiny AutoencoderKL."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import tarfile

import numpy as np
import PIL.Image
import pytest
import torch

import sample_dit
from sampling import dit_run
from sampling.run_folder import check_outdir
from sampling.writer import ImageIndex
from guidance.dit import dit_guidance
from guidance.table import method_param_names
from sampling.gaussian_diffusion import create_diffusion
from utils import cache
from utils.errors import UsageError
from tests.tiny_dit import TINY, write_tiny_dit, write_tiny_vae

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny DiT-S/2 checkpoint (official plain layout) for 64px images and a tiny VAE folder."""
    root = tmp_path_factory.mktemp("dit_assets")
    net = write_tiny_dit(root / "tiny-dit.pt")
    vae = write_tiny_vae(root / "vae")
    return {"root": root, "ckpt": root / "tiny-dit.pt", "vae": root / "vae", "net": net, "vae_model": vae}


def _base(assets, out, *extra, vae_path=True):
    argv = ["--model", "DiT-S/2", "--model-kwargs", json.dumps(TINY), "--ckpt", str(assets["ckpt"]),
            "--image-size", "64", "--num-classes", "10", "--sample-dir", str(out), "--num-sampling-steps", "3",
            "--metrics", "none", "--per-proc-batch-size", "2", "--device", "cpu"]
    if vae_path:
        argv += ["--vae-path", str(assets["vae"])]
    return argv + list(extra)


def _run(argv, capsys=None):
    rc = sample_dit.main(argv)
    err = capsys.readouterr().err if capsys else ""
    return rc, err


def _images(folder: pathlib.Path) -> dict[int, np.ndarray]:
    return {int(p.stem): np.asarray(PIL.Image.open(p)) for p in sorted(folder.glob("*.png"))}


def _run_dir(out: pathlib.Path) -> pathlib.Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run / "samples"


@torch.no_grad()
def _expected(assets, mode, seeds, **kw):
    """The same images computed directly from the library (independent of the CLI plumbing)."""
    diffusion = create_diffusion("3")
    den = dit_guidance(assets["net"], mode, **kw)
    out = []
    for s in seeds:  # one image at a time: generator seeded with the image index (global seed 0)
        g = torch.Generator().manual_seed(s)
        z = torch.randn([1, 4, 8, 8], generator=g)
        y = torch.full((1,), 10) if mode == "uncond" else torch.randint(10, [1], generator=g)
        x = diffusion.p_sample_loop(den, z, y, randn_like=lambda x: torch.randn(x.shape[1:], generator=g)[None])
        img = assets["vae_model"].decode(x / 0.18215).sample
        out.append(torch.clamp(127.5 * img + 128.0, 0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy())
    return out


SWITCHES = [
    # (flags, method, folder suffix, guidance kwargs of the expectation)
    ([], "none", "g-0.0-seed-0", {}),
    (["--crop", "1", "--mask", "1", "--g-scale", "0.5", "--window-size", "6"], "swg",
     "g-0.5-seed-0_swg_mask_1", dict(g_scale=0.5, mask=True, window_size=6)),
    (["--vanila_cfg", "1", "--g_scale", "1.5"], "cfg", "g-1.5-seed-0_vanila_cfg", dict(g_scale=1.5)),
    (["--cfg-crop", "1", "--g-scale", "0.6", "--crop-scale", "0.5", "--mask", "1", "--window-size", "6"],
     "cfg-swg", "g-0.6-seed-0_cfg_swg_0.5_mask_1", dict(g_scale=0.6, crop_scale=0.5, mask=True, window_size=6)),
    (["--uncond", "1"], "uncond", "g-0.0-seed-0_uncond", {}),
]


@pytest.mark.parametrize("flags,method,suffix,kw", SWITCHES, ids=[s[1] for s in SWITCHES])
def test_each_guidance_switch_end_to_end(assets, tmp_path, capsys, flags, method, suffix, kw):
    out = tmp_path / "out"
    rc, err = _run(_base(assets, out, "--seeds", "0-2", *flags), capsys)
    assert rc == 0, err
    run = out / f"DiT-S-2-tiny-dit-size-64-vae-ema-{suffix}" / "samples"
    args = json.loads((run / "settings.json").read_text())
    assert args["method"] == method and args["num_images"] == 3
    images = _images(run)
    assert sorted(images) == [0, 1, 2]
    expected = _expected(assets, method, [0, 1, 2], **kw)
    for s in range(3):
        assert images[s].shape == (64, 64, 3) and images[s].dtype == np.uint8
        assert np.abs(images[s].astype(int) - expected[s].astype(int)).max() <= 1


def test_switches_change_the_images(assets, tmp_path):
    """Guidance really acts: each method's images differ from unguided sampling of the same seeds."""
    runs = {}
    for name, flags in [("none", []), ("swg", ["--crop", "1", "--g-scale", "2", "--window-size", "6"]),
                        ("cfg", ["--vanila-cfg", "1", "--g-scale", "3"])]:
        out = tmp_path / name
        assert sample_dit.main(_base(assets, out, "--seeds", "0", *flags)) == 0
        runs[name] = _images(_run_dir(out))[0].astype(int)
    assert np.abs(runs["swg"] - runs["none"]).max() > 2
    assert np.abs(runs["cfg"] - runs["none"]).max() > 2


def test_one_vs_two_ranks_identical(assets, tmp_path):
    """torchrun with 2 CPU processes (Gloo) and another batch size gives the images of one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--seeds", "0-4", "--crop", "1", "--mask", "1", "--g-scale", "0.5", "--window-size", "6"]
    assert sample_dit.main(_base(assets, one, *flags, "--per-proc-batch-size", "5")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "sample_dit.py"), *_base(assets, two, *flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _images(_run_dir(one)), _images(_run_dir(two))
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]
    for s in a:
        assert np.abs(a[s].astype(int) - b[s].astype(int)).max() <= 1
    assert np.mean([np.array_equal(a[s], b[s]) for s in a]) >= 0.6


def test_resume_and_tar_and_npz(assets, tmp_path):
    out = tmp_path / "out"
    assert sample_dit.main(_base(assets, out, "--seeds", "0-3")) == 0
    run = _run_dir(out)
    first = _images(run)
    kept = run / "0000000.png"
    stat = kept.stat()
    (run / "0000002.png").unlink()
    (run / ".0000003.png.tmp999").write_bytes(b"partial")  # a killed run's temp file
    assert sample_dit.main(_base(assets, out, "--seeds", "0-3", "--save-npz")) == 0
    assert kept.stat().st_mtime_ns == stat.st_mtime_ns and kept.stat().st_ino == stat.st_ino  # untouched
    again = _images(run)
    assert sorted(again) == [0, 1, 2, 3] and np.array_equal(again[2], first[2])
    assert not list(run.glob(".*tmp*"))
    npz = np.load(run.parent / "samples.npz")
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (4, 64, 64, 3)
    assert all(np.array_equal(npz["arr_0"][i], first[i]) for i in range(4))
    # Resuming with other sampling settings into the same folder is refused.
    rc = sample_dit.main(_base(assets, out, "--seeds", "0-3", "--num-sampling-steps", "4"))
    assert rc == 2

    # Tar shards hold the same images.
    tar_out = tmp_path / "tar"
    assert sample_dit.main(_base(assets, tar_out, "--seeds", "0-3", "--save_tar", "--save_npz")) == 0
    run_t = _run_dir(tar_out)
    (shard,) = list(run_t.glob("*.tar"))
    with tarfile.open(shard) as tar:
        names = sorted(tar.getnames())
        assert names == [f"{i:07d}.png" for i in range(4)]
        img = np.asarray(PIL.Image.open(tar.extractfile("0000001.png")))
    assert np.array_equal(img, first[1])
    assert np.load(run_t.parent / "samples.npz")["arr_0"].shape == (4, 64, 64, 3)


def test_vae_through_the_cache(assets, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _base(assets, out, "--seeds", "0", "--vae", "mse", vae_path=False)
    rc, err = _run(argv, capsys)  # not cached, offline: one-line message with the cache path
    target = cache.cache_dir() / "hf" / "stabilityai" / "sd-vae-ft-mse"
    assert rc == 2 and err.startswith("error: ") and str(target) in err and err.count("\n") == 1
    assert not out.exists()  # nothing created before the weights are there
    assets["vae_model"].save_pretrained(target, safe_serialization=True)
    rc, err = _run(argv, capsys)
    assert rc == 0, err
    assert (out / "DiT-S-2-tiny-dit-size-64-vae-mse-g-0.0-seed-0" / "samples" / "0000000.png").is_file()


def _resolve(argv):
    return sample_dit.settings(argv)


def test_seed_readme_commands_resolve():
    cfg = _resolve(["--model", "DiT-XL/2", "--num-fid-samples", "50000", "--g-scale", "0.5",
                    "--per-proc-batch-size", "32", "--crop", "1", "--mask", "1", "--sample-dir", "s"])
    g = cfg.guidance
    assert (g.method, g.weights, g.masked, g.window_size, g.window_steps) == ("swg", (0.5,), True, (20,), (2,))
    assert cfg.ckpt_source == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    assert dit_run.folder_name(cfg) == "DiT-XL-2-pretrained-size-256-vae-ema-g-0.5-seed-0_swg_mask_1"
    assert len(cfg.seeds) == 50000 and cfg.timesteps == 250
    cfg = _resolve(["--save_tar", "--model", "DiT-XL/2", "--num-fid-samples", "50000", "--g_scale", "0.6",
                    "--per-proc-batch-size", "32", "--cfg_crop", "1", "--crop_scale", "0.5", "--mask", "1",
                    "--image-size", "512", "--metrics", "fid", "fd_dinov2", "--ref_path", "r.pkl"])
    g = cfg.guidance
    assert (g.method, g.weights, g.window_size, g.guided_channels) == ("cfg-swg", (0.6, 0.5), (40,), 4) and cfg.save_tar
    assert cfg.metrics == ("fid", "fd_dinov2") and cfg.ref_path == "r.pkl"
    assert dit_run.folder_name(cfg) == "DiT-XL-2-pretrained-size-512-vae-ema-g-0.6-seed-0_cfg_swg_0.5_mask_1"
    # Both spellings of every two-word flag.
    dash = _resolve(["--g-scale", "0.6", "--crop-scale", "0.5", "--cfg-crop", "1", "--sample-dir", "a",
                     "--per-proc-batch-size", "3", "--num-fid-samples", "7", "--global-seed", "2",
                     "--num-sampling-steps", "ddim50", "--save-tar", "--save-npz", "--metrics", "fid,fd_dinov2",
                     "--ref-path", "r.pkl"])
    under = _resolve(["--g_scale", "0.6", "--crop_scale", "0.5", "--cfg_crop", "1", "--sample_dir", "a",
                      "--per_proc_batch_size", "3", "--num_fid_samples", "7", "--global_seed", "2",
                      "--num_sampling_steps", "ddim50", "--save_tar", "--save_npz", "--metrics", "fid fd_dinov2",
                      "--ref_path", "r.pkl"])
    assert dash == under and dash.timesteps == 50


BAD = [
    (["--model", "DiT-M/2"], "unknown model 'DiT-M/2'"),
    (["--model", "DiT-S/2"], "pass --ckpt"),
    (["--image-size", "384"], "pretrained weights exist only"),
    (["--g-scale", "-1", "--crop", "1"], "must be >= 0"),
    (["--crop", "1", "--vanila-cfg", "1", "--g-scale", "1.5"], "exclude each other"),
    (["--crop-scale", "0.5", "--crop", "1", "--g-scale", "0.5"], "--crop-scale is the SWG weight"),
    (["--vanila-cfg", "1", "--g-scale", "0.5"], "--g-scale >= 1"),
    (["--mask", "1"], "needs --crop 1 or --cfg-crop 1"),
    (["--g-scale", "0.5"], "needs a guidance switch"),
    (["--uncond", "1", "--g-scale", "0.5"], "drop --g-scale"),
    (["--seeds", "0-3", "--num-fid-samples", "4"], "give one of them"),
    (["--num-fid-samples", "0"], "0 is not in the range 1<=x<=10000000"),
    (["--global-seed", str(2 ** 31)], "2147483648 is not in the range 0<=x<=2147483647"),
    (["--num-sampling-steps", "2000"], "at most 1000"),
    (["--metrics", "fid,kidd"], "unknown metric 'kidd'"),
    (["--metrics", "saturation", "--seeds", "0"], "at least 2 images"),
    (["--metrics", "fid", "--ref-path", "/nonexistent/img256.pkl", "--num-fid-samples", "1"], "at least 2"),
    (["--vae", "kl"], "'kl' is not one of"),
    (["--no-such-flag"], "No such option"),
]


@pytest.mark.parametrize("argv,msg", BAD, ids=[b[1] for b in BAD])
def test_bad_inputs_one_line_exit_2(argv, msg, capsys, tmp_path):
    rc, err = _run(["--sample-dir", str(tmp_path / "o"), "--metrics", "none", *argv], capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    assert not (tmp_path / "o").exists()


TINY_BAD = [
    (["--crop", "1", "--g-scale", "0.5", "--window-size", "10"], "exceeds the input size 8"),
    (["--crop", "1", "--g-scale", "0.5", "--window-size", "5"], "multiple of the patch size 2"),
    (["--crop", "1", "--g-scale", "0.5", "--window-size", "2", "--window-steps", "2"], "leave gaps"),
    (["--image-size", "60"], "multiple of 16"),
    (["--model", "DiT-S/4"], "does not fit DiT-S/4"),
    (["--num-classes", "20"], "does not fit"),
    (["--model-kwargs", "{bad"], "not valid JSON"),
    (["--model-kwargs", '{"input_size": 4}'], "--model-kwargs accepts"),
]


@pytest.mark.parametrize("argv,msg", TINY_BAD, ids=[b[1] for b in TINY_BAD])
def test_bad_inputs_with_a_checkpoint(assets, argv, msg, capsys, tmp_path):
    rc, err = _run(_base(assets, tmp_path / "o", "--seeds", "0", *argv), capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    assert not (tmp_path / "o").exists()


def test_metrics_hook(assets, tmp_path, capsys):
    """Metrics run on exactly the run's images and land in metrics.json beside them."""
    out = tmp_path / "out"
    argv = _base(assets, out, "--seeds", "0-2,5", "--save-tar")
    argv[argv.index("--metrics") + 1] = "saturation"
    rc, err = _run(argv, capsys)
    assert rc == 0, err
    run = _run_dir(out)
    doc = json.loads((run / "metrics.json").read_text())
    images = ImageIndex(run).read([0, 1, 2, 5])
    hsv = np.stack([np.asarray(PIL.Image.fromarray(im).convert("HSV")) for im in images])
    assert doc["results"]["num_images"] == 4
    assert doc["results"]["saturation"] == pytest.approx(hsv[..., 1].mean() / 255, abs=2e-3)
    assert doc["args"]["method"] == "none"
    # The default metrics (fid, fd_dinov2) without reference statistics: sampling works, the metrics are
    # skipped with a note before the first image and after the last; metrics given explicitly are refused.
    out2 = tmp_path / "out2"
    default = _base(assets, out2, "--seeds", "0-1")
    del default[default.index("--metrics"):default.index("--metrics") + 2]
    rc, err = _run(default, capsys)
    assert rc == 0 and not list(_run_dir(out2).glob("metrics*"))
    assert "note: no reference statistics, so fid, fd_dinov2 will be skipped; pass --ref-path" in err
    assert "metrics skipped: no reference statistics (pass --ref-path)" in err
    rc, err = _run(_base(assets, tmp_path / "o4", "--seeds", "0-1", "--metrics", "fid", "fd_dinov2"), capsys)
    assert rc == 2 and "need reference statistics; pass --ref-path" in err and not (tmp_path / "o4").exists()
    # A missing reference is refused before sampling.
    rc, err = _run(_base(assets, tmp_path / "o3", "--seeds", "0-1", "--metrics", "fid", "--ref-path",
                         str(tmp_path / "img64.pkl")), capsys)
    assert rc == 2 and "img64.pkl" in err and not (tmp_path / "o3").exists()


def test_offline_checkpoint_advises_prefetch(assets, tmp_path, capsys, monkeypatch):
    """A checkpoint that cannot be downloaded: one line naming the cache path and this command's --prefetch."""
    monkeypatch.setenv("SWG_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    argv = _base(assets, tmp_path / "o", "--seeds", "0")
    argv[argv.index("--ckpt") + 1] = f"http://127.0.0.1:{port}/dit/tiny.pt"
    rc, err = _run(argv, capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert str(tmp_path / "cache" / "127.0.0.1" / "dit" / "tiny.pt") in err
    assert err.rstrip().endswith("(or run with --prefetch where there is internet)"), err


def test_missing_checkpoint_and_prefetch(assets, tmp_path, capsys):
    argv = _base(assets, tmp_path / "o", "--seeds", "0")
    argv[argv.index("--ckpt") + 1] = str(tmp_path / "missing.pt")
    rc, err = _run(argv, capsys)
    assert rc == 2 and "missing.pt" in err
    # --prefetch fetches the files into place and samples nothing.
    rc, err = _run(_base(assets, tmp_path / "p", "--seeds", "0", "--prefetch"), capsys)
    assert rc == 0, err
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------
# The Python API (sampling.dit_run) behind the command line.

def test_api_defaults_are_the_command_line_defaults():
    """build_config() with no options resolves exactly as the command line with no flags."""
    ctx = sample_dit.cli.make_context("sample_dit.py", [])
    defaults = dataclasses.asdict(dit_run.DiTOptions())
    assert set(ctx.params) == set(defaults) | set(method_param_names()) | {"prefetch"}
    assert {k: ctx.params[k] for k in defaults} == defaults
    cfg = dit_run.build_config()
    assert cfg == sample_dit.settings([])
    assert cfg.outdir == os.path.join("samples", "DiT-XL-2-pretrained-size-256-vae-ema-g-0.0-seed-0", "samples")


def test_api_python_values_match_the_flags():
    """Python values (dict, list, int for float) give the configuration and folder of the equivalent flags."""
    flags = _resolve(["--model", "DiT-S/2", "--model-kwargs", json.dumps(TINY), "--ckpt", "c.pt",
                      "--image-size", "64", "--num-classes", "10", "--seeds", "0-2,5", "--crop", "1",
                      "--mask", "1", "--g-scale", "1", "--num-sampling-steps", "3", "--metrics", "none",
                      "--sample-dir", "out"])
    cfg = dit_run.build_config(model="DiT-S/2", model_kwargs=dict(TINY), ckpt="c.pt", image_size=64,
                               num_classes=10, seeds=[0, 1, 2, 5], crop=True, mask=1, g_scale=1,
                               num_sampling_steps=3, metrics=[], sample_dir="out")
    assert cfg.outdir == os.path.join("out", "DiT-S-2-c-size-64-vae-ema-g-1.0-seed-0_swg_mask_1", "samples")
    assert cfg.outdir == dit_run.run_dir(flags)
    saved, saved_flags = dit_run.DiTBackend(cfg).record(), dit_run.DiTBackend(flags).record()
    for key in dit_run.IDENTITY_KEYS + ("seeds", "latent_size", "timesteps", "metrics"):
        assert saved.get(key) == saved_flags.get(key), key  # perturb_blocks, seg_sigma: pag/seg/slg only
    assert cfg.guidance == flags.guidance
    with pytest.raises(TypeError, match="g_weight"):
        dit_run.build_config(g_weight=0.5)
    with pytest.raises(UsageError, match="needs `crop` 1 or `cfg_crop` 1"):  # the API names parameters
        dit_run.build_config(mask=1)


def test_api_generate_matches_the_library(assets, tmp_path):
    """generate() of a build_config() writes the images computed directly from the library, and resumes."""
    cfg = dit_run.build_config(model="DiT-S/2", model_kwargs=TINY, ckpt=str(assets["ckpt"]), image_size=64,
                               num_classes=10, seeds="1,3", num_sampling_steps="3", metrics="none",
                               vae_path=str(assets["vae"]), sample_dir=str(tmp_path), device="cpu",
                               crop=1, g_scale=0.5, window_size=6, per_proc_batch_size=1, save_npz=True)
    summary = dit_run.generate(cfg, progress=False)
    assert torch.is_grad_enabled()  # the caller's autograd state is left alone
    run = pathlib.Path(cfg.outdir)
    assert {k: summary[k] for k in ("outdir", "requested", "pending", "written", "npz", "metrics")} == \
        {"outdir": str(run), "requested": 2, "pending": 2, "written": 2, "npz": str(run.with_suffix(".npz")),
         "metrics": None}
    images = _images(run)
    expected = _expected(assets, "swg", [1, 3], g_scale=0.5, window_size=6)
    assert sorted(images) == [1, 3]
    for got, want in zip((images[1], images[3]), expected):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert dit_run.generate(cfg, progress=False)["written"] == 0  # everything exists already


def test_common_run_folder_helpers(tmp_path):
    """check_outdir / changed_setting / write_json_atomic: the resume and output-folder rules."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder; choose another --outdir"):
        check_outdir(blocker, "--outdir")
    with pytest.raises(UsageError, match=r"because .*file is a file; choose another --sample-dir"):
        check_outdir(blocker / "a" / "b", "--sample-dir")
    assert check_outdir(tmp_path / "new" / "run", "--outdir") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_a_switch_with_zero_weights_is_said(capsys):
    """The reference runs --crop 1 without --g-scale as plain sampling: allowed, but said (with the fix)."""
    from guidance.dit import idle_scales

    assert idle_scales({"crop": 1}, {"g_scale": 0.5}) is None and idle_scales({}, {"g_scale": 0}) is None
    assert idle_scales({"vanila_cfg": 1}, {"g_scale": 1.0}) is None  # a CFG scale of 1 is refused elsewhere
    cfg = _resolve(["--cfg-crop", "1", "--g-scale", "0.6"])
    assert cfg.guidance.method == "cfg-swg" and cfg.guidance.weights == (0.6, 0.0)
    assert "warning: --cfg-crop 1 with --crop-scale 0 has no SWG term, as in the reference; give --crop-scale > 0 " \
        "(e.g. 0.5)" in capsys.readouterr().err
    cfg = _resolve(["--crop", "1"])
    assert cfg.guidance.method == "none"
    assert "--crop 1 with --g-scale 0 samples without guidance" in capsys.readouterr().err
    dit_run.build_config(crop=1, metrics="none", seeds="0")  # the Python API: its own names
    assert "warning: `crop` 1 with `g_scale` 0 samples without guidance" in capsys.readouterr().err


def test_an_unknown_method_is_offered_only_what_dit_runs(capsys):
    from guidance.dit import table_methods

    assert "wmg" not in table_methods() and "swg" not in table_methods() and "apg-swg" in table_methods()
    rc, err = _run(["--method", "apgg", "--weights", "1", "--metrics", "none"], capsys)
    offered = err.split("choose one of ")[1].strip().split(", ")
    assert rc == 2 and "did you mean apg?" in err and offered == table_methods(), err
