"""results.sweep: points, repeats over seed offsets, the summary table and the figure."""

import csv
import io

import pytest
from click.testing import CliRunner

from results import sweep
from utils.errors import UsageError


def fake_point(calls):
    def run(line, weight, seeds, outdir, common, progress):
        calls.append((line.label, weight, seeds[0], len(seeds), outdir, dict(common)))
        off = seeds[0] - 10
        w = float(weight.split(",")[-1])
        return {"fid": 10 * w + off / 1000, "is": 5 - w + off / 1000, "is_std": 0.1, "num_images": len(seeds)}
    return run


def test_sweep_repeats_points_and_summarizes(tmp_path):
    calls = []
    lines = [sweep.parse_line("M-SWG=demo-digits:0.1 0.3"), sweep.parse_line("WMG+SWG = demo-digits-rt-mswg : 1.2,0.2")]
    rows = sweep.run_sweep(lines, seeds=range(10, 20), out=tmp_path, offsets=[0, 1000, 3000],
                           metrics="fid,is", run_point=fake_point(calls))
    assert len(rows) == 9 and len(calls) == 9
    assert calls[0][:4] == ("M-SWG", "0.1", 10, 10) and calls[2][2] == 3010
    assert calls[0][4] == tmp_path / "M-SWG" / "w0.1" / "o0" and calls[-1][4] == tmp_path / "WMG+SWG" / "w1.2_0.2" / "o3000"
    assert calls[0][5] == {"metrics": "fid,is"}
    summary = {(r["label"], r["weights"]): r for r in sweep.summarize(rows)}
    r = summary[("M-SWG", "0.3")]
    assert r["repeats"] == 3 and r["N"] == 10 and r["w"] == 0.3
    assert r["fid"] == pytest.approx(3 + 4 / 3) and r["fid_min"] == pytest.approx(3.0)
    assert r["fid_spread"] == pytest.approx(3.0) and r["fid_best"] == pytest.approx(3.0)
    assert r["is_best"] == pytest.approx(r["is_max"]) == pytest.approx(4.7 + 3)  # higher is better
    assert summary[("WMG+SWG", "1.2,0.2")]["w"] == 0.2

    paths = sweep.write_sweep(rows, tmp_path / "report")
    table = paths["markdown"].read_text().splitlines()
    assert table[0] == "| method | w | N | repeats | FID | Inception score |"
    assert table[2] == "| M-SWG | 0.1 | 10 | 3 | 2.33 (1.00-4.00) | 6.23 (4.90-7.90) |"
    assert len(list(csv.DictReader(io.StringIO(paths["points"].read_text())))) == 9
    assert paths["figure"].read_bytes()[:4] == b"\x89PNG"


def test_sweep_refuses_bad_input(tmp_path):
    with pytest.raises(UsageError, match="LABEL=PRESET"):
        sweep.parse_line("no preset here")
    with pytest.raises(UsageError, match="not a number"):
        sweep.parse_line("A=demo-digits:0.1 x")
    line = sweep.parse_line("A=demo-digits:0.1")
    with pytest.raises(UsageError, match="overlap"):
        sweep.run_sweep([line], seeds=range(100), out=tmp_path, offsets=[0, 50], run_point=fake_point([]))
    with pytest.raises(UsageError, match="labels must differ"):
        sweep.run_sweep([line, line], seeds=range(10), out=tmp_path, run_point=fake_point([]))


def test_bash_sweep_prints_a_valid_results_sweep_command(tmp_path):
    import os
    import pathlib
    import shlex
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "TORCHRUN_ARGS", "EXTRA_ARGS")}
    env.update(DRY_RUN="1", nproc_per_node="2", lines="M-SWG=demo-digits:0.1 0.3; WMG+M-SWG=demo-digits-rt-mswg:1.2,0.2",
               offsets="0,1000", seeds="0-99", metrics="fd_digits,saturation")
    proc = subprocess.run(["bash", str(root / "bash" / "sweep.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (cmd,) = [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]
    assert cmd[:5] == ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "results.sweep"]
    params = sweep.main.make_context("sweep", cmd[5:]).params
    assert [sweep.parse_line(t) for t in params["lines"]] == [
        sweep.Line("M-SWG", "demo-digits", ["0.1", "0.3"]), sweep.Line("WMG+M-SWG", "demo-digits-rt-mswg", ["1.2,0.2"])]
    assert (params["offsets"], params["seeds"], params["metrics"]) == ("0,1000", "0-99", "fd_digits,saturation")


def test_digits_sweep_end_to_end_resumes_without_sampling(tmp_path, monkeypatch):
    """Two methods on the shipped digits models, two seed offsets, streaming: table, figure, rerun samples nothing."""
    lines = [sweep.parse_line("M-SWG=demo-digits:0.3"), sweep.parse_line("WMG=demo-digits-rt:1.2")]
    kw = dict(seeds=range(6), out=tmp_path, offsets=[0, 100], metrics="fd_digits,conf_digits,saturation",
              device="cpu", progress=False, options={"steps": 2, "batch": 3})
    rows = sweep.run_sweep(lines, **kw)
    assert [(r["label"], r["offset"], r["num_images"]) for r in rows] == [
        ("M-SWG", 0, 6), ("M-SWG", 100, 6), ("WMG", 0, 6), ("WMG", 100, 6)]
    assert rows[0]["fd_digits"] != rows[1]["fd_digits"]  # other seeds, other images
    point = tmp_path / "M-SWG" / "w0.3" / "o100"
    assert not [p for p in point.rglob("*") if p.suffix == ".png"] and (point / "metrics.json").exists()

    from sampling import edm2_run
    calls = []
    real = edm2_run.generate
    monkeypatch.setattr(edm2_run, "generate", lambda cfg, **k: calls.append(real(cfg, **k)) or calls[-1])
    assert sweep.run_sweep(lines, **kw) == rows  # finished points: same numbers, nothing sampled
    assert [c["pending"] for c in calls] == [0, 0, 0, 0]
    paths = sweep.write_sweep(rows, tmp_path / "report")
    assert "| M-SWG | 0.3 | 6 | 2 |" in paths["markdown"].read_text()


def test_steps_reach_every_point(tmp_path, monkeypatch):
    """--steps sets the sampler steps of every point (the presets' 32 otherwise)."""
    seen = {}

    def fake_run_sweep(lines, **kw):
        seen.update(kw)
        return []

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(sweep, "write_sweep", lambda rows, out, digits: {"markdown": tmp_path / "none"})
    (tmp_path / "none").write_text("")
    res = CliRunner().invoke(sweep.main, ["--line", "M-SWG=demo-digits:0.1", "--steps", "8", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen["options"] == {"steps": 8}
    res = CliRunner().invoke(sweep.main, ["--line", "M-SWG=demo-digits:0.1", "--steps", "0", "--out", str(tmp_path)])
    assert res.exit_code == 2
