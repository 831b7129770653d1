"""Reference statistics: EDM2's pickle format, FID-only ``.npz``, safe loading.

EDM2's ``dataset-refs/img512.pkl`` is a pickle of a plain dict

    {'num_images': int,
     'fid':       {'mu': float64[2048], 'sigma': float64[2048, 2048]},
     'fd_dinov2': {'mu': float64[1024], 'sigma': float64[1024, 1024]}}

Pickles can run code when loaded, so :func:`load_ref` uses an unpickler that
only resolves the handful of globals needed to rebuild numpy arrays and
scalars; anything else (``os.system``, ``builtins.eval``, ...) is refused.
Our own refs may also carry ``'features'`` (float32 rows) per detector, used
for precision/recall.  A ``.npz`` with ``mu`` and ``sigma`` (as pytorch-fid
writes) is read as FID-only statistics.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import zipfile
from typing import Any, Dict

import numpy as np

from utils.atomic import atomic_path, write_bytes_atomic
from utils.cache import fetch
from utils.errors import UsageError
from utils.safe_load import global_exists as _global_exists

__all__ = ["load_ref", "save_ref", "save_adm_ref", "npz_member_shape", "NPZ_BLOCKS", "ADM_LAYOUT", "resolve_ref_path", "check_ref", "SafeUnpickler", "RefusedGlobal"]

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles
    ("collections", "OrderedDict"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """A complete reference pickle that asks for something other than numpy arrays and containers."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickler restricted to plain containers and numpy arrays."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if not _global_exists(f"{module}.{name}"):  # a name clipped by the end of a truncated file
            raise pickle.UnpicklingError(f"pickle data was truncated inside the global {module}.{name}")
        raise RefusedGlobal(f"global '{module}.{name}' is not allowed in a reference file")


def resolve_ref_path(ref: str | os.PathLike) -> pathlib.Path:
    """A local path as is; a URL or ``hf://`` address through the download cache."""
    ref = str(ref)
    if "://" in ref:

        return pathlib.Path(fetch(ref, desc="reference statistics"))
    path = pathlib.Path(ref).expanduser()
    if not path.is_file():
        raise UsageError(f"reference statistics not found: {path}; pass --ref with an existing .pkl/.npz "
                         f"(e.g. https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl) "
                         f"or build one with 'python -m metrics ref'")
    return path


def _as_array(value, what: str, path) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise UsageError(f"{path}: {what} is {type(value).__name__}, not a numpy array; the reference file is malformed")
    return value


def check_ref(ref: Dict[str, Any], path="reference") -> Dict[str, Any]:
    """Validate a loaded reference dict (shapes, dimensions); returns it."""
    if not isinstance(ref, dict):
        raise UsageError(f"{path}: expected a dict of statistics, found {type(ref).__name__}; use an EDM2-format reference pickle")
    for key, block in ref.items():
        if key == "num_images":
            continue
        if not isinstance(block, dict) or "mu" not in block or "sigma" not in block:
            continue
        mu = _as_array(block["mu"], f"'{key}' mu", path)
        sigma = _as_array(block["sigma"], f"'{key}' sigma", path)
        dim = mu.reshape(-1).shape[0]
        if sigma.shape != (dim, dim):
            raise UsageError(f"{path}: '{key}' sigma has shape {sigma.shape}, expected {(dim, dim)}; the reference file is malformed")
        feats = block.get("features")
        if feats is not None and (_as_array(feats, f"'{key}' features", path).ndim != 2 or feats.shape[1] != dim):
            raise UsageError(f"{path}: '{key}' features have shape {feats.shape}, expected [N, {dim}]")
    return ref


# ADM's reference batches (openai/guided-diffusion evaluations): block -> its keys in the .npz
NPZ_BLOCKS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}
ADM_LAYOUT = "arr_0 (uint8 [N, H, W, 3] images), mu, sigma (Inception pool3), mu_s, sigma_s (sFID)"


def npz_member_shape(path: str | os.PathLike, key: str) -> tuple:
    """Shape of array ``key`` of an ``.npz``, read from its header only (no image data)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                       else np.lib.format.read_array_header_2_0(f))
    return tuple(shape)


def _load_npz(path: pathlib.Path) -> Dict[str, Any]:
    """An ADM reference batch (or pytorch-fid's ``mu``/``sigma``): statistics now, images by shape only.

    Returns ``{'fid': {...}, 'sfid': {...}, 'npz_keys': [...], 'images': {'path', 'count'},
    'resolution': [H, W]}`` with the blocks and entries the file has; the ``arr_0`` images are
    read later, and only for metrics that need their feature rows.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = sorted(npz.files)
            out: Dict[str, Any] = {"npz_keys": keys}
            for block, (m, sg) in NPZ_BLOCKS.items():
                if m in keys and sg in keys:
                    out[block] = {"mu": npz[m].astype(np.float64), "sigma": npz[sg].astype(np.float64)}
        if "arr_0" in keys:
            shape = npz_member_shape(path, "arr_0")
            if len(shape) != 4 or shape[-1] not in (1, 3):
                raise UsageError(f"{path}: arr_0 has shape {shape}; an ADM reference batch holds uint8 [N, H, W, 3] "
                                 f"images")
            out["images"] = {"path": str(path), "count": int(shape[0])}
            out["resolution"] = [int(shape[1]), int(shape[2])]
    except (ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
        raise UsageError(f"{path}: unreadable .npz reference ({exc}); download it again") from exc
    if not any(k in out for k in (*NPZ_BLOCKS, "images")):
        raise UsageError(f"{path} has keys {', '.join(keys) or 'none'}; a reference .npz needs ADM's layout "
                         f"({ADM_LAYOUT}) or pytorch-fid's mu, sigma")
    return check_ref(out, path)


def load_ref(ref: str | os.PathLike) -> Dict[str, Any]:
    """Load reference statistics: a ``.pkl`` (EDM2 format) or an ``.npz`` (ADM reference batch, or
    pytorch-fid's ``mu``/``sigma``), path or URL."""
    path = resolve_ref_path(ref)
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"PK":  # .npz is a zip archive
        return _load_npz(path)
    data = path.read_bytes()
    try:
        out = SafeUnpickler(io.BytesIO(data)).load()
    except RefusedGlobal as exc:
        raise UsageError(f"{path}: refused to load ({exc}; it could run code); use a reference pickle of plain "
                         f"dicts and numpy arrays") from None
    except Exception as exc:  # noqa: BLE001 - a cut or damaged pickle raises many types
        raise UsageError(f"{path}: truncated or corrupt reference pickle ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]}); delete it and download it again, or rebuild it "
                         f"with 'python -m metrics ref'") from None
    return check_ref(out, path)


def save_ref(ref: Dict[str, Any], dest: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
    """Write ``ref`` as an EDM2-format pickle atomically; an existing file is kept unless ``overwrite``."""
    dest = pathlib.Path(dest).expanduser()
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest} already exists; choose another --dest or pass --overwrite")
    write_bytes_atomic(dest, pickle.dumps(ref))
    return dest


def save_adm_ref(ref: Dict[str, Any], images: np.ndarray, dest: str | os.PathLike,
                 overwrite: bool = False) -> pathlib.Path:
    """Write an ADM reference batch: ``arr_0`` = ``images`` (uint8 NHWC), ``mu``/``sigma`` from
    ``ref['fid']`` and ``mu_s``/``sigma_s`` from ``ref['sfid']`` (uncompressed, as ADM's files)."""
    dest = pathlib.Path(dest).expanduser()
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest} already exists; choose another --dest or pass --overwrite")
    arrays = {"arr_0": np.asarray(images, dtype=np.uint8)}
    for block, (m, sg) in NPZ_BLOCKS.items():
        arrays[m], arrays[sg] = ref[block]["mu"], ref[block]["sigma"]
    with atomic_path(dest, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)
    return dest
