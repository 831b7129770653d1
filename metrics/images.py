"""Image sources for the metrics: PNG/JPEG folders, tar shards, zip files, ADM ``.npz``.

Every source lists its images in a fixed order (sorted names; npz row order)
and decodes image ``i`` to an ``H x W x 3`` uint8 RGB array.  Folders are
searched recursively, so the per-1000 subfolders and the tar shards that the
samplers write are both read.  Decoding runs in a small thread pool; any
unreadable file stops the run with a one-line :class:`UsageError` naming it.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import pathlib
import tarfile
import threading
import zipfile
from typing import Iterator, List, Optional, Sequence

import numpy as np
import PIL.Image
import torch

from utils.errors import UsageError

__all__ = [
    "IMAGE_EXTS",
    "ACCEPTED_MODES",
    "to_rgb_array",
    "ImageSource",
    "open_images",
    "select_indices",
    "iterate_batches",
    "is_image_source",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


# PIL modes read as 8-bit colour (alpha dropped, palettes looked up, CMYK/YCbCr converted by PIL)
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
# PIL modes of 16-bit grey PNGs (and PIL's 32-bit integer mode, which older Pillow gives them)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ACCEPTED_MODES = EIGHT_BIT_MODES + SIXTEEN_BIT_MODES


def to_rgb_array(img: PIL.Image.Image, name: str = "image") -> np.ndarray:
    """HWC uint8 RGB of a decoded image.

    16-bit grey (``I;16*``, ``I``) keeps its high byte, ``v >> 8`` (values clipped to
    [0, 65535] first), as PIL itself reduces 16-bit RGB PNGs; ``convert("RGB")`` would clip
    every value above 255 to white instead.  Other modes than :data:`ACCEPTED_MODES` are refused.
    """
    if img.mode in SIXTEEN_BIT_MODES:
        grey = (np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode not in EIGHT_BIT_MODES:
        raise UsageError(f"image {name} has PIL mode {img.mode!r}, which is not read as 8-bit RGB "
                         f"(accepted: {', '.join(ACCEPTED_MODES)}); convert it to 8-bit RGB PNG")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb_array(img, name)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot decode image {name} ({type(exc).__name__}: {exc}); "
                         f"delete or regenerate it, or use other images") from exc


class ImageSource:
    """A fixed, ordered list of images; ``load(i)`` returns HWC uint8 RGB."""

    def __init__(self, description: str):
        self.description = description
        self.names: List[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> np.ndarray:
        return _decode(self.read_bytes(index), self.names[index])

    def read_bytes(self, index: int) -> bytes:
        raise TypeError(f"{type(self).__name__} has no byte access")


class _TarMembers:
    """Image members of one tar file, read under a lock (tarfile is not thread safe)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.lock = threading.Lock()
        try:
            self.tar = tarfile.open(path, "r:*")
            self.members = sorted((m for m in self.tar.getmembers() if m.isfile() and _is_image_name(m.name)),
                                  key=lambda m: m.name)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UsageError(f"cannot read tar file {path} ({exc}); delete or regenerate it") from exc

    def read(self, member) -> bytes:
        with self.lock:
            f = self.tar.extractfile(member)
            return f.read()


class FolderSource(ImageSource):
    """Images under a folder (recursive), including the images inside ``*.tar`` shards there."""

    def __init__(self, root: pathlib.Path):
        super().__init__(f"folder {root}")
        entries = []  # (name, kind, payload)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                if fn.startswith("."):  # hidden / in-progress temp files
                    continue
                full = pathlib.Path(dirpath) / fn
                rel = full.relative_to(root).as_posix()
                if _is_image_name(fn):
                    entries.append((rel, "file", full))
                elif fn.lower().endswith(TAR_EXTS):
                    shard = _TarMembers(full)
                    for m in shard.members:
                        entries.append((f"{rel}/{m.name}", "tar", (shard, m)))
        entries.sort(key=lambda e: e[0])
        self.names = [e[0] for e in entries]
        self._entries = entries
        self.root = root

    def read_bytes(self, index):
        name, kind, payload = self._entries[index]
        if kind == "file":
            try:
                return payload.read_bytes()
            except OSError as exc:
                raise UsageError(f"cannot read image {payload} ({exc})") from exc
        shard, member = payload
        return shard.read(member)


class TarSource(ImageSource):
    def __init__(self, path: pathlib.Path):
        super().__init__(f"tar file {path}")
        self.shard = _TarMembers(path)
        self.names = [f"{path.name}/{m.name}" for m in self.shard.members]

    def read_bytes(self, index):
        return self.shard.read(self.shard.members[index])


class ZipSource(ImageSource):
    def __init__(self, path: pathlib.Path):
        super().__init__(f"zip file {path}")
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UsageError(f"cannot read zip file {path} ({exc}); delete or regenerate it") from exc
        self.lock = threading.Lock()
        self.members = sorted(n for n in self.zip.namelist() if _is_image_name(n))
        self.names = [f"{path.name}/{n}" for n in self.members]

    def read_bytes(self, index):
        with self.lock:
            return self.zip.read(self.members[index])


def _npz_array(path: pathlib.Path, key: str = "arr_0") -> np.ndarray:
    """``key`` of an .npz, memory-mapped when stored uncompressed (ADM's 50k-image files are large)."""
    member = key + ".npy"
    with zipfile.ZipFile(path) as zf:
        if member not in zf.namelist():
            raise UsageError(f"{path}: no '{key}' array (found {zf.namelist()}); an ADM sample file stores images in arr_0")
        info = zf.getinfo(member)
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                start = info.header_offset + 30 + name_len + extra_len
                f.seek(start)
                version = np.lib.format.read_magic(f)
                header = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                shape, fortran, dtype = header(f) if header else ((), True, None)
                offset = f.tell()
            if header and not fortran and not dtype.hasobject:
                return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)
        with zf.open(member) as f:
            return np.lib.format.read_array(f, allow_pickle=False)


class NpzSource(ImageSource):
    """ADM-style ``.npz``: ``arr_0`` of shape [N, H, W, 3] uint8."""

    def __init__(self, path: pathlib.Path):
        super().__init__(f"npz file {path}")
        try:
            arr = _npz_array(path)
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise UsageError(f"cannot read {path} ({exc}); expected an ADM sample .npz with arr_0") from exc
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.dtype != np.uint8:
            raise UsageError(f"{path}: arr_0 has shape {arr.shape} and dtype {arr.dtype}; expected uint8 [N, H, W, 3]")
        self.arr = arr
        self.names = [f"{path.name}[{i}]" for i in range(arr.shape[0])]

    def load(self, index):
        x = np.asarray(self.arr[index])
        return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def is_image_source(path: str | os.PathLike) -> bool:
    """True for a folder, zip, tar or an .npz of images only (an ADM sample batch).

    An .npz that also holds ``mu``/``sigma`` is an ADM *reference* batch: statistics
    of the whole dataset plus a subset of images, read by :func:`metrics.refs.load_ref`.
    """
    p = pathlib.Path(path)
    name = p.name.lower()
    if p.is_dir() or name.endswith(".zip") or name.endswith(TAR_EXTS):
        return True
    if name.endswith(".npz") and p.is_file():
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
                return "arr_0.npy" in names and "mu.npy" not in names
        except zipfile.BadZipFile:
            return False
    return False


def open_images(path: str | os.PathLike) -> ImageSource:
    """Open a folder, ``.zip``, ``.tar``/``.tar.gz`` or ADM ``.npz`` of images."""
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"images not found: {p}; give an existing folder, .zip, .tar or .npz of images")
    name = p.name.lower()
    if p.is_dir():
        src: ImageSource = FolderSource(p)
    elif name.endswith(".zip"):
        src = ZipSource(p)
    elif name.endswith(TAR_EXTS):
        src = TarSource(p)
    elif name.endswith(".npz"):
        src = NpzSource(p)
    else:
        raise UsageError(f"unsupported image source {p}; use a folder of PNG/JPEG files, a .zip, a .tar or an ADM .npz")
    if len(src) == 0:
        raise UsageError(f"no images found in {src.description}; expected {', '.join(IMAGE_EXTS)} files")
    return src


def select_indices(total: int, num: Optional[int], seed: int = 0, what: str = "images") -> np.ndarray:
    """All indices, or ``num`` of them drawn without replacement with ``seed`` (sorted)."""
    if num is None:
        return np.arange(total)
    if num < 2:
        raise UsageError(f"--num must be at least 2, got {num}")
    if num > total:
        raise UsageError(f"asked for {num} {what} but only {total} were found; lower --num or generate more")
    if num == total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=num, replace=False))


def _stack(arrays: Sequence[np.ndarray], names: Sequence[str]) -> torch.Tensor:
    shape = arrays[0].shape
    for a, n in zip(arrays, names):
        if a.shape != shape:
            raise UsageError(f"image {n} has size {a.shape[1]}x{a.shape[0]} but {names[0]} has "
                             f"{shape[1]}x{shape[0]}; all images must have the same size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def iterate_batches(source: ImageSource, indices: Sequence[int], batch: int = 64,
                    num_threads: int = 8) -> Iterator[torch.Tensor]:
    """Yield uint8 NCHW batches of ``source[indices]``, decoding the next batch while one is used."""
    indices = [int(i) for i in indices]
    chunks = [indices[i:i + batch] for i in range(0, len(indices), batch)]
    if not chunks:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        def submit(chunk):
            return [pool.submit(source.load, i) for i in chunk]

        pending = submit(chunks[0])
        for k, chunk in enumerate(chunks):
            current = pending
            if k + 1 < len(chunks):
                pending = submit(chunks[k + 1])
            arrays = [f.result() for f in current]
            yield _stack(arrays, [source.names[i] for i in chunk])
