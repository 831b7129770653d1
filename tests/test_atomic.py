"""utils.atomic: a failed write leaves the old file and no temporary file behind; files get open()'s permissions."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from utils.atomic import atomic_path, check_output_dir, write_bytes_atomic, write_json_atomic, write_text_atomic
from utils.errors import OutputError


def test_success_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_json_atomic(target, {"x": 1})
    write_json_atomic(target, {"x": 2}, indent=2)
    assert json.loads(target.read_text()) == {"x": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.md"
    write_text_atomic(target, "finished table\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half a tab")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "finished table\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_suffix_for_format_sniffing_writers(tmp_path):
    import numpy as np

    target = tmp_path / "samples.npz"
    with atomic_path(target, suffix=".tmp.npz") as tmp:
        np.savez(tmp, arr_0=np.arange(3))  # np.savez would append .npz to a name without it
    assert np.load(target)["arr_0"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_get_what_open_would_give(tmp_path, umask):
    """0666 & ~umask like open() (mkstemp's 0600 hid metrics and references from colleagues)."""
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.csv", "x\n")
        with open(tmp_path / "plain.csv", "w") as f:
            f.write("x\n")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.csv") == _mode(tmp_path / "plain.csv") == 0o666 & ~umask


def test_replacing_keeps_the_old_mode(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"x": 1})
    os.chmod(target, 0o640)
    write_json_atomic(target, {"x": 2})
    assert _mode(target) == 0o640 and json.loads(target.read_text()) == {"x": 2}


def test_os_error_names_the_destination_and_cleans_up(tmp_path):
    target = tmp_path / "results.md"
    write_text_atomic(target, "finished table\n")
    with pytest.raises(OutputError) as info:
        with atomic_path(target, flag="--out") as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(info.value) == (f"cannot write {target}: {os.strerror(errno.ENOSPC)} (errno {errno.ENOSPC}); "
                               "free space or choose another --out")
    assert target.read_text() == "finished table\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=r"cannot write .*ro/x.json: Permission denied \(errno 13\)"):
            write_json_atomic(ro / "x.json", {})
    finally:
        ro.chmod(0o755)


def test_folder_under_a_file(tmp_path):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(OutputError, match=r"\(errno 20\); a file or folder of that name is in the way"):
        write_bytes_atomic(tmp_path / "f" / "sub" / "x.pkl", b"1")
    assert (tmp_path / "f").read_text() == "keep"


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_check_output_dir_proves_and_leaves_no_trace(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    assert check_output_dir(target, "--out") == target
    assert list(tmp_path.iterdir()) == []  # created to prove it, then removed
    (tmp_path / "file").write_text("keep")
    with pytest.raises(OutputError, match=r"cannot write .*file/x: .*\(errno 20\); .*--out"):
        check_output_dir(tmp_path / "file" / "x", "--out")
    with pytest.raises(OutputError, match=r"^cannot write /proc/swg-x/y: .*; choose another --out"):
        check_output_dir("/proc/swg-x/y", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    (tmp_path / "kept").mkdir()
    check_output_dir(tmp_path / "kept", "--out")
    assert (tmp_path / "kept").is_dir()
