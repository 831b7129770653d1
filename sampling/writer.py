"""Crash-safe image output shared by the samplers.

Two layouts:

* PNG per seed: ``outdir/{seed:07d}.png``, or with ``subdirs=True``
  ``outdir/{seed - seed % 1000:06d}/{seed:07d}.png`` (the per-1000 folders of
  EDM2's ``generate_images.py``);
* tar shards: ``outdir/{first:07d}-{last:07d}.tar`` holding ``{seed:07d}.png``
  members, at most ``shard_size`` images per shard.

Every file is written under a hidden temporary name (``.<name>.tmp<pid>``) and
moved to its final name only when complete, so a killed run never leaves a
truncated PNG or a half-written shard under a final name.  Final names are
never overwritten; files get the permissions ``open()`` would give (umask).
An :class:`OSError` while writing (disk full, folder not writable) stops the
writer with an :class:`utils.errors.OutputError` naming the file; the images
already published stay intact and the temporary files are removed.
:func:`done_seeds` lists the seeds already finished, so a
rerun can produce only the missing ones.

Damaged outputs (a file truncated or emptied after it was published: a copy
cut short, a quota hit by ``rsync``, a broken disk) are found cheaply, without
decoding: a PNG must start with the PNG signature and end with the ``IEND``
chunk (12 bytes read at each end), a tar member's data must lie inside its shard
and end with ``IEND`` too.  :func:`done_seeds` counts only intact images;
:func:`set_aside_damaged` renames damaged files to ``<name>.damaged`` (never
deleted, never read again) so that a resumed run draws those seeds again.
:class:`ImageIndex` names the file (and tar member) in any read error.

PNG encoding and file writing run in background threads so the sampler keeps
the accelerator busy; :meth:`ImageWriter.write` only copies the batch to host
memory and enqueues it (blocking when ``max_pending`` batches are waiting).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import pathlib
import queue
import re
import tarfile
import threading
from typing import Iterable, Optional, Sequence

import numpy as np
import PIL.Image

from utils.atomic import create_temp
from utils.errors import OutputError, UsageError

__all__ = ["png_relpath", "done_seeds", "scan_outputs", "set_aside_damaged", "finished_seeds", "remove_stale_temps", "ImageWriter",
           "ImageIndex", "DAMAGED_SUFFIX"]

_PNG_RE = re.compile(r"^(\d+)\.png$")
_TAR_RE = re.compile(r"^\d+-\d+(-\d+)?\.tar$")
_TMP_RE = re.compile(r"^\..*\.tmp\d+$")
_SUBDIR_RE = re.compile(r"^\d{6}$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC; every PNG ends with it
DAMAGED_SUFFIX = ".damaged"


def png_relpath(seed: int, subdirs: bool = False) -> str:
    """Relative path of the PNG of ``seed``."""
    name = f"{seed:07d}.png"
    return f"{seed - seed % 1000:06d}/{name}" if subdirs else name


def _tmp_name(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _publish(tmp: pathlib.Path, final: pathlib.Path) -> bool:
    """Move a finished temporary file to ``final`` without ever replacing an existing file.

    Returns False (and drops ``tmp``) when ``final`` already exists.
    """
    try:
        os.link(tmp, final)  # atomic and refuses to clobber
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        return False
    except OSError:  # file systems without hard links
        if final.exists():
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, final)
        return True
    tmp.unlink()
    return True


def _png_intact(f, offset: int, size: int) -> bool:
    """Whether ``size`` bytes at ``offset`` of the open file ``f`` start and end like a complete PNG."""
    if size < len(PNG_SIGNATURE) + len(PNG_END):
        return False
    f.seek(offset)
    if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
        return False
    f.seek(offset + size - len(PNG_END))
    return f.read(len(PNG_END)) == PNG_END


def png_intact(path: os.PathLike | str) -> bool:
    """Cheap check of a published PNG (signature and end marker; nothing decoded)."""
    try:
        with open(path, "rb") as f:
            return _png_intact(f, 0, os.fstat(f.fileno()).st_size)
    except OSError:
        return False


def scan_tar(path: os.PathLike | str) -> tuple[dict, bool]:
    """``({seed: member name}, intact)`` of a shard: its complete PNG members, and whether nothing is damaged.

    Reads the member headers, 20 bytes per member and the end-of-archive blocks.
    A member whose data runs past the end of the file or does not start and end
    like a PNG, an unreadable header, a missing end-of-archive marker or a seed
    stored twice make the shard damaged; the members before the damage are
    still listed.
    """
    found: dict[int, str] = {}
    try:
        with open(path, "rb") as raw:
            end = os.fstat(raw.fileno()).st_size
            with tarfile.open(fileobj=raw, mode="r:") as tar:
                while True:
                    member = tar.next()
                    if member is None:  # tarfile also stops quietly at a header cut short: want the end marker
                        raw.seek(tar.offset)
                        if raw.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                            return found, False
                        break
                    m = _PNG_RE.match(os.path.basename(member.name))
                    if not (member.isfile() and m):
                        continue
                    if member.offset_data + member.size > end:
                        return found, False
                    pos = raw.tell()
                    ok = _png_intact(raw, member.offset_data, member.size)
                    raw.seek(pos)
                    seed = int(m.group(1))
                    if not ok or seed in found:
                        return found, False
                    found[seed] = member.name
    except (tarfile.TarError, OSError, EOFError):
        return found, False
    return found, bool(found)  # a shard with no image is not one of ours


def _png_files(outdir: pathlib.Path):
    """``(seed, path)`` of every PNG named by seed in ``outdir`` (flat and per-1000 folders)."""
    for entry in os.scandir(outdir):
        if entry.is_file():
            m = _PNG_RE.match(entry.name)
            if m:
                yield int(m.group(1)), entry.path
        elif entry.is_dir() and _SUBDIR_RE.match(entry.name):
            for sub in os.scandir(entry.path):
                m = _PNG_RE.match(sub.name)
                if m and sub.is_file():
                    yield int(m.group(1)), sub.path


def scan_outputs(outdir: os.PathLike | str, *, verify: bool = True) -> tuple[set[int], list[str]]:
    """``(done seeds, damaged files)`` of a run folder (see the module docstring for the checks).

    ``verify=False`` trusts every PNG named by seed (one directory listing, no file opened).
    """
    outdir = pathlib.Path(outdir)
    seeds: set[int] = set()
    damaged: list[str] = []
    if not outdir.is_dir():
        return seeds, damaged
    for seed, path in _png_files(outdir):
        if not verify or png_intact(path):
            seeds.add(seed)
        else:
            damaged.append(path)
    for entry in os.scandir(outdir):
        if entry.is_file() and _TAR_RE.match(entry.name):
            members, intact = scan_tar(entry.path)
            if intact:
                seeds.update(members)
            else:
                damaged.append(entry.path)
    return seeds, sorted(damaged)


def done_seeds(outdir: os.PathLike | str, *, verify: bool = True) -> set[int]:
    """Seeds whose image is finished and intact in ``outdir``: PNGs (flat or per-1000 folders) and tar shards.

    A damaged tar shard counts for none of its seeds (they are drawn again once
    :func:`set_aside_damaged` has moved it away).
    """
    return scan_outputs(outdir, verify=verify)[0]


def set_aside_damaged(outdir: os.PathLike | str) -> list[str]:
    """Rename damaged PNGs and shards of ``outdir`` to ``<name>.damaged``; return their former paths.

    Call on one rank before listing the pending seeds; the renamed files are kept
    for inspection and ignored from then on.
    """
    return finished_seeds(outdir)[1]


def finished_seeds(outdir: os.PathLike | str) -> tuple[set[int], list[str]]:
    """``(done seeds, damaged files set aside)``: :func:`done_seeds` and :func:`set_aside_damaged` in one scan."""
    done, damaged = scan_outputs(outdir)
    moved = []
    for path in damaged:
        target = path + DAMAGED_SUFFIX
        n = 1
        while os.path.lexists(target):
            target, n = f"{path}{DAMAGED_SUFFIX}{n}", n + 1
        try:
            os.rename(path, target)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise OutputError(path, exc, "--outdir") from exc
        moved.append(path)
    return done, moved


def remove_stale_temps(outdir: os.PathLike | str) -> int:
    """Delete temporary files left by killed runs (call on one rank before writers start)."""
    outdir = pathlib.Path(outdir)
    count = 0
    if not outdir.is_dir():
        return 0
    for path in [outdir, *[p for p in outdir.iterdir() if p.is_dir() and _SUBDIR_RE.match(p.name)]]:
        for p in path.iterdir():
            if _TMP_RE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                count += 1
    return count


def _encode_png(image: np.ndarray) -> bytes:
    mode = "L" if image.shape[2] == 1 else "RGB"
    buf = io.BytesIO()
    PIL.Image.fromarray(image[:, :, 0] if mode == "L" else image, mode).save(buf, format="png")
    return buf.getvalue()


def _to_numpy_nhwc(images) -> np.ndarray:
    """uint8 images as NHWC numpy (accepts torch NCHW tensors on any device, or numpy NHWC)."""
    if hasattr(images, "detach"):  # torch tensor, NCHW
        images = images.detach().permute(0, 2, 3, 1).contiguous().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"expected uint8 images NHWC with 1 or 3 channels, got {images.dtype} {images.shape}")
    return images


class ImageWriter:
    """Writes images named by seed in the background; use as a context manager.

    ``write(seeds, images)`` takes a batch (torch uint8 NCHW or numpy uint8 NHWC);
    ``close()`` waits for everything and finishes the last tar shard.  Errors in
    the background threads are raised by the next ``write`` or by ``close``.
    """

    def __init__(self, outdir: os.PathLike | str, *, subdirs: bool = False, tar: bool = False,
                 shard_size: int = 1000, max_pending: int = 4, encode_threads: Optional[int] = None):
        self.outdir = pathlib.Path(outdir)
        self.subdirs = bool(subdirs)
        self.tar = bool(tar)
        self.shard_size = int(shard_size)
        if self.shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(self.outdir, exc, "--outdir") from exc
        self.written: list[int] = []  # seeds published by this writer
        self._shard: Optional[tarfile.TarFile] = None
        self._shard_tmp: Optional[pathlib.Path] = None
        self._shard_seeds: list[int] = []
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(max_pending)))
        self._error: Optional[BaseException] = None
        threads = encode_threads or min(8, os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png")
        self._thread = threading.Thread(target=self._run, name="image-writer", daemon=True)
        self._closed = False
        self._thread.start()

    # -- producer side -------------------------------------------------------------
    def write(self, seeds: Sequence[int], images) -> None:
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError("ImageWriter is closed")
        images = _to_numpy_nhwc(images)
        seeds = [int(s) for s in seeds]
        if len(seeds) != images.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {images.shape[0]} images")
        self._queue.put((seeds, images))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
            self._pool.shutdown(wait=True)
        self._raise_if_failed()

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # On an error upstream: publish what is complete, keep the original exception.
        try:
            self.close()
        except BaseException:
            pass

    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        if isinstance(self._error, UsageError):  # OutputError: one line for the CLI
            raise self._error
        raise RuntimeError(f"image writer failed: {self._error}") from self._error

    # -- consumer side ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self._error is not None:
                continue  # drain so the producer never blocks forever
            try:
                seeds, images = item
                if self.tar:  # one shard at a time, members in seed order
                    pngs = list(self._pool.map(_encode_png, list(images)))
                    for seed, data in zip(seeds, pngs):
                        self._store(seed, data)
                else:  # encode, write and fsync each PNG in the pool: the fsyncs overlap
                    list(self._pool.map(lambda pair: self._store(pair[0], _encode_png(pair[1])),
                                        zip(seeds, list(images))))
            except BaseException as exc:  # reported to the producer
                self._error = exc
        try:
            if self._error is None:
                self._finish_shard()
            else:
                self._abandon_shard()
        except BaseException as exc:
            self._error = self._error or exc

    def _store(self, seed: int, data: bytes) -> None:
        if self.tar:
            self._add_to_shard(seed, data)
            return
        final = self.outdir / png_relpath(seed, self.subdirs)
        tmp = _tmp_name(final)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            published = _publish(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(final, exc, "--outdir") from exc
        if published:
            self.written.append(seed)

    def _add_to_shard(self, seed: int, data: bytes) -> None:
        try:
            if self._shard is None:
                # O_EXCL creation: unique even for ranks on other nodes that share this folder and a PID;
                # mode 0666 & ~umask like the PNGs (not mkstemp's 0600).
                self._shard_tmp = create_temp(self.outdir, ".shard-", f".tar.tmp{os.getpid()}")
                self._shard = tarfile.open(self._shard_tmp, "w", format=tarfile.PAX_FORMAT)
                self._shard_seeds = []
            info = tarfile.TarInfo(f"{seed:07d}.png")
            info.size = len(data)
            info.mode = 0o644
            self._shard.addfile(info, io.BytesIO(data))
        except OSError as exc:
            raise OutputError(self.outdir, exc, "--outdir") from exc  # the temporary name would mean nothing
        self._shard_seeds.append(seed)
        if len(self._shard_seeds) >= self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._shard is None:
            return
        base = f"{min(self._shard_seeds):07d}-{max(self._shard_seeds):07d}"
        for n in range(1000):
            final = self.outdir / (f"{base}.tar" if n == 0 else f"{base}-{n}.tar")
            if not final.exists():
                break
        shard, tmp = self._shard, self._shard_tmp
        self._shard, self._shard_tmp = None, None
        try:
            shard.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            published = _publish(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(final, exc, "--outdir") from exc
        if not published:
            raise FileExistsError(f"{final} appeared while writing; nothing was overwritten")
        self.written.extend(self._shard_seeds)
        self._shard_seeds = []

    def _abandon_shard(self) -> None:
        """Drop the unfinished shard: close it (ignoring a full disk) and remove its temporary file."""
        shard, tmp = self._shard, self._shard_tmp
        self._shard, self._shard_tmp = None, None
        if shard is not None:
            try:
                shard.close()
            except OSError:
                pass
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def iter_pending(seeds: Iterable[int], done: set[int]) -> list[int]:
    """``seeds`` without the finished ones, order kept."""
    return [s for s in seeds if s not in done]


class ImageIndex:
    """Where each finished image of a run folder lives: a PNG (flat or per-1000 folder) or a tar shard member.

    Damaged files (see the module docstring) are left out; a read error names the file.
    """

    def __init__(self, outdir: os.PathLike | str):
        self.outdir = pathlib.Path(outdir)
        self.where: dict[int, tuple] = {}
        if self.outdir.is_dir():
            for entry in sorted(os.scandir(self.outdir), key=lambda e: e.name):
                if entry.is_file() and _TAR_RE.match(entry.name):
                    members, _ = scan_tar(entry.path)
                    for seed, name in members.items():
                        self.where[seed] = ("tar", pathlib.Path(entry.path), name)
            for seed, path in _png_files(self.outdir):
                self.where[seed] = ("png", pathlib.Path(path), None)
        self._tars: dict = {}

    def read(self, seeds: Sequence[int]) -> np.ndarray:
        """uint8 NHWC images of ``seeds`` in order; a missing or unreadable one is a :class:`UsageError`."""
        missing = [s for s in seeds if int(s) not in self.where]
        if missing:
            raise UsageError(f"{len(missing)} images (e.g. {missing[0]:07d}.png) are missing in {self.outdir}; "
                             f"rerun the sampling command to finish them")
        out = []
        for s in seeds:
            kind, path, member = self.where[int(s)]
            where = str(path) if kind == "png" else f"{path} (member {member})"
            try:
                if kind == "png":
                    data = path.read_bytes()
                else:
                    if path not in self._tars:
                        self._tars[path] = tarfile.open(path, "r:")
                    data = self._tars[path].extractfile(member).read()
                with PIL.Image.open(io.BytesIO(data)) as img:
                    out.append(np.asarray(img.convert("RGB")))
            except (OSError, tarfile.TarError, EOFError, ValueError, SyntaxError) as exc:
                raise UsageError(f"cannot read image {where}: {exc}; rerun the sampling command to set it aside "
                                 f"and draw seed {int(s)} again") from exc
        return np.stack(out)

    def batches(self, seeds: Sequence[int], batch: int = 64):
        """Yield uint8 NHWC batches of ``seeds``."""
        for i in range(0, len(seeds), batch):
            yield self.read(seeds[i:i + batch])

    def close(self) -> None:
        for tar in self._tars.values():
            tar.close()
        self._tars.clear()
