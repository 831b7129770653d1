"""Inputs of ``python -m metrics``: every accepted PIL mode read as 8-bit RGB (16-bit PNGs scaled, not
clipped), references that record their resolution, and a bare command answered in one line."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from metrics import api, detectors
from metrics.cli import main as cli
from metrics.images import ACCEPTED_MODES, open_images
from tests.tiny_detectors import TinyInception
from utils.errors import UsageError

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tiny_detectors(monkeypatch):
    monkeypatch.setitem(detectors.LOADERS, "inception", lambda device, **kw: TinyInception(dim=16, seed=2))
    detectors.clear_cache()
    yield
    detectors.clear_cache()


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (grey [H, W] or RGB [H, W, 3] uint16), so no PIL conversion is involved."""
    h, w = pixels.shape[:2]
    colour = 0 if pixels.ndim == 2 else 2
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def decoded(tmp_path, data: bytes, name="x.png") -> np.ndarray:
    folder = tmp_path / name.replace(".", "_")
    folder.mkdir()
    (folder / name).write_bytes(data)
    return open_images(folder).load(0)


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (6, 5), dtype=np.uint16)
    rgb8 = rng.integers(0, 256, (6, 5, 3), dtype=np.uint16)
    # 16-bit value v * 256 + low: read as its high byte v (as PIL reads 16-bit RGB), whatever the low byte
    low = rng.integers(0, 256, (6, 5), dtype=np.uint16)
    got = decoded(tmp_path, png16(grey8 * 256 + low), "grey.png")
    np.testing.assert_array_equal(got, np.repeat(grey8[:, :, None], 3, axis=2).astype(np.uint8))
    got = decoded(tmp_path, png16(rgb8 * 256 + low[:, :, None]), "rgb.png")
    np.testing.assert_array_equal(got, rgb8.astype(np.uint8))
    # the FD of 16-bit images equals that of their 8-bit originals
    imgs = rng.integers(0, 256, (8, 16, 16), dtype=np.uint16)
    for bits, folder in ((8, tmp_path / "eight"), (16, tmp_path / "sixteen")):
        folder.mkdir()
        for i, a in enumerate(imgs):
            if bits == 8:
                PIL.Image.fromarray(a.astype(np.uint8), "L").save(folder / f"{i}.png")
            else:
                (folder / f"{i}.png").write_bytes(png16(a * 257))
    s8 = api.compute_stats(tmp_path / "eight", ["inception"], progress=False)
    s16 = api.compute_stats(tmp_path / "sixteen", ["inception"], progress=False)
    np.testing.assert_array_equal(s8["fid"]["mu"], s16["fid"]["mu"])


def _expected_rgb(mode: str, img: PIL.Image.Image) -> np.ndarray:
    """What each accepted mode should read as, computed without PIL's convert()."""
    a = np.asarray(img)
    if mode == "1":
        g = a.astype(np.uint8) * 255
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "L":
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode == "LA":
        return np.repeat(a[:, :, :1], 3, axis=2)
    if mode in ("P", "PA"):
        palette = np.frombuffer(img.getpalette()[:768] and bytes(img.getpalette()[:768]), np.uint8).reshape(-1, 3)
        index = a if mode == "P" else a[:, :, 0]
        return palette[index]
    if mode in ("RGB", "RGBA", "RGBX"):
        return a[:, :, :3]
    if mode == "CMYK":  # K = 0 here: R = 255 - C
        return 255 - a[:, :, :3]
    if mode == "YCbCr":  # Cb = Cr = 128 here: grey Y
        return np.repeat(a[:, :, :1], 3, axis=2)
    # 16-bit grey and PIL's 32-bit integers: the high byte of the (clipped) 16-bit value
    return np.repeat((np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)[:, :, None], 3, axis=2)


@pytest.mark.parametrize("mode", ACCEPTED_MODES)
def test_every_accepted_mode_reads_as_8_bit_rgb(mode):
    from metrics.images import to_rgb_array

    rng = np.random.default_rng(len(mode))
    h, w = 4, 5
    if mode == "1":
        img = PIL.Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    elif mode in ("P", "PA"):
        img = PIL.Image.new(mode, (w, h))
        img.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
        idx = rng.integers(0, 256, (h, w), dtype=np.uint8)
        if mode == "P":
            img.putdata(idx.reshape(-1).tolist())
        else:
            img.putdata([(int(i), 200) for i in idx.reshape(-1)])
    elif mode == "CMYK":
        c = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        c[:, :, 3] = 0
        img = PIL.Image.fromarray(c, "CMYK")
    elif mode == "YCbCr":
        y = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        y[:, :, 1:] = 128
        img = PIL.Image.fromarray(y, "YCbCr")
    elif mode in ("L", "LA", "RGB", "RGBA", "RGBX"):
        img = PIL.Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8).squeeze(), mode)
    elif mode == "I":
        img = PIL.Image.fromarray(rng.integers(-1000, 70000, (h, w)).astype(np.int32), "I")
    else:  # I;16 variants: little-, big-endian, native
        order = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}[mode]
        img = PIL.Image.frombytes(mode, (w, h), rng.integers(0, 65536, (h, w)).astype(order).tobytes())
    assert img.mode == mode
    got = to_rgb_array(img, "x")
    assert got.dtype == np.uint8 and got.shape == (h, w, 3)
    np.testing.assert_array_equal(got, _expected_rgb(mode, img))


def test_other_modes_are_refused_in_one_line():
    from metrics.images import to_rgb_array

    with pytest.raises(UsageError, match=r"image x\.tif has PIL mode 'F'.*convert it to 8-bit RGB"):
        to_rgb_array(PIL.Image.new("F", (2, 2)), "x.tif")


def test_references_record_their_resolution_and_a_mismatch_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    for size, name in ((32, "big"), (16, "small")):
        (tmp_path / name).mkdir()
        for i in range(6):
            PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    res = CliRunner().invoke(cli, ["ref", "--images", str(tmp_path / "big"), "--dest", str(tmp_path / "big.pkl"),
                                   "--metrics", "fid"])
    assert res.exit_code == 0, res.stderr
    with open(tmp_path / "big.pkl", "rb") as f:
        assert pickle.load(f)["resolution"] == [32, 32]
    res = CliRunner().invoke(cli, ["calc", str(tmp_path / "small"), "--ref", str(tmp_path / "big.pkl"),
                                   "--metrics", "fid"])
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert "was made from 32x32 images but these images are 16x16" in lines[0]
    # same resolution: fine; a reference without a recorded resolution (EDM2's pickles): not checked
    assert api.calc_metrics(tmp_path / "big", "fid", ref_path=tmp_path / "big.pkl", progress=False)["fid"] < 1e-6
    with open(tmp_path / "big.pkl", "rb") as f:
        ref = pickle.load(f)
    del ref["resolution"]
    assert api.calc_metrics(tmp_path / "small", "fid", ref=ref, progress=False)["fid"] > 0
    # statistics (a --save_stats file) are checked too
    stats = api.compute_stats(tmp_path / "small", ["inception"], progress=False)
    with pytest.raises(UsageError, match="32x32 images but the scored images are 16x16"):
        api.calc_metrics_from_stats(stats, {**ref, "resolution": [32, 32]}, ["fid"])


def test_bare_commands_answer_in_one_line(tmp_path):
    for args in (["calc"], []):
        res = subprocess.run([sys.executable, "-m", "metrics", *args], capture_output=True, text=True,
                             cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        assert res.returncode == 2 and not res.stdout and len(lines) == 1, res.stderr
        assert lines[0].startswith("error: no ") and "python -m metrics calc" in lines[0], lines[0]
