"""The zoo methods (APG, CFG-Zero*, FDG, TCFG, alone and with M-SWG) through the EDM2 Python API on tiny
random-weight checkpoints: images, method parameters, presets, counted evaluations."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import PIL.Image
import pytest
import torch

from benchmarks import edm2_snapshot as WR
from guidance import guide
from guidance.table import METHODS
from networks.edm2_pickle import load_checkpoint
from sampling import edm2_run
from sampling.edm import edm_sampler
from sampling.presets import PRESETS
from sampling.seeds import StackedRandomGenerator
from utils.errors import UsageError

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=8,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
ZOO = [n for n in METHODS if (METHODS[n].base or n) in ("apg", "cfg-zero", "fdg", "tcfg")]


def _net(seed, **kw):
    """A tiny EDM2 whose gains are not EDM2's zero init (else D = c_skip x for every network: nothing to guide)."""
    torch.manual_seed(seed)
    net = WR.make_precond(**dict(TINY, **kw))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("_gain"):
                p.fill_(1.0)
    return net


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("nets")
    WR.write_edm2_pickle(d / "pos.pkl", _net(0), half=False)
    WR.write_edm2_pickle(d / "uncond.pkl", _net(2, label_dim=0), half=False)
    return d


def _config(nets, out, method, **kw):
    spec = METHODS[method]
    return edm2_run.build_config(net_pos_pkl=str(nets / "pos.pkl"), net_neg_pkl=str(nets / "uncond.pkl"),
                                 outdir=str(out), seeds="0-1", g_method=method, g_weight=spec.example,
                                 swg_sizes=12 if spec.windows else None, steps=3, batch=2, **kw)


@pytest.mark.parametrize("method", ZOO)
def test_every_zoo_method_samples_and_counts_its_evaluations(method, nets, tmp_path):
    out = tmp_path / "out"
    summary = edm2_run.generate(_config(nets, out, method), progress=False)
    assert sorted(p.name for p in out.glob("*.png")) == ["0000000.png", "0000001.png"]
    img = np.asarray(PIL.Image.open(out / "0000000.png"))
    assert img.shape == (16, 16, 3) and img.std() > 0
    evals = json.loads((out / "evals.json").read_text())
    assert evals == summary["evals"]
    # Per guided call: the positive, the unconditional network, 4 windows for the -swg pairings;
    # CFG-Zero*'s first step evaluates only the positive (its output is D = x).
    per_call = 2 + (4 if METHODS[method].windows else 0)
    calls = 2 * 3 - 1
    if METHODS[method].base == "cfg-zero" or method == "cfg-zero":
        expect = (2 * 1 + (calls - 2) * per_call) / calls
    else:
        expect = per_call
    assert evals["evals_per_call"] == pytest.approx(expect, abs=1e-3)
    assert evals["evals_per_step"] == pytest.approx(expect * calls / 3, abs=1e-3)
    saved = json.loads((out / "settings.json").read_text())
    assert saved["g_method"] == method and saved["g_params"] == METHODS[method].param_values()


def test_api_latents_equal_sampler_of_the_guided_network(nets, tmp_path):
    """The backend's latents equal edm_sampler(guide(net, apg-swg, eta, momentum ...)) with EDM2's per-seed draws."""
    cfg = _config(nets, tmp_path / "out", "apg-swg", eta=0.5, momentum=-0.5, norm_threshold=30.0, class_idx=3)
    pos, neg = load_checkpoint(nets / "pos.pkl"), load_checkpoint(nets / "uncond.pkl")
    backend = edm2_run.EDM2Backend(cfg).use(pos, neg, "cpu")
    with torch.no_grad():
        got = backend.sample(backend.draw([0, 1], "cpu"))
    expect = {}
    for eta in (0.5, 1.0):
        r = StackedRandomGenerator("cpu", [0, 1])
        noise = r.randn([2, 3, 16, 16])
        r.randint(10, size=[2])   # the label draw happens even with a fixed class
        D = guide(lambda x, s, c: pos.net(x, s, c), "apg-swg", (1.0, 0.2),
                  neg_denoiser=lambda x, s, c: neg.net(x, s, c), window_size=12, eta=eta, momentum=-0.5,
                  norm_threshold=30.0)
        with torch.no_grad():
            expect[eta] = edm_sampler(D, noise, torch.eye(10)[[3, 3]], num_steps=3, randn_like=r.randn_like)
    torch.testing.assert_close(got, expect[0.5], rtol=0, atol=0)
    assert (expect[0.5] - expect[1.0]).abs().max() > 1e-3   # eta moves the result: the check tells them apart


def test_parameters_and_intervals_are_checked_once_naming_the_parameter(nets, tmp_path):
    with pytest.raises(UsageError, match="`eta` is a parameter of apg; `g_method` cfg does not use it"):
        _config(nets, tmp_path / "o", "cfg", eta=0.5)
    with pytest.raises(UsageError, match="`zero_steps` of method cfg-zero must be an integer"):
        _config(nets, tmp_path / "o", "cfg-zero", zero_steps=-1)
    with pytest.raises(UsageError, match="`zero_steps` 3 would zero every one of the 3 sampler steps"):
        _config(nets, tmp_path / "o", "cfg-zero", zero_steps=3)   # steps=3: every step held at zero
    _config(nets, tmp_path / "o", "cfg-zero", zero_steps=2)       # one guided step left: accepted
    with pytest.raises(UsageError, match=r"`g_method` apg takes 1 weight\(s\), got none; e.g. `g_weight` "):
        edm2_run.build_config(net_pos_pkl=str(nets / "pos.pkl"), net_neg_pkl=str(nets / "uncond.pkl"),
                              outdir=str(tmp_path / "o"), g_method="apg", steps=3)
    with pytest.raises(UsageError, match="`g_sigma_interval` must satisfy 0 <= lo < hi"):
        _config(nets, tmp_path / "o", "apg", g_sigma_interval="3,1")
    with pytest.raises(UsageError, match="`swg_sigma_interval` limits the window term"):
        _config(nets, tmp_path / "o", "apg", swg_sigma_interval="0.1,1")
    cfg = _config(nets, tmp_path / "o", "tcfg-swg", g_sigma_interval="0.28,2.9", swg_sigma_interval="1,inf")
    assert cfg.guidance.sigma_interval == (0.28, 2.9) and cfg.guidance.window_sigma_interval == (1.0, float("inf"))
    assert not (tmp_path / "o").exists()


def test_zoo_presets_carry_their_parameters():
    zoo = {n: p for n, p in PRESETS.items() if (METHODS[p.g_method].base or p.g_method) in ("apg", "cfg-zero",
                                                                                             "fdg", "tcfg")}
    assert {p.g_method for p in zoo.values()} == set(ZOO)
    for name, p in zoo.items():
        cfg = edm2_run.build_config(preset=name, outdir=None, require_outdir=False)
        assert cfg.guidance.method == p.g_method and cfg.guidance.params == METHODS[p.g_method].param_values(**(p.g_params or {}))
    cfg = edm2_run.build_config(preset="demo-digits-apg", eta=0.25, outdir=None, require_outdir=False)
    assert cfg.guidance.params["eta"] == 0.25 and cfg.guidance.params["momentum"] == -0.5   # flag wins, preset fills the rest
    cfg = edm2_run.build_config(preset="demo-digits-apg", g_method="cfg", g_weight=0.3, outdir=None,
                                require_outdir=False)
    assert cfg.guidance.params == {}   # another method drops the preset's parameters
    assert cfg.guidance.weights == (0.3,) and cfg.net_neg_pkl == edm2_run.build_config(
        preset="demo-digits-apg", outdir=None, require_outdir=False).net_neg_pkl  # ... keeps its networks
    with pytest.raises(UsageError, match=r"^`g_method` cfg is not the method of `preset` demo-digits-apg \(apg\), "
                                         r"whose weights do not carry over; give `g_weight` \(e.g. 1\)$"):
        edm2_run.build_config(preset="demo-digits-apg", g_method="cfg", outdir=None, require_outdir=False)  # and weights
    assert edm2_run.build_config(preset="demo-digits", g_method="none", outdir=None,
                                 require_outdir=False).guidance.weights == ()


def test_results_collect_shows_the_counted_evaluations(nets, tmp_path):
    from results.collect import collect, to_markdown

    for method in ("tcfg", "tcfg-swg"):
        out = tmp_path / "runs" / method
        edm2_run.generate(_config(nets, out, method), progress=False)
        (out / "metrics.json").write_text(json.dumps({"results": {"fid": 1.5, "num_images": 2}, "args": {}}))
    rows = {r["method"]: r for r in collect(tmp_path / "runs")}
    assert rows["tcfg"]["evals_per_step"] == pytest.approx(2 * 5 / 3, abs=1e-3)        # 5 calls in 3 Heun steps
    assert rows["tcfg-swg"]["evals_per_step"] == pytest.approx(6 * 5 / 3, abs=1e-3)
    assert rows["tcfg-swg"]["cost_per_step"] == pytest.approx((2 + 4 * 144 / 256) * 5 / 3, abs=1e-3)
    assert "evals/step" in to_markdown(list(rows.values())).splitlines()[0]


def test_cli_flags_one_vs_two_ranks_identical(nets, tmp_path, capsys):
    """sample_edm2.py with a zoo method and its own flags: 2 torchrun ranks write the images of 1 rank."""
    import os
    import subprocess
    import sys

    import sample_edm2

    root = pathlib.Path(__file__).resolve().parents[1]
    common = ["--net_pos_pkl", str(nets / "pos.pkl"), "--net_neg_pkl", str(nets / "uncond.pkl"), "--seeds", "0-3",
              "--steps", "3", "--batch", "2", "--g_method", "apg-swg", "--g_weight", "1.0,0.2", "--swg_sizes", "12",
              "--eta", "0.3", "--momentum", "-0.5", "--g_sigma_interval", "0.1,50"]
    one = tmp_path / "one"
    assert sample_edm2.main([*common, "--outdir", str(one)]) == 0, capsys.readouterr().err
    saved = json.loads((one / "settings.json").read_text())
    assert saved["g_params"] == {"eta": 0.3, "norm_threshold": 0.0, "momentum": -0.5}
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "sample_edm2.py", *common, "--outdir", str(two)], cwd=root, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob("*.png"))}  # noqa: E731
    assert len(pngs(two)) == 4 and pngs(one) == pngs(two)
    # A flag of another method is refused before any image, naming this command line's flag.
    capsys.readouterr()
    assert sample_edm2.main([*common[:-6], "--zero_steps", "2", "--outdir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--zero_steps is a parameter of cfg-zero; --g_method apg-swg does not use it" in err
    assert not (tmp_path / "bad").exists()


def test_sweep_lines_take_the_zoo_presets():
    """results.sweep (and bash/sweep.sh, which passes its lines on) runs a zoo preset at each weight of its line."""
    from results.sweep import parse_line

    line = parse_line("APG+M-SWG=demo-digits-apg-mswg:0.4,0.1 0.4,0.3")
    cfg = edm2_run.build_config(preset=line.preset, g_weight=line.weights[1], outdir=None, require_outdir=False)
    assert (cfg.guidance.method, cfg.guidance.weights) == ("apg-swg", (0.4, 0.3))
    assert cfg.guidance.params == {"eta": 0.0, "norm_threshold": 0.0, "momentum": -0.5}
