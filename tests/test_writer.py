"""sampling.writer: layouts, atomic publication, resume listing, background encoding."""

from __future__ import annotations

import errno
import io
import os
import tarfile
import threading
import time

import numpy as np
import PIL.Image
import pytest
import torch

from sampling import writer as W


def _images(seeds, size=8, channels=3):
    """Deterministic distinct images per seed (so a file's content identifies its seed)."""
    out = np.zeros((len(seeds), size, size, channels), np.uint8)
    for i, s in enumerate(seeds):
        out[i] = np.random.default_rng(s).integers(0, 256, (size, size, channels), dtype=np.uint8)
    return out


def _read_png(data_or_path):
    if isinstance(data_or_path, bytes):
        data_or_path = io.BytesIO(data_or_path)
    return np.asarray(PIL.Image.open(data_or_path))


def test_png_paths():
    assert W.png_relpath(7) == "0000007.png"
    assert W.png_relpath(12345, subdirs=True) == "012000/0012345.png"
    assert W.png_relpath(999, subdirs=True) == "000000/0000999.png"


@pytest.mark.parametrize("subdirs", [False, True])
def test_png_roundtrip_and_done(tmp_path, subdirs):
    seeds = [0, 5, 999, 1000, 2500]
    with W.ImageWriter(tmp_path, subdirs=subdirs) as w:
        w.write(seeds[:2], _images(seeds[:2]))
        # torch NCHW input is accepted too
        w.write(seeds[2:], torch.from_numpy(_images(seeds[2:])).permute(0, 3, 1, 2))
    for s, img in zip(seeds, _images(seeds)):
        path = tmp_path / W.png_relpath(s, subdirs)
        assert path.is_file()
        np.testing.assert_array_equal(_read_png(path), img)
    assert W.done_seeds(tmp_path) == set(seeds)
    assert sorted(w.written) == seeds
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    if subdirs:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["000000", "001000", "002000"]


def test_grayscale(tmp_path):
    with W.ImageWriter(tmp_path) as w:
        w.write([3], _images([3], channels=1))
    np.testing.assert_array_equal(_read_png(tmp_path / "0000003.png"), _images([3], channels=1)[0, :, :, 0])


def test_never_overwrites(tmp_path):
    (tmp_path / "0000001.png").write_bytes(b"finished earlier")
    with W.ImageWriter(tmp_path) as w:
        w.write([1, 2], _images([1, 2]))
    assert (tmp_path / "0000001.png").read_bytes() == b"finished earlier"
    assert w.written == [2]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_tar_shards(tmp_path):
    seeds = list(range(10, 17))
    with W.ImageWriter(tmp_path, tar=True, shard_size=3) as w:
        for i in range(0, len(seeds), 2):
            w.write(seeds[i:i + 2], _images(seeds[i:i + 2]))
    shards = sorted(p.name for p in tmp_path.iterdir())
    assert shards == ["0000010-0000012.tar", "0000013-0000015.tar", "0000016-0000016.tar"]
    got = {}
    for name in shards:
        with tarfile.open(tmp_path / name) as tar:
            for m in tar.getmembers():
                got[m.name] = _read_png(tar.extractfile(m).read())
    assert sorted(got) == [f"{s:07d}.png" for s in seeds]
    for s, img in zip(seeds, _images(seeds)):
        np.testing.assert_array_equal(got[f"{s:07d}.png"], img)
    assert W.done_seeds(tmp_path) == set(seeds)


def test_unfinished_shard_invisible_until_done(tmp_path):
    w = W.ImageWriter(tmp_path, tar=True, shard_size=100)
    w.write([1, 2], _images([1, 2]))
    deadline = time.time() + 10
    while not any(tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.01)
    names = [p.name for p in tmp_path.iterdir()]
    assert names and all(n.startswith(".") and ".tmp" in n for n in names)  # only a hidden temp file
    assert W.done_seeds(tmp_path) == set()
    w.close()
    assert [p.name for p in tmp_path.iterdir()] == ["0000001-0000002.tar"]
    assert W.done_seeds(tmp_path) == {1, 2}


def test_shard_name_collision_gets_suffix(tmp_path):
    for _ in range(2):
        with W.ImageWriter(tmp_path, tar=True) as w:
            w.write([4, 5], _images([4, 5]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000004-0000005-1.tar", "0000004-0000005.tar"]


def test_done_ignores_temps_and_junk_and_stale_cleanup(tmp_path):
    (tmp_path / ".0000004.png.tmp123").write_bytes(b"half")
    (tmp_path / ".shard-1.tar.tmp99").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "0000009-0000010.tar").write_bytes(b"not a tar")  # damaged: not done, not an error
    (tmp_path / "001000").mkdir()
    (tmp_path / "001000" / "0001001.png").write_bytes(W._encode_png(_images([1001])[0]))
    (tmp_path / "001000" / ".0001002.png.tmp7").write_bytes(b"half")
    assert W.done_seeds(tmp_path) == {1001}
    assert W.done_seeds(tmp_path / "missing") == set()
    assert W.remove_stale_temps(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["0000009-0000010.tar", "0001001.png", "001000",
                                                           "notes.txt"]


def test_mixed_layouts_resume(tmp_path):
    with W.ImageWriter(tmp_path) as w:
        w.write([0, 1], _images([0, 1]))
    with W.ImageWriter(tmp_path, tar=True) as w:
        w.write([2, 3], _images([2, 3]))
    done = W.done_seeds(tmp_path)
    assert done == {0, 1, 2, 3}
    assert W.iter_pending(range(6), done) == [4, 5]


def test_background_does_not_block_producer(tmp_path, monkeypatch):
    gate = threading.Event()
    real = W._encode_png

    def slow_encode(img):
        gate.wait(10)
        return real(img)

    monkeypatch.setattr(W, "_encode_png", slow_encode)
    w = W.ImageWriter(tmp_path, max_pending=4)
    t0 = time.perf_counter()
    for s in range(3):
        w.write([s], _images([s]))
    assert time.perf_counter() - t0 < 2.0  # returned while encoding is still held back
    assert W.done_seeds(tmp_path) == set()
    gate.set()
    w.close()
    assert W.done_seeds(tmp_path) == {0, 1, 2}


def test_background_error_surfaces(tmp_path, monkeypatch):
    def boom(img):
        raise OSError("disk full")

    monkeypatch.setattr(W, "_encode_png", boom)
    w = W.ImageWriter(tmp_path)
    w.write([0], _images([0]))
    with pytest.raises(RuntimeError, match="disk full"):
        w.close()
    with pytest.raises(ValueError):
        W.ImageWriter(tmp_path).write([0, 1], _images([0]))


def test_concurrent_shards_with_same_pid_and_thread_id(tmp_path, monkeypatch):
    """Ranks on different nodes can share a PID (containers) and a thread id; their shards must not mix."""
    import types

    monkeypatch.setattr(W, "threading", types.SimpleNamespace(Thread=threading.Thread, get_ident=lambda: 1))
    writers = [W.ImageWriter(tmp_path, tar=True, shard_size=100) for _ in range(2)]
    writers[0].write([1, 2], _images([1, 2]))
    writers[1].write([3, 4], _images([3, 4]))
    deadline = time.time() + 10
    while any(w._shard is None for w in writers) and time.time() < deadline:
        time.sleep(0.01)  # both shards open at once, as two ranks writing side by side
    for w in writers:
        w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000001-0000002.tar", "0000003-0000004.tar"]
    for name, seeds in (("0000001-0000002.tar", [1, 2]), ("0000003-0000004.tar", [3, 4])):
        with tarfile.open(tmp_path / name) as tar:
            assert tar.getnames() == [f"{s:07d}.png" for s in seeds]
            for s, img in zip(seeds, _images(seeds)):
                np.testing.assert_array_equal(_read_png(tar.extractfile(f"{s:07d}.png").read()), img)


class _FullDisk:
    """Stands in for a disk with ``free`` bytes left: writes past that raise ENOSPC, as the kernel would."""

    def __init__(self, free: int):
        self.free = free

    def open(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode and "a" not in mode and "+" not in mode:
            return f
        disk, real_write = self, f.write

        def write(data):
            if len(data) > disk.free:
                real_write(data[: disk.free])  # a partial write first, as on a real disk
                disk.free = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            disk.free -= len(data)
            return real_write(data)

        f.write = write
        return f


def _listing(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize("subdirs", [False, True])
def test_disk_full_png_keeps_finished_files_and_removes_temps(tmp_path, monkeypatch, subdirs):
    seeds = list(range(6))
    png_sizes = [len(W._encode_png(img)) for img in _images(seeds)]
    disk = _FullDisk(sum(png_sizes[:3]) + png_sizes[3] // 2)  # room for three and a half images
    monkeypatch.setattr(W, "open", disk.open, raising=False)
    w = W.ImageWriter(tmp_path, subdirs=subdirs)
    w.write(seeds, _images(seeds))
    with pytest.raises(W.OutputError) as info:
        w.close()
    msg = str(info.value)
    done = W.done_seeds(tmp_path)  # PNGs are written by several threads: which three fit may vary
    assert len(done) == 3 and sorted(w.written) == sorted(done)
    failed = [s for s in seeds if str(tmp_path / W.png_relpath(s, subdirs)) in msg]
    assert len(failed) == 1 and failed[0] not in done
    assert msg.endswith(f": {os.strerror(errno.ENOSPC)} (errno {errno.ENOSPC}); free space or choose another "
                        "--outdir") and msg.startswith("cannot write ")
    for s, img in zip(seeds, _images(seeds)):
        if s in done:
            np.testing.assert_array_equal(_read_png(tmp_path / W.png_relpath(s, subdirs)), img)
    assert not [p for p in _listing(tmp_path) if ".tmp" in p]


def test_disk_full_tar_keeps_finished_shards_and_removes_temps(tmp_path, monkeypatch):
    seeds = list(range(6))
    with W.ImageWriter(tmp_path / "probe", tar=True, shard_size=2) as w:
        w.write(seeds[:2], _images(seeds[:2]))
    shard_bytes = (tmp_path / "probe" / "0000000-0000001.tar").stat().st_size
    disk = _FullDisk(2 * shard_bytes + 100)  # two shards fit, the third does not
    monkeypatch.setattr(tarfile, "bltn_open", disk.open)
    out = tmp_path / "out"
    w = W.ImageWriter(out, tar=True, shard_size=2)
    w.write(seeds, _images(seeds))
    with pytest.raises(W.OutputError, match=r"No space left on device \(errno 28\); free space"):
        w.close()
    assert _listing(out) == ["0000000-0000001.tar", "0000002-0000003.tar"]
    assert W.done_seeds(out) == {0, 1, 2, 3}


def test_unwritable_outdir_is_one_output_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    with pytest.raises(W.OutputError, match=r"cannot write .*file/out: .*\(errno 20\); a file or folder"):
        W.ImageWriter(blocker / "out")
    assert blocker.read_text() == "keep"


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("tar", [False, True])
def test_files_get_umask_permissions(tmp_path, umask, tar):
    old = os.umask(umask)
    try:
        with W.ImageWriter(tmp_path, tar=tar) as w:
            w.write([0, 1], _images([0, 1]))
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in files)


# ----------------------------------------------------------------------------
# Damaged finished images: found without decoding, set aside, named in read errors.

def _published(tmp_path, subdirs=False, tar=False, seeds=range(6), shard_size=3):
    with W.ImageWriter(tmp_path, subdirs=subdirs, tar=tar, shard_size=shard_size) as w:
        w.write(list(seeds), _images(list(seeds)))
    return tmp_path


@pytest.mark.parametrize("damage", ["truncated", "empty", "tail", "head"])
@pytest.mark.parametrize("subdirs", [False, True])
def test_damaged_png_is_not_done_and_is_set_aside(tmp_path, damage, subdirs):
    out = _published(tmp_path, subdirs=subdirs)
    bad = out / W.png_relpath(4, subdirs)
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "tail": data[:-1],
                     "head": b"\x00" + data[1:]}[damage])
    assert W.done_seeds(out) == {0, 1, 2, 3, 5}
    assert W.done_seeds(out, verify=False) == set(range(6))  # the listing alone trusts names
    kept = bad.read_bytes()
    assert W.set_aside_damaged(out) == [str(bad)]
    assert not bad.exists() and (out / (W.png_relpath(4, subdirs) + ".damaged")).read_bytes() == kept
    assert W.done_seeds(out) == {0, 1, 2, 3, 5} and W.set_aside_damaged(out) == []
    with W.ImageWriter(out, subdirs=subdirs) as w:  # the resumed run writes the seed again
        w.write([4], _images([4]))
    np.testing.assert_array_equal(_read_png(bad), _images([4])[0])
    assert W.done_seeds(out) == set(range(6))


def _member_ranges(shard):
    with tarfile.open(shard) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers()]


@pytest.mark.parametrize("damage", ["cut_in_member", "cut_in_header", "zeroed_tail", "empty"])
def test_damaged_shard_is_not_done_and_is_set_aside(tmp_path, damage):
    out = _published(tmp_path, tar=True)
    shard = out / "0000003-0000005.tar"
    data = bytearray(shard.read_bytes())
    (_, off0, _), (_, off1, size1), _ = _member_ranges(shard)
    if damage == "cut_in_member":
        data = data[: off1 + size1 // 2]
    elif damage == "cut_in_header":
        data = data[: off1 - 300]
    elif damage == "zeroed_tail":  # size right, data lost (a sparse copy of a file being written)
        data[off1 + size1 - 12: off1 + size1] = bytes(12)
    else:
        data = b""
    shard.write_bytes(bytes(data))
    assert W.done_seeds(out) == {0, 1, 2}
    assert W.scan_tar(out / "0000000-0000002.tar") == ({s: f"{s:07d}.png" for s in (0, 1, 2)}, True)
    members, intact = W.scan_tar(shard)
    assert not intact and set(members) <= {3}
    index = W.ImageIndex(out)  # reads the intact members, never the damaged shard
    np.testing.assert_array_equal(index.read([0, 2]), _images([0, 2])[..., :3])
    index.close()
    assert W.set_aside_damaged(out) == [str(shard)]
    assert sorted(p.name for p in out.iterdir()) == ["0000000-0000002.tar", "0000003-0000005.tar.damaged"]
    with W.ImageWriter(out, tar=True, shard_size=3) as w:
        w.write([3, 4, 5], _images([3, 4, 5]))
    assert W.done_seeds(out) == set(range(6))
    index = W.ImageIndex(out)
    np.testing.assert_array_equal(index.read(range(6)), _images(range(6)))
    index.close()


def test_a_seed_twice_in_one_shard_is_damage(tmp_path):
    png = W._encode_png(_images([7])[0])
    with tarfile.open(tmp_path / "0000007-0000007.tar", "w") as tar:
        for _ in range(2):
            info = tarfile.TarInfo("0000007.png")
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
    assert W.done_seeds(tmp_path) == set()


def test_read_errors_name_the_file(tmp_path):
    out = _published(tmp_path, seeds=[0, 1])
    bad = out / "0000001.png"
    data = bad.read_bytes()
    # Signature and end marker intact, the middle garbled: passes the cheap check, fails to decode.
    bad.write_bytes(data[:20] + bytes(len(data) - 32) + data[-12:])
    assert W.done_seeds(out) == {0, 1}
    index = W.ImageIndex(out)
    with pytest.raises(W.UsageError, match=r"cannot read image .*0000001\.png: .*draw seed 1 again"):
        index.read([0, 1])
    index.close()
