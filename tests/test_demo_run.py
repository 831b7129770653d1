"""The offline demo end to end at a reduced count: every kind of guidance, results table, plot, safe reruns."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from utils.errors import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "demo"))

import run_demo  # noqa: E402

# Unguided, plain SWG, M-SWG and both combinations (they exercise the cfg / wmg negatives too).
ROWS = "none,swg,m-swg,wmg-swg-RCT,cfg-swg"


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _snapshot(folder: pathlib.Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_demo_end_to_end_rerun_and_resume(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, str(REPO / "demo" / "run_demo.py"), "--outdir", str(out), "--num", "4", "--steps", "2",
           "--methods", ROWS]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _csv_rows(out / "results.csv")
    assert [row["method"] for row in rows] == ROWS.split(",")
    for row in rows:
        assert len(list((out / row["method"]).glob("*.png"))) == 4
        assert np.isfinite(float(row["fd"])) and 1.0 <= float(row["confidence"]) <= 10.0 + 1e-9
    assert (out / "results.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "| m-swg | swg | 0.2 |" in md and "| cfg-swg | cfg-swg | 0.3,0.3 | uncond |" in md
    # The counted evaluations per step: 2 Heun steps = 3 guided calls; cfg-swg: 2 + 4 windows per call.
    evals = {row["method"]: float(row["evals_per_step"]) for row in rows}
    assert evals["none"] == pytest.approx(1.5) and evals["cfg-swg"] == pytest.approx(6 * 1.5)
    settings = json.loads((out / "demo_settings.json").read_text())
    assert (settings["num"], settings["steps"]) == (4, 2)
    assert [m["name"] for m in settings["methods"]] == ROWS.split(",")
    # Guidance changes the images; plain SWG and M-SWG differ only in the mask.
    none, swg = run_demo.read_images(out / "none", range(4)), run_demo.read_images(out / "swg", range(4))
    assert none.shape[0] == 4 and none.shape[2:] == (16, 16) and (none != swg).any()

    # Same settings again (another batch size does not change images): the table is printed, nothing is touched.
    before = _snapshot(out)
    r = subprocess.run(cmd + ["--batch", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert md in r.stdout and "nothing to do" in r.stdout
    assert _snapshot(out) == before
    # Different settings: one line, exit 2, nothing touched.
    r = subprocess.run(cmd[:6] + ["--steps", "3", "--methods", ROWS], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "different settings (steps: 2 there, 3 now)" in r.stderr
    with pytest.raises(UsageError, match="methods: none,swg,m-swg,wmg-swg-RCT,cfg-swg there, none now"):
        run_demo.run_demo(out, 4, 2, methods=["none"], log=lambda *a: None)
    assert _snapshot(out) == before
    r = subprocess.run(cmd[:4] + ["--methods", "nope"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown --methods" in r.stderr

    # Interrupted run (results not written, one image missing): the rerun resumes and reuses finished images.
    for name in ("results.md", "results.csv", "results.png", "samples.png"):
        (out / name).unlink()
    old_image = run_demo.read_images(out / "m-swg", [2]).astype(int)
    (out / "m-swg" / "0000002.png").unlink()
    kept = {k: v for k, v in _snapshot(out).items() if k.suffix == ".png"}
    log = []
    run_demo.run_demo(out, 4, 2, methods=ROWS.split(","), log=log.append)
    after = _snapshot(out)
    assert all(after[k] == v for k, v in kept.items())  # not rewritten
    # The redrawn image is the same up to round-off (it was sampled in a batch of 1 instead of 4).
    diff = np.abs(run_demo.read_images(out / "m-swg", [2]).astype(int) - old_image)
    assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())
    again = _csv_rows(out / "results.csv")
    for a, b in zip(rows, again):
        for key in ("fd", "confidence", "class_match"):
            tol = 1e-2 if a["method"] == "m-swg" else 1e-9
            assert float(a[key]) == pytest.approx(float(b[key]), rel=tol), (a["method"], key)
    assert (out / "results.md").read_text().splitlines()[:4] == md.splitlines()[:4]


def test_results_without_settings_are_refused(tmp_path):
    (tmp_path / "results.md").write_text("old table\n")
    with pytest.raises(UsageError, match="demo_settings.json does not"):
        run_demo.run_demo(tmp_path, 4, 2, methods=["none"], log=lambda *a: None)
    assert (tmp_path / "results.md").read_text() == "old table\n"


def test_class_match_uses_the_labels_the_pipeline_drew(tmp_path):
    """Real digits (12 steps): the classifier agrees with the recovered labels (wrong labels give about 0.1)."""
    rows = run_demo.run_demo(tmp_path / "d", num=20, steps=12, methods=["none"], log=lambda *a: None)
    assert rows[0]["class_match"] >= 0.8 and rows[0]["confidence"] > 5


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_requested_classes_match_sampler_labels(device):
    """The demo's class bookkeeping reproduces the labels the EDM2 pipeline draws per seed on ``device``."""
    from sampling.seeds import StackedRandomGenerator, make_labels
    from utils import dist

    seeds = [5, 0, 17, 3, 1234567]
    rnd = StackedRandomGenerator(device, seeds)
    rnd.randn([5, 1, 16, 16], device=device)
    labels = make_labels(rnd, 10, None, 5, device)[0]
    assert (labels.argmax(1).cpu().numpy() == run_demo.requested_classes(seeds, device=device)).all()
    assert torch.allclose(labels.sum(1).cpu(), torch.ones(5))
    # Without a device the sampler's own device is used.
    expect = run_demo.requested_classes(seeds, device=dist.device())
    assert (run_demo.requested_classes(seeds) == expect).all()


def test_interrupted_method_keeps_its_batches_and_seconds(tmp_path, monkeypatch):
    """Ctrl-C in the middle of a row: its finished batches stay, the rerun draws only the rest, seconds add up."""
    from sampling.edm2_run import EDM2Backend

    real, calls = EDM2Backend.images, []

    def interrupted(self, seeds, device):
        calls.append(list(seeds))
        if len(calls) == 4:             # the fourth batch (the second of row "m-swg") is interrupted
            raise KeyboardInterrupt
        return real(self, seeds, device)

    out = tmp_path / "demo"
    monkeypatch.setattr(EDM2Backend, "images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo.run_demo(out, num=5, steps=2, batch=3, methods=["none", "m-swg"], log=lambda *a: None,
                          progress=False)
    assert calls == [[0, 1, 2], [3, 4], [0, 1, 2], [3, 4]]
    assert sorted(p.name for p in (out / "m-swg").glob("*.png")) == ["0000000.png", "0000001.png", "0000002.png"]
    timings = json.loads((out / "timings.json").read_text())
    assert timings["none"]["images"] == 5 and timings["m-swg"]["images"] == 3 and timings["m-swg"]["seconds"] > 0
    assert not (out / "results.md").exists()
    kept = {k: v for k, v in _snapshot(out).items() if k.suffix == ".png"}

    calls.clear()
    rows = run_demo.run_demo(out, num=5, steps=2, batch=3, methods=["none", "m-swg"], log=lambda *a: None,
                             progress=False)
    assert calls == [[3, 4]]            # row 'none' is reused whole, 'm-swg' draws its missing seeds only
    after = _snapshot(out)
    assert all(after[k] == v for k, v in kept.items())
    again = json.loads((out / "timings.json").read_text())
    assert again["none"] == timings["none"] and again["m-swg"]["images"] == 5
    assert again["m-swg"]["seconds"] > timings["m-swg"]["seconds"]
    # The table reports the seconds the images took, not the time of the rerun.
    assert rows[0]["seconds"] == pytest.approx(timings["none"]["seconds"])
    assert rows[1]["seconds"] == pytest.approx(again["m-swg"]["seconds"])
    assert (out / "samples.png").stat().st_size > 500


def test_ctrl_c_is_one_line_exit_130(tmp_path, monkeypatch):
    from click.testing import CliRunner

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_demo, "run_demo", interrupted)
    r = CliRunner().invoke(run_demo.main, ["--outdir", str(tmp_path / "d")])
    assert r.exit_code == 130
    assert r.output.strip().count("\n") == 0 and "rerun the same command to resume" in r.output


def test_plot_axes_are_honest(tmp_path, monkeypatch):
    """The confidence axis spans the score's whole range 1..10 and FD starts at 0; a legend names the colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"method": "none", "g_method": "none", "fd": 30.0, "confidence": 9.5},
            {"method": "m-swg", "g_method": "swg", "fd": 40.0, "confidence": 9.6},
            {"method": "cfg", "g_method": "cfg", "fd": 35.0, "confidence": 9.7}]
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    run_demo.plot(rows, tmp_path / "p.png")
    ax_fd, ax_conf = figs[0].axes
    assert ax_conf.get_ylim() == (1, 10) and ax_fd.get_ylim()[0] == 0
    labels = [t.get_text() for t in ax_fd.get_legend().get_texts()]
    assert {"unguided", "other guidance", "with windows (SWG)", "unguided value"} <= set(labels)
    assert (tmp_path / "p.png").stat().st_size > 1000
    # Without the unguided row (--methods m-swg,cfg): no dashed "unguided value" line, no legend entry
    # for a kind that is not shown.
    figs.clear()
    run_demo.plot(rows[1:], tmp_path / "q.png")
    ax_fd = figs[0].axes[0]
    assert [t.get_text() for t in ax_fd.get_legend().get_texts()] == ["other guidance", "with windows (SWG)"]
    assert not [ln for ln in ax_fd.get_lines() if ln.get_linestyle() == "--"]


def _grey_run(folder: pathlib.Path, seeds, size: int = 16) -> pathlib.Path:
    """A run folder of random grey PNGs named as the sampler names them."""
    import PIL.Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in seeds:
        PIL.Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"{s:07d}.png")
    return folder


def _inside(fig, artists) -> list[str]:
    """Texts of ``artists`` whose drawn extent leaves the figure (cut off in the saved PNG)."""
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    return [t.get_text() for t in artists if t.get_text() and not (
        t.get_window_extent(renderer).x0 >= box.x0 - 0.5 and t.get_window_extent(renderer).y0 >= box.y0 - 0.5
        and t.get_window_extent(renderer).x1 <= box.x1 + 0.5 and t.get_window_extent(renderer).y1 <= box.y1 + 0.5)]


@pytest.mark.parametrize("names,seeds,size", [
    (["none", "cfg", "wmg-RT", "wmg-RCT", "swg", "m-swg", "m-swg-1.1", "wmg-swg-RT", "wmg-swg-RCT", "cfg-swg"], 12, 16),
    (["none", "m-swg"], 2, 16),                                        # narrower than its title
    (["cond/none", "uncond-early/autoguidance-1", "cond/m-swg-k28-w0.25"], 10, 32),  # long-range labels
    ([f"cond/row-{i}" for i in range(11)] + ["cond-early/m-swg-k16-w1"], 8, 32)])  # tall: its long label was cut
def test_sample_grid_labels_and_title_fit(tmp_path, monkeypatch, names, seeds, size):
    """samples.png: a title, and no label (rows, seeds, the ``seed`` axis label, the title) cut off (issue 23 #11)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from demo.common import sample_grid

    rows = [(n, _grey_run(tmp_path / n.replace("/", "_"), range(seeds), size)) for n in names]
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    title = "Digits demo samples: one row per method, the same seeds in each (16 Heun steps)"
    sample_grid(rows, list(range(seeds)), tmp_path / "samples.png", title=title)
    (ax,) = figs[0].axes
    assert ax.get_title() == title and ax.get_xlabel() == "seed"
    texts = [ax.title, ax.xaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()]
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert _inside(figs[0], texts) == []
    fig = figs[0]
    tight = fig.get_tightbbox(fig.canvas.get_renderer())          # every artist, in inches
    w, h = fig.get_size_inches()
    assert tight.x0 >= -0.01 and tight.y0 >= -0.01 and tight.x1 <= w + 0.01 and tight.y1 <= h + 0.01
    assert (tmp_path / "samples.png").stat().st_size > 1000


def test_table_without_unguided_row_and_heading(tmp_path, monkeypatch):
    """``--methods swg``: no ΔFD against a ``none`` that did not run, no "(default command)" (issue 23 #9)."""
    monkeypatch.setattr(run_demo, "plot", lambda rows, path: None)
    monkeypatch.setattr(run_demo, "sample_grid", lambda *a, **k: None)
    row = {"method": "swg", "g_method": "swg", "weight": "0.2", "negative": "", "masked": 0, "fd": 12.5,
           "confidence": 9.1, "class_match": 0.9, "seconds": 3.0}
    swg = [m for m in run_demo.METHODS if m.name == "swg"]
    md, _ = run_demo.write_table([row], tmp_path, run_demo.DEFAULT["num"], run_demo.DEFAULT["steps"], swg)
    head, line = md.splitlines()[0], md.splitlines()[-1]
    assert "default command" not in head and "(--methods swg)" in head
    assert line.split("|")[6].strip() == "-"                       # ΔFD vs none
    # With the unguided row, ΔFD is against it (not against the first row), and every method: the default command.
    none = dict(row, method="none", g_method="none", weight="", fd=10.0)
    rows = [row, none] + [dict(row, method=m.name) for m in run_demo.METHODS if m.name not in ("none", "swg")]
    md, _ = run_demo.write_table(rows, tmp_path, run_demo.DEFAULT["num"], run_demo.DEFAULT["steps"], run_demo.METHODS)
    assert "(default command)" in md.splitlines()[0]
    assert [line.split("|")[6].strip() for line in md.splitlines()[4:6]] == ["+2.50", "+0.00"]
