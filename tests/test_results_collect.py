"""results.collect on synthetic run folders written with the samplers' and metrics' own record formats."""

from __future__ import annotations

import csv
import io
import json
import pathlib

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from guidance import METHODS
from metrics.api import write_metrics
from results import collect as C
from utils.errors import UsageError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def edm2_run(root: pathlib.Path, name: str, results: dict, **opts) -> pathlib.Path:
    """A sample_edm2.py run folder: generate_args.json from the real config, metrics via metrics.api."""
    from sampling import edm2_run as R

    outdir = root / name / "samples"
    cfg = R.build_config(outdir=str(outdir), seeds="0-99", **opts)
    outdir.mkdir(parents=True)
    (outdir / "generate_args.json").write_text(json.dumps(cfg.to_json()))
    write_metrics(outdir, results, cfg.to_json())
    return outdir


def dit_run(root: pathlib.Path, results: dict, **opts) -> pathlib.Path:
    """A sample_dit.py run folder: settings.json as the sampler records it, metrics via metrics.api."""
    from sampling import dit_flags, dit_run as R, run_folder

    cfg = dit_flags.settings([a for k, v in opts.items() for a in (k, str(v))] + ["--sample-dir", str(root)])
    outdir = pathlib.Path(cfg.outdir)
    outdir.mkdir(parents=True)
    record = R.DiTBackend(cfg).record()
    run_folder.write_settings(outdir, record)
    write_metrics(outdir, results, record)
    return outdir


@pytest.fixture()
def runs(tmp_path):
    root = tmp_path / "samples"
    s = "raw-img512-s"
    for w, fid, fdd, sat in [(0.2, 2.55, 81.35, 0.31), (1.1, 4.96, 53.45, 0.42), (0.6, 3.1, 62.0, 0.36)]:
        edm2_run(root, f"s/MSWG/{w}", {"fid": fid, "fd_dinov2": fdd, "saturation": sat, "num_images": 100},
                 net_pos_pkl=s, g_method="swg", g_weight=str(w), swg_sizes="40", swg_steps="2",
                 scale_window_guide=1)
    edm2_run(root, "s/RT_SWG/1.2_0.25", {"fid": 3.35, "fd_dinov2": 40.94, "num_images": 100}, net_pos_pkl=s,
             net_neg_pkl="raw-img512-s-T16", g_method="wmg-swg", g_weight="1.2,0.25", swg_sizes="40")
    edm2_run(root, "s/none", {"fid": 2.56, "fd_dinov2": 68.64, "num_images": 100}, net_pos_pkl=s)
    dit_run(root / "dit", {"fid": 5.97, "fd_dinov2": 79.95, "is": 210.5, "is_std": 3.0, "num_images": 50},
            **{"--crop": 1, "--mask": 1, "--g-scale": 0.5, "--num-fid-samples": 50})
    dit_run(root / "dit", {"fid": 6.79, "fd_dinov2": 49.97, "num_images": 50},
            **{"--cfg-crop": 1, "--mask": 1, "--g-scale": 0.6, "--crop-scale": 0.5, "--num-fid-samples": 50})
    return root


def test_rows_describe_each_run(runs):
    rows = C.collect(runs)
    assert len(rows) == 7
    by = {(r["sampler"], r["method"], r["weights"]): r for r in rows}
    r = by["edm2", "swg", "1.1"]
    assert (r["label"], r["windows"], r["model"], r["N"], r["fid"], r["fd_dinov2"], r["saturation"]) == \
        ("M-SWG", "k=40,n=2", "edm2-img512-s-2147483-0.100", 100, 4.96, 53.45, 0.42)
    r = by["edm2", "wmg-swg", "1.2,0.25"]
    assert (r["label"], r["masked"], r["fid"]) == ("WMG+SWG", 0, 3.35)  # reference mode ignores the mask
    assert by["edm2", "none", ""]["windows"] == ""
    r = by["dit", "swg", "0.5"]
    assert (r["label"], r["model"], r["windows"], r["N"], r["is"]) == ("M-SWG", "DiT-XL/2@256", "k=20,n=2", 50, 210.5)
    r = by["dit", "cfg-swg", "0.6,0.5"]
    assert (r["label"], r["fd_dinov2"]) == ("CFG+M-SWG", 49.97)
    # ordered by sampler, model, method, weights
    swg = [r["weights"] for r in rows if r["method"] == "swg" and r["sampler"] == "edm2"]
    assert swg == ["0.2", "0.6", "1.1"]


def test_newest_evaluation_and_csv_only_runs(runs, tmp_path):
    folder = runs / "s/MSWG/0.2/samples"
    write_metrics(folder, {"fid": 2.50, "num_images": 100}, json.loads((folder / "generate_args.json").read_text()))
    assert (folder / "metrics-1.json").is_file()
    (rows,) = [r for r in C.collect(runs) if r["run"].startswith("s/MSWG/0.2")]
    assert (rows["fid"], rows["evaluation"]) == (2.50, 1)
    both = [r for r in C.collect(runs, all_evals=True) if r["run"].startswith("s/MSWG/0.2")]
    assert [(r["evaluation"], r["fid"]) for r in both] == [(0, 2.55), (1, 2.50)]

    # A folder with only the CSV row (arguments then results) and no args file.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "metrics.csv").write_text("g_method,g_weight,swg_sizes,swg_steps,scale_window_guide,net_pos_pkl,fid,"
                                      "num_images\nswg,[0.4],[32],[2],0,/m/net.pkl,7.5,64\n")
    (row,) = C.collect(lone)
    assert (row["label"], row["weights"], row["windows"], row["model"], row["fid"], row["N"]) == \
        ("SWG", "0.4", "k=32,n=2", "net", 7.5, 64)


def test_tables_and_plot(runs, tmp_path):
    paths = C.write_report(runs, tmp_path / "report")
    table = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(table) == 7
    row = next(t for t in table if t["method"] == "swg" and t["weights"] == "0.6")
    assert float(row["fid"]) == 3.1 and float(row["saturation"]) == 0.36 and row["windows"] == "k=40,n=2"
    md = paths["markdown"].read_text().splitlines()
    assert md[0] == "| method | weights | windows | model | N | FID | FDD | IS | saturation | run |"
    assert "| M-SWG | 1.1 | k=40,n=2 | edm2-img512-s-2147483-0.100 | 100 | 4.96 | 53.45 | – | 0.420 " \
        "| s/MSWG/1.1/samples |" in md
    assert len(md) == 2 + 7
    img = PIL.Image.open(paths["plot"])
    assert img.format == "PNG"
    # four metrics present (FID, FDD, IS, saturation): four panels of 4.6 in at 120 dpi
    assert img.size[0] == round(4 * 4.6 * 120)
    assert np.asarray(img.convert("L")).std() > 10  # something was drawn


def test_series_put_the_swg_weight_on_x(runs):
    series = C._series(C.collect(runs), "fid")
    assert series["edm2-img512-s-2147483-0.100: M-SWG, k=40,n=2"] == [(0.2, 2.55), (0.6, 3.1), (1.1, 4.96)]
    assert series["edm2-img512-s-2147483-0.100: WMG+SWG (w1=1.2), k=40,n=2"] == [(0.25, 3.35)]
    assert series["edm2-img512-s-2147483-0.100: no guidance"] == [(0.0, 2.56)]


def test_cli(runs, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(C.main, [str(runs), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| M-SWG | 0.2 |" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["metrics_vs_weight.png", "results.csv", "results.md"]

    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(C.main, [str(empty), "--out", str(out)])
    assert res.exit_code == 2 and "no metrics.json" in res.output
    res = CliRunner().invoke(C.main, [str(tmp_path / "missing")])
    assert res.exit_code == 2


def test_broken_file_is_skipped_with_a_warning(runs, capsys):
    bad = runs / "broken"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json")
    rows = C.collect(runs)
    assert len(rows) == 7
    assert "skipping" in capsys.readouterr().err
    with pytest.raises(UsageError):
        C.collect(bad)


def _demo_table(folder: pathlib.Path) -> dict:
    with open(folder / "results.csv", newline="") as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def test_demo_run_metrics_in_table_and_plot(tmp_path, monkeypatch):
    """A folder written by demo/run_demo.py: its FD and confidence show up as fd_digits / conf_digits."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "demo"))
    run_demo = importlib.import_module("run_demo")
    demo = tmp_path / "demo"
    r = CliRunner().invoke(run_demo.main, ["--outdir", str(demo), "--num", "2", "--steps", "1",
                                           "--methods", "none,m-swg,m-swg-1.1"])
    assert r.exit_code == 0, r.output[-2000:]
    own = {p: p.read_bytes() for p in demo.iterdir() if p.is_file()}
    table = _demo_table(demo)

    res = CliRunner().invoke(C.main, [str(demo)])
    assert res.exit_code == 0, res.output
    report = demo / "report"  # the default: the demo's own results.md stays as it is
    assert {p: p.read_bytes() for p in demo.iterdir() if p.is_file()} == own
    rows = {r["run"]: r for r in C.collect(demo)}
    assert sorted(rows) == ["m-swg", "m-swg-1.1", "none"]
    for name, row in rows.items():
        assert row["fd_digits"] == pytest.approx(float(table[name]["fd"]))
        assert row["conf_digits"] == pytest.approx(float(table[name]["confidence"]))
        assert row["N"] == 2 and row["model"].startswith("demo-digits")
    assert (rows["none"]["label"], rows["m-swg-1.1"]["label"], rows["m-swg-1.1"]["weights"]) == \
        ("no guidance", "M-SWG", "1.1")
    md = (report / "results.md").read_text().splitlines()
    assert md[0] == "| method | weights | windows | model | N | ref | FD-digits | confidence | class match | run |"
    assert any(line.startswith("| M-SWG | 1.1 | k=12,n=2 | demo-digits | 2 | digits-ref.pkl | ") for line in md)
    assert C._series(list(rows.values()), "fd_digits")["demo-digits: M-SWG, k=12,n=2"] == \
        [(0.2, pytest.approx(float(table["m-swg"]["fd"]))), (1.1, pytest.approx(float(table["m-swg-1.1"]["fd"])))]
    img = PIL.Image.open(report / "metrics_vs_weight.png")
    assert img.size[0] == round(2 * 4.6 * 120)  # two panels: FD (digits) and confidence

    # Writing the report over the demo's own table is refused, nothing touched.
    res = CliRunner().invoke(C.main, [str(demo), "--out", str(demo)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "--out" in res.output
    assert {p: p.read_bytes() for p in demo.iterdir() if p.is_file()} == own


def test_unwritable_out_is_one_line(runs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    res = CliRunner().invoke(C.main, [str(runs), "--out", str(blocker / "sub")])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert res.output.startswith(f"error: cannot write {blocker / 'sub'}: ") and "--out" in res.output
    assert blocker.read_text() == "keep"


def test_markdown_names_the_run_of_each_row(tmp_path):
    """Two runs with the same settings and scores are two rows that the run column tells apart (issue 23 #12)."""
    root = tmp_path / "samples"
    for name in ("seed-a", "seed-b"):
        edm2_run(root, name, {"fid": 3.0, "num_images": 100}, net_pos_pkl="raw-img512-s")
    (root / "seed-b" / "samples" / "metrics-1.json").write_text(
        json.dumps({"results": {"fid": 2.5, "num_images": 100}, "args": {}}))
    md = C.to_markdown(C.collect(root, all_evals=True))
    head, rule, *body = md.splitlines()
    assert head.split("|")[-2].strip() == "run" and len(rule.split("|")) == len(head.split("|"))
    runs = [line.split("|")[-2].strip() for line in body]
    assert runs == ["seed-a/samples", "seed-b/samples", "seed-b/samples (metrics-1)"]
    assert len(set(body)) == 3


def _mask_applied(guided, without_windows) -> bool:
    """Whether ``guided`` zeroes the window term where one window covers a pixel (M-SWG's mask).

    The window term is ``guided`` minus the same method with the window weight 0.  Toy networks on
    16x16: D_pos = 2x + mean(x), so a window's prediction differs from the whole image's; D_neg = x / 2.
    Windows 12, 2 per axis: pixel (0, 0) lies in one window, (8, 8) in four.
    """
    import torch

    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.ones(1)
    term = guided(x, sigma, None) - without_windows(x, sigma, None)
    assert term[0, 0, 8, 8].abs() > 1e-5  # the window term is there where windows overlap
    return bool(term[0, 0, 0, 0].abs() < 1e-7)


QUIRKS = ("wmg-swg", "cfg-swg")  # the EDM2 reference's combinations: no mask unless --clean_combos


@pytest.mark.parametrize("method", [n for n, s in METHODS.items() if s.windows and not getattr(s, "perturbation", None)])
@pytest.mark.parametrize("masked", [0, 1])
@pytest.mark.parametrize("clean", [False, True])
def test_label_says_m_swg_exactly_when_the_sampler_masks(tmp_path, method, masked, clean):
    """EDM2: the table's label and ``masked`` column agree with what the sampler's guided denoiser does.

    The reference's combined methods never apply the mask (``WMG+SWG`` / ``CFG+SWG``, also with
    ``--scale_window_guide 1``); with ``--clean_combos`` they do (``WMG+M-SWG`` / ``CFG+M-SWG``).
    The newer ``X-swg`` (``apg-swg``, ``tcfg-swg`` ...) always honour the mask: ``APG+M-SWG``
    (they were labelled ``APG+SWG``, masked 0).
    """
    import torch

    from sampling import edm2_run as R

    class Toy(torch.nn.Module):
        def __init__(self, scale, shift):
            super().__init__()
            self.scale, self.shift = scale, shift

        def forward(self, x, sigma, labels=None):
            return self.scale * x + (x.mean(dim=(1, 2, 3), keepdim=True) if self.shift else 0)

    spec = METHODS[method]
    weights = list(spec.example) if spec.example else [0.5] * spec.num_weights
    opts = dict(net_pos_pkl="raw-img512-s", g_method=method, g_weight=",".join(map(str, weights)), swg_sizes="12",
                swg_steps="2", scale_window_guide=masked, clean_combos=clean)
    if spec.needs_neg:
        opts["net_neg_pkl"] = "raw-img512-xs-uncond"
    folder = edm2_run(tmp_path / "samples", "run", {"fid": 3.0, "num_images": 100}, **opts)
    nets = (Toy(2.0, True), Toy(0.5, False) if spec.needs_neg else None)
    guided = R.make_guided(R.build_config(outdir=str(folder), seeds="0-99", **opts), *nets)
    no_win = dict(opts, g_weight=",".join(map(str, weights[:-1] + [0.0])))
    applied = _mask_applied(guided, R.make_guided(R.build_config(outdir=str(folder), seeds="0-99", **no_win), *nets))
    assert applied == bool(masked and (clean or method not in QUIRKS))
    (row,) = C.collect(tmp_path / "samples")
    assert row["masked"] == int(applied)
    base = {"swg": "SWG", "wmg-swg": "WMG+SWG", "cfg-swg": "CFG+SWG"}.get(method, spec.label)
    assert base.endswith("+SWG") or base == "SWG"
    assert row["label"] == (base.replace("SWG", "M-SWG") if applied else base)


def test_dit_methods_given_by_weights(tmp_path):
    """``sample_dit.py --method apg-swg --weights 1,0.2 --mask 1``: the row shows those weights (it showed
    the unused --g-scale, 0) and M-SWG; the switch methods keep their scales."""
    root = tmp_path / "samples"
    dit_run(root, {"fid": 9.0, "num_images": 50}, **{"--method": "apg-swg", "--weights": "1,0.2", "--mask": 1,
                                                     "--num-fid-samples": 50})
    dit_run(root, {"fid": 8.0, "num_images": 50}, **{"--method": "tcfg", "--weights": "0.4", "--num-fid-samples": 50})
    dit_run(root, {"fid": 7.0, "num_images": 50}, **{"--crop": 1, "--g-scale": 0.5, "--num-fid-samples": 50})
    rows = {r["method"]: r for r in C.collect(root)}
    assert (rows["apg-swg"]["weights"], rows["apg-swg"]["label"], rows["apg-swg"]["_weights"]) == \
        ("1,0.2", "APG+M-SWG", [1.0, 0.2])
    assert (rows["tcfg"]["weights"], rows["tcfg"]["label"], rows["tcfg"]["windows"]) == ("0.4", "TCFG", "")
    assert (rows["swg"]["weights"], rows["swg"]["label"]) == ("0.5", "SWG")


def test_the_reference_of_each_evaluation_is_a_column(tmp_path):
    """A run scored again against another reference: the newest row says which reference (a new-user trial saw
    the score change with nothing telling why)."""
    from metrics.api import write_metrics

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"sampler": "edm2", "g_method": "swg", "g_weight": [0.2],
                                                   "ref_path": "https://x/edm2/dataset-refs/img512.pkl"}))
    write_metrics(run, {"fid": 3.0, "num_images": 8}, {"ref_path": "https://x/edm2/dataset-refs/img512.pkl"})
    write_metrics(run, {"fid": 4.0, "num_images": 8}, {"images": str(run), "ref": "/data/other.pkl"})
    newest, = C.collect(tmp_path / "runs")
    assert newest["ref"] == "other.pkl" and newest["fid"] == 4.0
    both = C.collect(tmp_path / "runs", all_evals=True)
    assert [r["ref"] for r in both] == ["img512.pkl", "other.pkl"]
    md = C.to_markdown(both)
    assert md.splitlines()[0].startswith("| method | weights | windows | model | N | ref | FID")
    assert "| img512.pkl |" in md and "| other.pkl |" in md
