"""sampling.run: the one lifecycle of both samplers (settings file, resume rule, pending seeds and their split,
early failures) and the command lines over it (flag spellings, error messages naming each CLI's flags)."""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import pytest
import torch

import sample_dit
import sample_edm2
from metrics import detectors
from metrics.refs import save_ref
from sampling import dit_flags, edm2_flags, edm2_run, run, run_folder, run_settings
from benchmarks import edm2_snapshot as WR
from tests.test_dit_cli import _base, assets  # noqa: F401  (module fixture: tiny DiT + VAE)
from utils.errors import UsageError

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=8,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
FAST = ["--steps", "2", "--batch", "2"]


@pytest.fixture(scope="module")
def pos(tmp_path_factory):
    d = tmp_path_factory.mktemp("lifecycle")
    torch.manual_seed(0)
    WR.write_edm2_pickle(d / "pos.pkl", WR.make_precond(**TINY), half=False)
    return d / "pos.pkl"


def _edm2(args, capsys):
    capsys.readouterr()
    code = sample_edm2.main([str(a) for a in args])
    return code, capsys.readouterr().err


def _pngs(d: pathlib.Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.rglob("*.png"))}


# ----------------------------------------------------------------------------
# The settings file and its comparison rule.

def test_changed_setting_compares_as_json_and_skips_keys_not_saved():
    saved = {"g_weight": [1.2, 0.14], "swg_sizes": [40], "steps": 32}
    assert run_folder.changed_setting(saved, {"g_weight": (1.2, 0.14), "swg_sizes": (40,), "steps": 32, "new": 1},
                               ["g_weight", "swg_sizes", "steps", "new"]) is None
    assert run_folder.changed_setting(saved, {"g_weight": (1.2, 0.25), "swg_sizes": (40,)}, ["swg_sizes", "g_weight"]) \
        == ("g_weight", [1.2, 0.14])
    assert run_folder.changed_setting(saved, {"S_max": float("inf")}, ["S_max"]) is None  # not saved: not compared


def test_settings_file_names_new_first_then_the_old_ones(tmp_path):
    assert run_folder.read_saved_settings(tmp_path) is None
    (tmp_path / "args.json").write_text(json.dumps({"method": "swg"}))
    assert run_folder.read_saved_settings(tmp_path) == (tmp_path / "args.json", {"method": "swg"})
    (tmp_path / "generate_args.json").write_text("{torn")  # unreadable: skipped
    assert run_folder.read_saved_settings(tmp_path)[0].name == "args.json"
    run_folder.write_settings(tmp_path, {"method": "none"})
    assert run_folder.read_saved_settings(tmp_path) == (tmp_path / "settings.json", {"method": "none"})


def test_a_folder_written_by_the_old_edm2_sampler_resumes(pos, tmp_path, capsys):
    """generate_args.json (the old name) is read: same settings resume, other settings are refused."""
    out = tmp_path / "old"
    common = ["--net_pos_pkl", pos, "--outdir", out, *FAST]
    assert _edm2([*common, "--seeds", "0-1"], capsys)[0] == 0
    (out / "settings.json").rename(out / "generate_args.json")
    first = {p: (out / p).stat().st_ino for p in _pngs(out)}
    code, err = _edm2([*common, "--seeds", "0-3"], capsys)
    assert code == 0, err
    assert sorted(_pngs(out)) == [f"{s:07d}.png" for s in range(4)]
    assert {p: (out / p).stat().st_ino for p in first} == first  # finished images untouched
    (out / "settings.json").unlink()  # only the old file left again
    before = _pngs(out)
    code, err = _edm2([*common, "--seeds", "0-5", "--steps", "3"], capsys)
    assert code == 2 and "holds images made with different settings (steps: 2 there, 3 now)" in err
    assert "--outdir" in err and _pngs(out) == before


def test_a_folder_written_by_the_old_dit_sampler_is_compared(assets, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "o"
    assert sample_dit.main(_base(assets, out, "--seeds", "0")) == 0
    (folder,) = [p / "samples" for p in out.iterdir()]
    saved = json.loads((folder / "settings.json").read_text())
    (folder / "settings.json").unlink()
    old = {k: v for k, v in saved.items() if k not in ("sampler", "batch", "seeds")}
    (folder / "args.json").write_text(json.dumps({**old, "cfg_channels": "all"}))
    capsys.readouterr()
    assert sample_dit.main(_base(assets, out, "--seeds", "0-1")) == 2
    err = capsys.readouterr().err
    assert "cfg_channels: 'all' there, 'reference' now" in err and "--sample-dir" in err
    (folder / "args.json").write_text(json.dumps(old))
    assert sample_dit.main(_base(assets, out, "--seeds", "0-1")) == 0
    assert sorted(p.name for p in folder.glob("*.png")) == ["0000000.png", "0000001.png"]


# ----------------------------------------------------------------------------
# Pending seeds and the split over ranks: one rule for both backends.

@pytest.mark.parametrize("n,batch,world", [(1, 4, 1), (10, 3, 1), (10, 3, 2), (17, 4, 3), (64, 32, 8)])
def test_split_covers_pending_once_in_batches_of_at_most_batch(n, batch, world):
    pending = list(range(100, 100 + 2 * n, 2))
    per_rank = [run.split_batches(pending, batch, world, r) for r in range(world)]
    flat = [s for batches in per_rank for b in batches for s in b]
    assert sorted(flat) == pending and all(0 < len(b) <= batch for bs in per_rank for b in bs)
    assert max(len(bs) for bs in per_rank) - min(len(bs) for bs in per_rank) <= 1  # balanced ranks


def _record_batches(monkeypatch) -> list:
    seen = []
    real = run.Backend.images

    def spy(self, seeds, device):
        seen.append((self.name, list(seeds)))
        return real(self, seeds, device)

    monkeypatch.setattr(run.Backend, "images", spy)
    return seen


def test_both_backends_sample_the_pending_seeds_split_by_one_rule(pos, assets, tmp_path, monkeypatch,  # noqa: F811
                                                                   capsys):
    seen = _record_batches(monkeypatch)
    edm2_out = tmp_path / "e"
    assert _edm2(["--net_pos_pkl", pos, "--outdir", edm2_out, "--seeds", "2,5", *FAST], capsys)[0] == 0
    assert sample_dit.main(_base(assets, tmp_path / "d", "--seeds", "2,5")) == 0
    seen.clear()
    assert _edm2(["--net_pos_pkl", pos, "--outdir", edm2_out, "--seeds", "0-6", *FAST], capsys)[0] == 0
    assert sample_dit.main(_base(assets, tmp_path / "d", "--seeds", "0-6")) == 0
    pending = [0, 1, 3, 4, 6]
    expect = run.split_batches(pending, 2, 1, 0)
    assert [b for name, b in seen if name == "edm2"] == expect
    assert [b for name, b in seen if name == "dit"] == expect


def test_duplicate_seeds_are_made_once_in_both_samplers():
    assert run_settings.parse_seeds("0-3,2,7") == [0, 1, 2, 3, 7]
    edm2 = sample_edm2.settings(["--net_pos_pkl", "x.pkl", "--outdir", "o", "--seeds", "0-3,2"])
    dit = sample_dit.settings(["--seeds", "0-3,2", "--metrics", "none"])
    assert edm2.seeds == dit.seeds == [0, 1, 2, 3]


# ----------------------------------------------------------------------------
# Errors name the flags of the command line that was used.

def test_library_errors_name_parameters_and_each_cli_its_flags(assets, tmp_path, capsys):  # noqa: F811
    from guidance import WindowError, window_origins

    with pytest.raises(WindowError, match="`window_size`"):
        window_origins(8, 10, 2)
    exc = UsageError("`window_size` 10 exceeds; `batch` too; `outdir` is a file")
    assert exc.params == ("window_size", "batch", "outdir") and exc.param == "window_size"
    assert str(exc) == "`window_size` 10 exceeds; `batch` too; `outdir` is a file"  # the API's names
    assert exc.format(edm2_flags.SPELLING) == "--swg_sizes 10 exceeds; --batch too; --outdir is a file"
    assert exc.format(dit_flags.SPELLING) == \
        "--window-size 10 exceeds; --per-proc-batch-size too; --sample-dir is a file"
    # An API that calls a parameter otherwise renames it as data; the CLI spelling follows the new name.
    renamed = UsageError("`method` x needs `window_size`").renamed({"method": "g_method", "window_size": "swg_sizes"})
    assert renamed.params == ("g_method", "swg_sizes") and str(renamed) == "`g_method` x needs `swg_sizes`"
    assert renamed.format(edm2_flags.SPELLING) == "--g_method x needs --swg_sizes"
    # The same guidance error through both command lines.
    assert sample_dit.main(_base(assets, tmp_path / "o", "--seeds", "0", "--crop", "1", "--g-scale", "0.5",
                                 "--window-size", "10")) == 2
    err = capsys.readouterr().err
    assert "exceeds the input size 8" in err and "--window-size" in err and "swg" not in err
    nets = tmp_path / "pos.pkl"
    torch.manual_seed(0)
    WR.write_edm2_pickle(nets, WR.make_precond(**TINY), half=False)
    code, err = _edm2(["--net_pos_pkl", nets, "--outdir", tmp_path / "e", "--g_method", "swg", "--g_weight", "0.2",
                       "--swg_sizes", "40"], capsys)
    assert code == 2 and "exceeds the input size 16" in err and "--swg_sizes" in err and "--window" not in err


def test_bounds_declared_once_for_the_api_and_both_clis(tmp_path, capsys):
    """A setting's range is declared on its dataclass field; the API's check and the flags' click type read it."""
    from sampling import dit_run
    from utils.bounds import bounds

    assert bounds(dit_run.DiTConfig, "global_seed") == (0, 2 ** 31 - 1)
    assert bounds(run_settings.RunSettings, "batch") == (1, None)
    with pytest.raises(UsageError, match=r"^`global_seed` must lie in 0\.\.2147483647, got 2147483648$") as info:
        dit_run.build_config(global_seed=2 ** 31, metrics="none", seeds="0")
    assert info.value.param == "global_seed"
    with pytest.raises(UsageError, match=r"^`steps` must be >= 1, got 0$"):
        edm2_run.build_config(net_pos_pkl="x.pkl", outdir=str(tmp_path / "o"), steps=0)
    with pytest.raises(UsageError, match=r"^`batch` must be >= 1, got 0$"):
        dit_run.build_config(per_proc_batch_size=0, metrics="none", seeds="0", sample_dir=str(tmp_path))
    for flag in ("--global-seed", "--global_seed"):  # the click type has the same bounds, checked while parsing
        assert sample_dit.main(["--sample-dir", str(tmp_path / "d"), flag, str(2 ** 31)]) == 2
        assert "is not in the range 0<=x<=2147483647" in capsys.readouterr().err
    code, err = _edm2(["--net_pos_pkl", "x.pkl", "--outdir", tmp_path / "o", "--steps", "0"], capsys)
    assert code == 2 and "'--steps': 0 is not in the range x>=1" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_warnings_and_notes_name_the_flags_of_the_command_line(assets, tmp_path, capsys):  # noqa: F811
    from utils.errors import spell

    assert spell("pass `ref_path`") == "pass `ref_path`"  # a Python caller: the API's names
    assert spell("pass `ref_path`", dit_flags.SPELLING) == "pass --ref-path"
    argv = _base(assets, tmp_path / "o", "--seeds", "0,0,1")
    del argv[argv.index("--metrics"):argv.index("--metrics") + 2]  # DiT's default metrics: skipped without a reference
    assert sample_dit.main(argv) == 0
    err = capsys.readouterr()
    assert "warning: --seeds lists 1 seed(s) more than once" in err.err
    assert "metrics skipped: no reference statistics (pass --ref-path)" in err.out + err.err
    assert "`" not in err.out + err.err
    assert spell("pass `ref_path`") == "pass `ref_path`"  # the command line's spelling ended with it


@pytest.mark.parametrize("edm2_args,dit_args,edm2_flag,dit_flag", [
    (["--batch", "0"], ["--per-proc-batch-size", "0"], "'--batch': 0 is not in the range x>=1",
     "'--per-proc-batch-size' / '--per_proc_batch_size': 0 is not in the range x>=1"),
    (["--seeds", "0-99999999"], ["--seeds", "0-99999999"], "--seeds must lie in 0..9999999",
     "--seeds must lie in 0..9999999"),
    (["--metrics", "fid"], ["--metrics", "fid", "--ref-path", ""], "--ref_path", None),
    (["--outdir", "FILE"], ["--sample-dir", "FILE"], "choose another --outdir", "choose another --sample-dir"),
])
def test_common_settings_errors_per_cli(edm2_args, dit_args, edm2_flag, dit_flag, tmp_path, capsys):
    blocker = tmp_path / "FILE"
    blocker.write_text("keep")
    fix = [str(blocker) if a == "FILE" else a for a in edm2_args]
    t0 = time.perf_counter()
    code, err = _edm2(["--net_pos_pkl", "x.pkl", "--outdir", tmp_path / "o", *fix], capsys)
    assert code == 2 and err.count("\n") == 1 and edm2_flag in err, err
    assert time.perf_counter() - t0 < 5  # a huge seed range is refused before it is expanded
    if dit_flag:
        fix = [str(blocker) if a == "FILE" else a for a in dit_args]
        assert sample_dit.main(["--sample-dir", str(tmp_path / "d"), "--metrics", "none", *fix]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and dit_flag in err, err
    assert blocker.read_text() == "keep" and not (tmp_path / "o").exists()


def test_model_name_typos_get_suggestions(capsys, tmp_path):
    code, err = _edm2(["--net_pos_pkl", "raw-img512-ss", "--outdir", tmp_path / "o"], capsys)
    assert code == 2 and "did you mean raw-img512-s" in err and "--list_presets" in err
    assert sample_dit.main(["--model", "DiT-XL/3", "--metrics", "none", "--sample-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and "DiT-XL/2" in err.split("?")[0]


def test_digits_metrics_suggest_the_demo_reference(capsys, tmp_path):
    code, err = _edm2(["--net_pos_pkl", "demo-digits-cond", "--outdir", tmp_path / "o", "--metrics", "fd_digits"],
                      capsys)
    assert code == 2 and "--ref_path" in err and "demo/refs/digits-ref.pkl" in err and "img512" not in err


# ----------------------------------------------------------------------------
# Everything a run needs is loaded before the first image.

def test_missing_or_broken_reference_fails_before_any_image(pos, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = _edm2(["--net_pos_pkl", pos, "--outdir", out, "--seeds", "0-1", *FAST, "--metrics", "fid",
                       "--ref_path", tmp_path / "missing.pkl"], capsys)
    assert code == 2 and "--ref_path" in err and "missing.pkl" in err and "--ref " not in err
    (tmp_path / "trunc.pkl").write_bytes(b"\x80\x04\x95")
    code, err = _edm2(["--net_pos_pkl", pos, "--outdir", out, "--seeds", "0-1", *FAST, "--metrics", "fid",
                       "--ref_path", tmp_path / "trunc.pkl"], capsys)
    assert code == 2 and "trunc.pkl" in err and err.count("\n") == 1
    assert not out.exists()


def test_detectors_load_before_any_image(pos, tmp_path, capsys, monkeypatch):
    def missing(device, **kw):
        raise UsageError("Inception weights not cached (test)")

    monkeypatch.setitem(detectors.LOADERS, "inception", missing)
    detectors.clear_cache()
    save_ref({"fid": {"mu": np.zeros(4), "sigma": np.eye(4)}}, tmp_path / "ref.pkl")
    out = tmp_path / "o"
    code, err = _edm2(["--net_pos_pkl", pos, "--outdir", out, "--seeds", "0-1", *FAST, "--metrics", "fid",
                       "--ref_path", tmp_path / "ref.pkl"], capsys)
    assert code == 2 and "Inception weights not cached" in err
    assert not out.exists()
    detectors.clear_cache()


def test_prefetch_also_fetches_detector_weights_and_reference(pos, tmp_path, monkeypatch, capsys):
    from metrics.inception import INCEPTION_URL
    from utils import cache

    fetched = []
    fake = lambda source, **kw: fetched.append(str(source)) or pathlib.Path(source)  # noqa: E731
    monkeypatch.setattr(cache, "fetch", fake)
    monkeypatch.setattr(detectors, "fetch", fake)  # imported by name at its top (c6d3e0c)
    ref = tmp_path / "ref.pkl"
    code, err = _edm2(["--net_pos_pkl", pos, "--prefetch", "--metrics", "fid", "--ref_path", ref], capsys)
    assert code == 0, err
    assert fetched == [str(pos), str(ref), INCEPTION_URL]


def test_dit_sample_dir_that_is_a_file_is_refused_before_loading_the_model(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    rc = sample_dit.main(["--model", "DiT-S/2", "--ckpt", str(tmp_path / "missing.pt"), "--image-size", "64",
                          "--num-classes", "10", "--sample-dir", str(blocker), "--seeds", "0", "--metrics", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file" in err and "--sample-dir" in err and "missing.pt" not in err


# ----------------------------------------------------------------------------
# Flags.

def _long_flags(command) -> list[list[str]]:
    return [[o for o in p.opts + p.secondary_opts if o.startswith("--")] for p in command.params]


@pytest.mark.parametrize("command", [sample_edm2.cli, sample_dit.cli], ids=["edm2", "dit"])
def test_every_multi_word_flag_has_both_spellings_and_h_works(command, capsys):
    for names in _long_flags(command):
        for name in names:
            if "_" in name[2:] or "-" in name[2:]:
                assert name[:2] + name[2:].replace("-", "_") in names, name
                assert name[:2] + name[2:].replace("_", "-") in names, name
    assert {"-h", "--help"} <= set(command.context_settings["help_option_names"])
    assert "--device" in {n for names in _long_flags(command) for n in names}


def test_edm2_both_spellings_give_the_same_settings():
    under = sample_edm2.settings(["--net_pos_pkl", "x.pkl", "--outdir", "o", "--g_method", "swg", "--g_weight", "0.2",
                                  "--swg_sizes", "8", "--scale_window_guide", "0", "--S_churn", "1"])
    dash = sample_edm2.settings(["--net-pos-pkl", "x.pkl", "--outdir", "o", "--g-method", "swg", "--g-weight", "0.2",
                                 "--swg-sizes", "8", "--scale-window-guide", "0", "--S-churn", "1"])
    assert under == dash and dash.S_churn == 1.0 and not dash.guidance.masked


def test_dit_bare_switches_mean_one():
    bare = sample_dit.settings(["--crop", "--mask", "--g-scale", "0.5", "--metrics", "none"])
    given = sample_dit.settings(["--crop", "1", "--mask", "1", "--g-scale", "0.5", "--metrics", "none"])
    assert bare == given and bare.guidance.method == "swg" and bare.guidance.masked and bare.switches["mask"] == 1
    off = sample_dit.settings(["--crop", "0", "--metrics", "none"])
    assert off.guidance.method == "none" and off.switches["crop"] == 0


def test_list_presets(capsys):
    assert sample_edm2.main(["--list_presets"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("swg-edm2-s-rct-mswg "))
    assert line.split()[:6] == ["swg-edm2-s-rct-mswg", "wmg-swg", "1.2,0.14", "40", "raw-img512-s",
                                "raw-img512-xs-T16"]
    assert len(out.splitlines()) == len(edm2_run.PR.PRESETS) + 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_flag_in_both_samplers(capsys, tmp_path):
    code, err = _edm2(["--net_pos_pkl", "x.pkl", "--outdir", tmp_path / "o", "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda" in err and "no CUDA GPU" in err
    assert sample_dit.main(["--device", "cuda", "--metrics", "none", "--sample-dir", str(tmp_path)]) == 2
    assert "--device cuda" in capsys.readouterr().err
