"""sample_edm2.py when the disk fills up or the user presses Ctrl-C: one line, the right exit status,
finished images intact, no temporary files, and a rerun finishes the job."""

from __future__ import annotations

import errno
import os
import pathlib
import re

import pytest

import sample_edm2
from sampling import writer as W

ARGS = ["--preset", "demo-digits-none", "--seeds", "0-3", "--batch", "2", "--steps", "2", "--metrics", "none"]


def _run(args, capsys):
    """(exit status, stderr lines without progress-bar redraws) of the CLI run in-process."""
    capsys.readouterr()
    code = sample_edm2.main([str(a) for a in args])
    err = capsys.readouterr().err
    # the run's opening announcement ("EDM2 none (2 steps): 4 of 4 images ...") and progress redraws aside
    return code, [line for line in re.split(r"[\r\n]", err)
                  if line.strip() and not line.startswith(("sampling:", "EDM2 "))]


def _pngs(folder: pathlib.Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _temps(folder: pathlib.Path) -> list:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    assert sample_edm2.main([*ARGS, "--outdir", str(out)]) == 0
    return _pngs(out)


def test_disk_full_is_one_line_and_resumable(tmp_path, capsys, monkeypatch, uninterrupted):
    real_open, opened = open, []

    def open_on_small_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            opened.append(path)
            if len(opened) > 3:  # three images fit, the fourth does not
                def full(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                f.write = full
        return f

    monkeypatch.setattr(W, "open", open_on_small_disk, raising=False)
    out = tmp_path / "out"
    code, lines = _run([*ARGS, "--outdir", out], capsys)
    assert code == 2
    assert len(lines) == 1 and re.fullmatch(
        rf"error: cannot write {re.escape(str(out))}/000000\d\.png: No space left on device \(errno 28\); "
        r"free space or choose another --outdir", lines[0]), lines
    done = _pngs(out)
    assert len(done) == 3 and all(uninterrupted[name] == data for name, data in done.items())
    assert _temps(out) == []
    monkeypatch.undo()  # space freed: the same command finishes the job
    assert _run([*ARGS, "--outdir", out], capsys)[0] == 0
    assert _pngs(out) == uninterrupted


def test_ctrl_c_is_one_line_exit_130_and_resumable(tmp_path, capsys, monkeypatch, uninterrupted):
    real_write, calls = W.ImageWriter.write, []

    def write_then_interrupt(self, seeds, images):
        calls.append(seeds)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second batch is being sampled
        return real_write(self, seeds, images)

    monkeypatch.setattr(W.ImageWriter, "write", write_then_interrupt)
    out = tmp_path / "out"
    code, lines = _run([*ARGS, "--outdir", out], capsys)
    assert (code, lines) == (130, ["interrupted; rerun the same command to resume"])
    done = _pngs(out)
    assert sorted(done) == [f"{s:07d}.png" for s in range(2)]  # the first batch was finished and kept
    assert all(uninterrupted[name] == data for name, data in done.items()) and _temps(out) == []
    monkeypatch.undo()
    assert _run([*ARGS, "--outdir", out], capsys)[0] == 0
    assert _pngs(out) == uninterrupted
