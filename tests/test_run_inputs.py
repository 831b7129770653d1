"""Inputs a new user gets wrong (issue 23): damaged run folders, non-finite numbers, repeated seeds, packaging.

* A folder that holds finished images but no readable ``settings.json`` is refused with one line (exit 2),
  and nothing in it changes; an empty folder with a damaged file is simply used.
* Every float flag of both samplers refuses ``nan`` and ``inf`` before anything is loaded (``--S_max inf``,
  EDM2's default, stays allowed).
* The minimum image count of the metrics counts distinct seeds.
* ``pyproject.toml`` gives setuptools no deprecation warning.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import click
import pytest

import sample_dit
import sample_edm2
from guidance.table import METHODS
from sampling import dit_flags, edm2_flags, run_settings
from utils.errors import UsageError
from tests.test_run_lifecycle import pos  # noqa: F401  (module fixture: a tiny EDM2 pickle)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(main, args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _files(d: pathlib.Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


DAMAGE = {"truncated": b'{"sampler": "edm2", "steps": ', "empty": b"", "a list": b"[1, 2, 3]",
          "binary": bytes(range(256)), "deleted": None}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_images_without_readable_settings_are_refused(pos, tmp_path, capsys, damage):
    out = tmp_path / "run"
    common = ["--net_pos_pkl", pos, "--outdir", out, "--batch", "2", "--seeds", "0-3"]
    assert _run(sample_edm2.main, [*common, "--steps", "2"], capsys)[0] == 0
    if DAMAGE[damage] is None:
        (out / "settings.json").unlink()
    else:
        (out / "settings.json").write_bytes(DAMAGE[damage])
    before = _files(out)
    code, err = _run(sample_edm2.main, [*common, "--seeds", "0-5", "--steps", "3"], capsys)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "settings.json is missing or damaged" in err
    assert "choose another --outdir" in err
    assert _files(out) == before  # no image added, settings.json not rewritten


def test_a_damaged_settings_file_without_images_is_replaced(pos, tmp_path, capsys):
    out = tmp_path / "fresh"
    out.mkdir()
    (out / "settings.json").write_bytes(b"[1, 2")
    code, err = _run(sample_edm2.main, ["--net_pos_pkl", pos, "--outdir", out, "--steps", "2", "--seeds", "0-1"],
                     capsys)
    assert code == 0, err
    assert (out / "settings.json").read_text().lstrip().startswith("{") and len(list(out.glob("*.png"))) == 2


def _float_flags(command: click.Command) -> list[str]:
    return [o.opts[0] for o in command.params if isinstance(o, click.Option) and o.type is click.FLOAT]


def _owner(param: str):
    """A method without windows or weak network that takes ``param``, and its example weights."""
    spec = next(s for s in METHODS.values() if any(p.name == param for p in s.params) and not s.windows
                and s.negative != "weak" and not s.perturbation)
    return spec.name, spec.example_text()


def test_every_float_flag_is_a_checked_float():
    """The test below covers every float flag (a new one is found here, not missed)."""
    assert {"--sigma_min", "--sigma_max", "--rho", "--S_churn", "--S_min", "--S_max", "--S_noise"} <= \
        set(_float_flags(edm2_flags.cli))
    assert {"--g-scale", "--crop-scale"} <= set(_float_flags(dit_flags.cli))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_nan_and_inf(tmp_path, capsys, value):
    params = {p.name for s in METHODS.values() for p in s.params}
    for flag in _float_flags(edm2_flags.cli):
        if flag == "--S_max" and value == "inf":
            continue  # EDM2's own default: no upper bound on the churn
        args = ["--preset", "demo-digits-uncond", "--outdir", tmp_path / "e", "--seeds", "0-1", "--prefetch"]
        name = flag.lstrip("-").replace("-", "_")
        if name in params:
            method, weights = _owner(name)
            args += ["--g_method", method, "--g_weight", weights]
        code, err = _run(sample_edm2.main, [*args, flag, value], capsys)
        assert code == 2 and "is not finite" in err and len(err.strip().splitlines()) == 1, (flag, err)
    for flag in _float_flags(dit_flags.cli):
        args = ["--sample-dir", tmp_path / "d", "--num-fid-samples", "2", "--metrics", "none", "--prefetch"]
        name = flag.lstrip("-").replace("-", "_")
        if name in params:
            method, weights = _owner(name)
            args += ["--method", method, "--weights", weights]
        else:
            args += ["--cfg-crop", "1"]
        code, err = _run(sample_dit.main, [*args, flag, value], capsys)
        assert code == 2 and "is not finite" in err and len(err.strip().splitlines()) == 1, (flag, err)
    assert not (tmp_path / "e").exists() and not (tmp_path / "d").exists()


def test_the_minimum_image_count_counts_distinct_seeds(tmp_path, capsys):
    code, err = _run(sample_edm2.main, ["--preset", "demo-digits", "--outdir", tmp_path / "o", "--seeds", "3,3,3",
                                        "--metrics", "fd_digits"], capsys)
    assert code == 2 and "needs at least 2 images, the run makes 1" in err
    code, err = _run(sample_dit.main, ["--sample-dir", tmp_path / "d", "--seeds", "5,5", "--metrics", "fid",
                                       "--ref-path", "r.pkl"], capsys)
    assert code == 2 and "needs at least 2 images, the run makes 1" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_missing_reference_names_only_the_metrics_that_need_one(tmp_path, capsys):
    """IS, saturation and the digit confidence score the images alone: only FD / KID are said to need --ref_path."""
    code, err = _run(sample_edm2.main, ["--net_pos_pkl", tmp_path / "absent.pkl", "--outdir", tmp_path / "o",
                                        "--seeds", "0-19", "--metrics", "is,fid,saturation,kid"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "metrics 'fid', 'kid_inception' need reference statistics; pass --ref_path" in err, err
    assert "'is'" not in err and "saturation" not in err, err
    assert not (tmp_path / "o").exists()
    ask = dict(outdir=None, seeds=list(range(20)))
    with pytest.raises(UsageError, match=r"^`metrics`: metric 'fd_digits' needs reference statistics; pass `ref_path` "
                                         r"\(e\.g\. .*digits"):
        run_settings.check_reference(run_settings.RunSettings(metrics=("conf_digits", "fd_digits"), **ask))
    run_settings.check_reference(run_settings.RunSettings(metrics=("is", "saturation", "conf_digits"), **ask))


def test_pyproject_gives_setuptools_no_deprecation_warning():
    # In a fresh interpreter: setuptools' distutils shim refuses to load once another test imported distutils.
    code = ("import json, warnings\n"
            "from setuptools.config.pyprojecttoml import apply_configuration\n"
            "from setuptools.dist import Distribution\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    dist = apply_configuration(Distribution(), 'pyproject.toml')\n"
            "print(json.dumps({'warnings': [str(w.message).splitlines()[0] for w in caught\n"
            "                               if 'license' in str(w.message).lower()],\n"
            "                  'expression': dist.metadata.license_expression,\n"
            "                  'files': list(dist.metadata.license_files or [])}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["warnings"] == []
    assert got["expression"] == "MIT" and "LICENSE" in got["files"]


def test_checks_do_not_change_what_they_check():
    """check_run_settings validates; the output mode is resolved once, when the settings are built."""
    import copy
    import dataclasses

    from sampling import edm2_run, run_settings
    from utils.errors import UsageError

    cfg = edm2_run.build_config(preset="demo-digits", outdir=None, require_outdir=False, save_tar=True)
    assert (cfg.save, cfg.save_tar) == ("tar", True)
    before = copy.deepcopy(cfg)
    run_settings.check_run_settings(cfg, require_outdir=False)
    assert cfg == before
    raw = dataclasses.replace(cfg, save="TAR")  # not an output mode: refused, and left as it was
    with pytest.raises(UsageError, match="save_mode"):
        run_settings.check_run_settings(raw, require_outdir=False)
    assert raw.save == "TAR"


def test_a_reference_of_another_resolution_is_refused_before_the_first_image(tmp_path, capsys):
    """The digits models make 16x16 images: a 32x32 reference is refused once the networks are loaded, before
    anything is sampled or written (it used to fail only when the metrics were computed, after the run)."""
    from metrics.refs import load_ref, save_ref

    ref = load_ref(str(ROOT / "demo" / "refs" / "digits-ref.pkl"))
    save_ref({**ref, "resolution": [32, 32]}, tmp_path / "ref32.pkl")
    out = tmp_path / "out"
    code, err = _run(sample_edm2.main, ["--preset", "demo-digits", "--seeds", "0-3", "--steps", "2", "--outdir",
                                        str(out), "--ref_path", str(tmp_path / "ref32.pkl")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--ref_path " in err and "was made from 32x32 images but this run's images are 16x16" in err, err
    assert not out.exists()
    save_ref({**ref, "resolution": [16, 16]}, tmp_path / "ref16.pkl")  # the right size runs
    code, err = _run(sample_edm2.main, ["--preset", "demo-digits", "--seeds", "0-1", "--steps", "2", "--outdir",
                                        str(out), "--ref_path", str(tmp_path / "ref16.pkl")], capsys)
    assert code == 0 and (out / "metrics.json").is_file(), err


def test_options_a_method_does_not_use_are_said(capsys):
    """The reference ignores window flags given with a method without windows; here a warning says so."""
    edm2_flags.settings(["--preset", "demo-digits-apg", "--outdir", "o", "--scale_window_guide", "0",
                         "--clean_combos"])
    assert "warning: --scale_window_guide and --clean_combos are not used by --g_method apg; ignoring them" in \
        capsys.readouterr().err
    edm2_flags.settings(["--preset", "demo-digits-apg-mswg", "--outdir", "o", "--scale_window_guide", "0"])
    edm2_flags.settings(["--preset", "demo-digits-cfg-mswg", "--outdir", "o", "--clean_combos"])
    assert "warning" not in capsys.readouterr().err  # used there


@pytest.mark.parametrize("main,flags,foreign,hint", [
    (sample_edm2.main, edm2_flags, "--g-scale", "use --g_weight"),
    (sample_dit.main, dit_flags, "--g_method", "use --method, or the switches --crop 1"),
])
def test_the_other_samplers_flags_get_this_ones_spelling(main, flags, foreign, hint, capsys):
    hints = flags.DIT_FLAGS if flags is edm2_flags else flags.EDM2_FLAGS
    names = {opt for p in flags.cli.params for opt in (*p.opts, *p.secondary_opts)}
    assert not set(hints) & names  # every hint is for a flag this command does not have
    code, err = _run(main, [foreign, "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: no such option {foreign} in ") and hint in err


def test_an_ignored_option_is_not_recorded_and_does_not_block_a_resume(tmp_path, capsys):
    """--swg_steps with cfg is said and ignored: the folder records the default, and the command without it
    resumes the same folder (found by a new-user trial: it was refused as 'different settings')."""
    out = tmp_path / "run"
    base = ["--net_pos_pkl", "demo-digits-cond", "--net_neg_pkl", "demo-digits-uncond", "--g_method", "cfg",
            "--g_weight", "0.4", "--steps", "2", "--metrics", "none", "--outdir", str(out)]
    code, err = _run(sample_edm2.main, [*base, "--seeds", "0-1", "--swg_steps", "3", "--clean_combos"], capsys)
    assert code == 0 and "--swg_steps and --clean_combos are not used by --g_method cfg" in err, err
    saved = json.loads((out / "settings.json").read_text())
    assert saved["swg_steps"] == [2] and saved["clean_combos"] is False
    code, err = _run(sample_edm2.main, [*base, "--seeds", "0-3"], capsys)
    assert code == 0 and "2 of 4 images to sample" in err, err
    code, err = _run(sample_edm2.main, [*base, "--seeds", "0-3", "--g_weight", "0.5"], capsys)
    assert code == 2 and "different settings" in err  # what the method uses is still compared
    # The grid and the demo pass their own defaults: nothing to say.
    capsys.readouterr()
    edm2_flags.settings([*base[:-2], "--outdir", "o", "--swg_steps", "2", "--scale_window_guide", "1"])
    assert "warning" not in capsys.readouterr().err


def test_a_folder_another_rank_creates_and_removes_meanwhile_is_not_called_a_file(tmp_path):
    """Under torchrun rank 0 proves the output folder can be created by creating and removing it while the other
    ranks check it: a check must never see it as 'a file' (it did, between its exists() and is_dir() calls)."""
    import threading

    from sampling.run_folder import check_outdir

    target, stop = tmp_path / "run", threading.Event()

    def churn():
        while not stop.is_set():
            target.mkdir()
            target.rmdir()

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(2000):
            check_outdir(target)
    finally:
        stop.set()
        worker.join()
    target.write_text("x")  # a real file is still refused
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_outdir(target)
