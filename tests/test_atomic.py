"""utils.atomic: a failed write leaves the old file and no temporary file behind."""

from __future__ import annotations

import json

import pytest

from utils.atomic import atomic_path, write_json_atomic, write_text_atomic


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
