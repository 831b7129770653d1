"""utils.errors: every CLI reports a fixable error as one line (exit 2), Ctrl-C as one line (exit 130),
and a torchrun job prints a usage error once, naming the rank when only that rank failed."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from utils import errors
from utils.errors import INTERRUPTED_RESTART, OutputError, UsageError, describe_os_error, exit_on_usage_error

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _call(fn, capsys):
    """Run a decorated entry point; return (exit code, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        fn()
    return info.value.code, capsys.readouterr().err.splitlines()


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_usage_error_is_one_line_exit_2(capsys):
    @exit_on_usage_error
    def cli():
        raise UsageError("--steps must be >= 1,\n   got 0")

    assert _call(cli, capsys) == (2, ["error: --steps must be >= 1, got 0"])


def test_success_passes_the_value_through():
    assert exit_on_usage_error(lambda x: x + 1)(1) == 2


def test_disk_full_names_the_path_cause_and_fix(capsys):
    @exit_on_usage_error
    def cli():
        raise OutputError("/x/y.png", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "--outdir")

    code, lines = _call(cli, capsys)
    assert code == 2
    assert lines == [f"error: cannot write /x/y.png: {os.strerror(errno.ENOSPC)} (errno {errno.ENOSPC}); "
                     "free space or choose another --outdir"]


def test_bare_oserror_is_one_line_with_its_file(tmp_path, capsys):
    @exit_on_usage_error
    def cli():
        open(tmp_path / "missing" / "out.json", "w")

    code, lines = _call(cli, capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0] == f"error: {tmp_path / 'missing' / 'out.json'}: {os.strerror(errno.ENOENT)} (errno 2)"


@pytest.mark.parametrize("code,fix", [(errno.EACCES, "choose another --out you can write to"),
                                      (errno.EROFS, "choose another --out you can write to"),
                                      (errno.ENOTDIR, "in the way"), (errno.ENOENT, "; choose another --out")])
def test_output_error_fixes(code, fix):
    msg = str(OutputError("/r/o.csv", OSError(code, os.strerror(code)), "--out"))
    assert msg.startswith(f"cannot write /r/o.csv: {os.strerror(code)} (errno {code}); ")
    assert msg.endswith(fix) or fix in msg


def test_describe_os_error_names_both_paths():
    exc = OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b")
    assert describe_os_error(exc) == f"/a -> /b: {os.strerror(errno.EXDEV)} (errno {errno.EXDEV})"


def test_ctrl_c_is_one_line_exit_130(capsys):
    @exit_on_usage_error
    def cli():
        raise KeyboardInterrupt

    assert _call(cli, capsys) == (130, ["interrupted; rerun the same command to resume"])


def test_ctrl_c_of_a_command_that_cannot_resume_says_so(capsys, monkeypatch, tmp_path):
    """Training starts over on a rerun: its Ctrl-C line must not promise a resume."""
    from training import train_classifier

    def interrupted_training(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_classifier, "train_classifier", interrupted_training)
    cli = lambda: train_classifier.main(["--out", str(tmp_path / "c.safetensors")])  # noqa: E731
    assert _call(cli, capsys) == (130, [INTERRUPTED_RESTART])
    assert INTERRUPTED_RESTART == "interrupted; this command does not resume: rerun it to start over"
    assert not list(tmp_path.iterdir())


def test_ctrl_c_printed_by_rank_0_only(monkeypatch, capsys):
    @exit_on_usage_error
    def cli():
        raise KeyboardInterrupt

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _call(cli, capsys) == (130, [])


def test_bugs_keep_their_traceback():
    @exit_on_usage_error
    def cli():
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        cli()


def test_without_store_rank_0_prints_at_once(monkeypatch, capsys):
    """WORLD_SIZE > 1 but no torchrun store: rank 0 prints the plain line; another rank waits, then names itself."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    errors.report_once("x", wait_s=0)
    assert capsys.readouterr().err == "error: x\n"
    monkeypatch.setenv("RANK", "1")
    errors.report_once("x", wait_s=0)
    assert capsys.readouterr().err == "error: rank 1: x\n"


_JOB = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from utils import errors
    from utils.errors import UsageError, exit_on_usage_error
    errors.RANK_WAIT_S = 3.0

    @exit_on_usage_error
    def main(mode):
        rank = int(os.environ["RANK"])
        if mode == "all":
            time.sleep(0.5 * (1 - rank))  # rank 1 fails first; rank 0 still prints the line
            raise UsageError("--ref_path x.pkl: not found; pass a file that exists")
        if rank == 1:
            raise UsageError("--outdir /o is a file; choose a folder")
        time.sleep(60)  # rank 0 keeps working until torchrun stops it

    main(sys.argv[1])
""")


@pytest.mark.parametrize("mode", ["all", "rank1"])
def test_torchrun_prints_a_usage_error_once(mode, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_JOB.format(root=str(ROOT)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), mode], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    if mode == "all":
        assert ours == ["error: --ref_path x.pkl: not found; pass a file that exists"], r.stderr
    else:
        assert ours == ["error: rank 1: --outdir /o is a file; choose a folder"], r.stderr
    # What torchrun adds (documented in the README): its own report naming the exit code 2, and exit status 1.
    assert r.returncode == 1
    assert "ChildFailedError" in r.stderr and "exitcode  : 2" in r.stderr


_CLICK_JOB = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import click
    from utils.cli import run_command

    @click.command()
    @click.option("--batch", type=int, default=1)
    def cli(batch):
        print("ran", batch)

    sys.exit(run_command(cli, sys.argv[1:], "job.py"))
""")


@pytest.mark.parametrize("args, line", [(["--bogus", "1"], "error: No such option '--bogus'; see job.py --help"),
                                        (["--batch", "abc"], "error: Invalid value for '--batch': 'abc' is not a "
                                                             "valid integer; see job.py --help")])
def test_torchrun_prints_a_click_error_once(args, line, tmp_path):
    """click's own usage errors (an unknown flag, a bad value) are one line for the whole job, not one per rank."""
    script = tmp_path / "job.py"
    script.write_text(_CLICK_JOB.format(root=str(ROOT)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), *args], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    ours = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert ours == [line], r.stderr
    assert r.returncode == 1 and "exitcode  : 2" in r.stderr


def test_the_line_starts_after_an_open_progress_bar(capsys):
    from tqdm import tqdm

    @exit_on_usage_error
    def cli():
        bar = tqdm(total=4, desc="sampling", file=sys.stderr)
        bar.update(2)
        raise UsageError("disk full")

    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli()
    err = capsys.readouterr().err
    assert err.endswith("\nerror: disk full\n") and err.count("error:") == 1
