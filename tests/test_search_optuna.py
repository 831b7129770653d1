"""search.optuna_search: a 2-trial study with a tiny EDM2 network and a tiny detector, duplicates pruned."""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from metrics import api as metrics_api
from metrics import detectors
from metrics.refs import save_ref
from search import optuna_search as S
from benchmarks import edm2_snapshot as WR
from utils.errors import UsageError
from tests.tiny_detectors import TinyInception as InceptionStandIn

optuna = pytest.importorskip("optuna")

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=8,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)


# Inception stand-in: 8-d features, 1008 probabilities.
TinyInception = functools.partial(InceptionStandIn, dim=8, seed=0)


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setitem(detectors.LOADERS, "inception", lambda device, **kw: TinyInception())
    detectors.clear_cache()
    torch.manual_seed(0)
    net = WR.make_precond(**TINY)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("out_gain", "emb_gain")):
                p.fill_(0.4)  # non-zero so that the weight changes the images
    WR.write_edm2_pickle(tmp_path / "pos.pkl", net, half=False)
    rng = np.random.default_rng(0)
    ref = metrics_api.compute_stats([rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)], ["inception"],
                                    progress=False)
    save_ref(ref, tmp_path / "ref.pkl")
    base = ["--net_pos_pkl", str(tmp_path / "pos.pkl"), "--g_method", "swg", "--swg_sizes", "12", "--seeds", "0-7",
            "--batch", "8", "--steps", "2", "--metrics", "fid", "--ref_path", str(tmp_path / "ref.pkl")]
    yield tmp_path, base
    detectors.clear_cache()


def _fid_of(folder: pathlib.Path) -> float:
    (path,) = folder.rglob("metrics.json")
    return json.loads(path.read_text())["results"]["fid"]


def test_two_trial_study(setup, capsys):
    tmp, base = setup
    out = tmp / "search"
    best = S.run_search("edm2", base, [(0.0, 2.0)], out, n_trials=2, objective="fid", step=0)
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    folders = sorted(p for p in out.iterdir() if p.name.startswith("trial_"))
    assert len(folders) == 2
    for t in trials:  # each trial sampled into its own folder with its own weight, value = its metrics.json
        folder = pathlib.Path(t.user_attrs["folder"])
        assert folder.name == f"trial_{t.number:04d}_{t.params['w0']:g}"
        args = json.loads((folder / "samples" / "settings.json").read_text())
        assert args["g_weight"] == [pytest.approx(t.params["w0"])] and args["g_method"] == "swg"
        assert len(list((folder / "samples").glob("*.png"))) == 8
        assert t.value == pytest.approx(_fid_of(folder))
    assert trials[0].value != trials[1].value
    winner = min(trials, key=lambda t: t.value)
    assert best["number"] == winner.number and best["weights"] == [round(winner.params["w0"], 10)]  # as sampled
    assert json.loads((out / "best.json").read_text())["value"] == pytest.approx(winner.value)
    assert "best: trial" in capsys.readouterr().out


def test_repeated_weights_are_pruned_and_study_resumes(setup):
    tmp, base = setup
    out = tmp / "dup"
    db = f"sqlite:///{tmp / 'study.db'}"
    S.run_search("edm2", base, [(0.5, 0.5)], out, n_trials=2, objective="fid", storage=db, study_name="s")
    # resuming the same study: the weight is still the only one, so the new trial is pruned too
    best = S.run_search("edm2", base, [(0.5, 0.5)], out, n_trials=1, objective="fid", storage=db, study_name="s")
    study = optuna.load_study(study_name="s", storage=db)
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] + [optuna.trial.TrialState.PRUNED] * 2
    assert [t.user_attrs.get("duplicate_of") for t in study.get_trials()] == [None, 0, 0]
    assert len([p for p in out.iterdir() if p.name.startswith("trial_")]) == 1  # sampled once
    assert best["number"] == 0 and best["weights"] == [0.5] and best["trials"] == 3


def test_argument_errors(setup, tmp_path):
    _, base = setup
    with pytest.raises(UsageError, match="--g_weight is set by the search"):
        S.run_search("edm2", base + ["--g_weight", "0.3"], [(0, 1)], tmp_path / "x", n_trials=1, objective="fid")
    with pytest.raises(UsageError, match="low:high"):
        S.parse_range("0.5")
    with pytest.raises(UsageError, match="low <= high"):
        S.parse_range("2:1")
    # a metric the sampler does not compute, or no metric at all: refused before the first trial
    with pytest.raises(UsageError, match="--objective fd_dinov2 needs the sampler's --metrics to include fd_dinov2 "
                                         r"\(it has fid\)"):
        S.run_search("edm2", base + ["--seeds", "0-1"], [(0.1, 0.1)], tmp_path / "y", n_trials=1,
                     objective="fd_dinov2")
    with pytest.raises(UsageError, match="--objective 'kid' is not a metric the samplers write"):
        S.run_search("edm2", base, [(0.1, 0.1)], tmp_path / "y", n_trials=1, objective="kid")
    assert not (tmp_path / "y").exists()
    # no --metrics at all (EDM2's default): refused before the first trial too
    no_metrics = [a for i, a in enumerate(base) if "--metrics" not in base[max(i - 1, 0):i + 1]]
    with pytest.raises(UsageError, match=r"include fid \(it has none\)"):
        S.run_search("edm2", no_metrics + ["--seeds", "0-1"], [(0.1, 0.1)], tmp_path / "w", n_trials=1,
                     objective="fid")
    assert not (tmp_path / "w").exists()
    # the CLI: one line, exit 2, for a bad sampler argument
    res = CliRunner().invoke(S.cli, ["--sampler", "edm2", "--outdir", str(tmp_path / "z"), "--weight", "0:1",
                                      "--n_trials", "1", "--objective", "fid", "--", *base, "--bogus", "1"])
    assert res.exit_code == 2 and "error:" in res.output


def test_cli_without_arguments_says_one_line(capsys):
    assert S.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--sampler" in err, err


def test_objective_directions_and_metric_names():
    # every objective maps to the --metrics entry that writes it; directions follow the metric
    assert S.OBJECTIVES["recall_dinov2"] == "pr_dinov2" and S.OBJECTIVES["precision_inception"] == "pr_inception"
    assert {"is", "conf_digits", "precision_inception", "recall_dinov2"} <= S.MAXIMIZE
    assert not {"fid", "fd_dinov2", "fd_digits", "saturation"} & S.MAXIMIZE
    assert S.MAXIMIZE <= set(S.OBJECTIVES)


def test_dit_trial_arguments():
    folder = pathlib.Path("/o/trial_0003_0.6_0.5")
    argv = S.sampler_argv("dit", ["--cfg-crop", "1", "--mask", "1"], [0.6, 0.5], folder)
    assert argv == ["--cfg-crop", "1", "--mask", "1", "--g-scale", "0.6", "--sample-dir", str(folder),
                    "--crop-scale", "0.5"]
    assert S.trial_folder("/o", 3, [0.6, 0.5]) == folder
    with pytest.raises(UsageError):
        S.run_search("dit", ["--sample-dir", "x"], [(0, 1)], "/tmp/unused", n_trials=1)
    # A table method: every weight through --weights (three for fdg-swg).
    argv = S.sampler_argv("dit", ["--method", "fdg-swg", "--mask", "1"], [0.2, 0.4, 0.1], folder)
    assert argv == ["--method", "fdg-swg", "--mask", "1", "--weights", "0.2,0.4,0.1", "--sample-dir", str(folder)]
    cfg = S._flags("dit").settings([*argv, "--metrics", "none", "--ckpt", "c.pt", "--model", "DiT-S/2"])
    assert cfg.guidance.method == "fdg-swg" and cfg.guidance.weights == (0.2, 0.4, 0.1)


RANK_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from metrics import detectors
from test_search_optuna import TinyInception
detectors.LOADERS["inception"] = lambda device, **kw: TinyInception()
from search.optuna_search import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_ranks_share_one_study(setup):
    """Under torchrun rank 0 asks and tells; both ranks sample each trial's images."""
    import os
    import subprocess
    import sys

    tmp, base = setup
    root = pathlib.Path(__file__).resolve().parents[1]
    script = tmp / "search_ranks.py"
    script.write_text(RANK_SCRIPT.format(root=str(root), tests=str(root / "tests")))
    out = tmp / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "--sampler", "edm2", "--outdir", str(out), "--weight", "0:1", "--step", "0.5",
                           "--n_trials", "2", "--objective", "fid", "--seed", "3", "--", *base],
                          env=env, capture_output=True, text=True, timeout=240, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-30000:]
    study = optuna.load_study(study_name="ranks", storage=f"sqlite:///{out / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 2  # one trial per ask, not one per rank
    sampled = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in sampled:
        assert len(list((pathlib.Path(t.user_attrs["folder"]) / "samples").glob("*.png"))) == 8
    assert proc.stdout.count("best: trial") == 1  # printed by rank 0 only
    assert json.loads((out / "best.json").read_text())["number"] in [t.number for t in sampled]


def test_dit_trial_runs_the_dit_sampler(tmp_path):
    """One DiT trial (CFG+M-SWG, two weights) with the detector-free saturation metric as objective."""
    from diffusers import AutoencoderKL

    from networks.dit import create_dit

    tiny = {"hidden_size": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    net = create_dit("DiT-S/2", input_size=8, num_classes=10, **tiny)
    torch.save(net.state_dict(), tmp_path / "dit.pt")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=64).save_pretrained(tmp_path / "vae")
    base = ["--model", "DiT-S/2", "--model-kwargs", json.dumps(tiny), "--ckpt", str(tmp_path / "dit.pt"),
            "--image-size", "64", "--num-classes", "10", "--vae-path", str(tmp_path / "vae"), "--seeds", "0-3",
            "--num-sampling-steps", "2", "--per-proc-batch-size", "4", "--device", "cpu", "--cfg-crop", "1",
            "--mask", "1", "--window-size", "6", "--metrics", "saturation"]
    best = S.run_search("dit", base, [(0.6, 0.6), (0.5, 0.5)], tmp_path / "dit_search", n_trials=1,
                        objective="saturation")
    folder = pathlib.Path(best["folder"])
    (args_path,) = folder.rglob("settings.json")
    args = json.loads(args_path.read_text())
    assert (args["method"], args["g_scale"], args["crop_scale"], args["mask"]) == ("cfg-swg", 0.6, 0.5, 1)
    (metrics_path,) = folder.rglob("metrics.json")
    assert best["value"] == json.loads(metrics_path.read_text())["results"]["saturation"]
    assert best["weights"] == [0.6, 0.5]


def test_a_reference_the_trials_cannot_use_is_refused_before_the_study(setup, tmp_path, monkeypatch):
    """Offline reference statistics (and DiT's skipped default metrics) stop the search before optuna.db exists."""
    import json
    import socket

    from tests.tiny_dit import TINY as DIT_TINY, write_tiny_dit, write_tiny_vae

    _, base = setup
    monkeypatch.setenv("SWG_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    offline = base[:-1] + [f"http://127.0.0.1:{port}/img512.pkl"]
    with pytest.raises(UsageError, match="img512.pkl") as info:
        S.run_search("edm2", offline, [(0.1, 0.3)], tmp_path / "off", n_trials=1, objective="fid")
    assert info.value.format(info.value.spelling).count("--ref-path") == 0  # EDM2's spelling if any
    assert not (tmp_path / "off").exists()
    # DiT without reference statistics would skip its default metrics: refused, naming DiT's flag.
    write_tiny_dit(tmp_path / "tiny-dit.pt")
    write_tiny_vae(tmp_path / "vae")
    dit = ["--model", "DiT-S/2", "--model-kwargs", json.dumps(DIT_TINY), "--ckpt", str(tmp_path / "tiny-dit.pt"),
           "--image-size", "64", "--num-classes", "10", "--vae-path", str(tmp_path / "vae"), "--seeds", "0-3",
           "--num-sampling-steps", "3", "--crop", "1"]
    with pytest.raises(UsageError, match="the sampler skips fid without reference statistics; add --ref-path after --"):
        S.run_search("dit", dit, [(0.1, 0.3)], tmp_path / "dit", n_trials=1, objective="fid")
    assert not (tmp_path / "dit").exists()


def test_a_wrong_number_of_weight_ranges_names_the_searchs_flag(setup, tmp_path):
    _, base = setup
    cfg_swg = [a if a != "swg" else "cfg-swg" for a in base] + ["--net_neg_pkl", base[1]]
    with pytest.raises(UsageError, match=r"^1 --weight range\(s\) given, but the sampler's method needs another "
                                         r"count: --g_method cfg-swg takes 2 weight\(s\).*; give one --weight "
                                         r"low:high per weight"):
        S.run_search("edm2", cfg_swg, [(0.1, 0.3)], tmp_path / "w", n_trials=1, objective="fid")
    assert not (tmp_path / "w").exists()
