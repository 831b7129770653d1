"""Load EDM2 checkpoints without executing code from the file.

Official EDM2 snapshots (``*.pkl``) are pickles written with EDM2's
``torch_utils.persistence``: every network object is stored as a call
``_reconstruct_persistent_obj(meta)`` with
``meta = {type: 'class', version, module_src, class_name, state}``, where
``module_src`` is the Python source of the defining module (normally
``exec``-ed on load) and ``state`` the object's ``__dict__`` (``_init_args``,
``_init_kwargs``, ``_parameters``, ``_buffers``, ``_modules``, ...).  The top
level is a ``dnnlib.util.EasyDict`` with ``ema`` (the network) and usually
``encoder``, ``loss_fn`` and ``dataset_kwargs``.

:class:`RestrictedUnpickler` resolves only a short list of globals:

* ``_reconstruct_persistent_obj`` -> an inert :class:`PersistentRecord`
  (``module_src`` is kept as text and never imported or executed);
* tensors through ``torch._utils._rebuild_tensor_v2`` /
  ``_rebuild_parameter`` with storages from ``torch.storage._load_from_bytes``,
  whose bytes are read by ``torch.load(..., weights_only=True)``;
* containers (``collections.OrderedDict``, ``dnnlib.util.EasyDict``, ``set``,
  ``torch.nn`` ``ModuleDict`` / ``ModuleList`` / ``Sequential`` as inert records);
* numpy arrays and scalars of non-object dtypes (encoder constants).

Any other global is refused with :class:`CheckpointError`.  The network is then
rebuilt as this project's :class:`networks.edm2.Precond` from ``_init_kwargs``
and its weights, gathered from the nested records, are loaded with
``strict=True``.  The encoder record becomes :class:`networks.encoders.PixelEncoder`
or :class:`networks.encoders.StabilityVAEEncoder` with the stored constants.

Plain checkpoints are also accepted: ``net.safetensors`` or ``net.pt`` (a state
dict, read with ``weights_only=True``) beside ``net.json`` holding
``{"class_name": "Precond", "init_kwargs": {...}, "encoder": {...}}``; see
:func:`save_plain` and ``python -m networks.convert_edm2``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import pathlib
import pickle
from typing import Any, Optional

import numpy as np
import torch

from networks.edm2 import Precond
from networks.encoders import PixelEncoder, StabilityVAEEncoder, encoder_from_config
from utils.atomic import atomic_path
from utils.errors import UsageError
from utils.safe_load import REASONS, global_exists, load_error_kind, quiet_torch_load

__all__ = ["CheckpointError", "PersistentRecord", "ModuleRecord", "EasyDict", "RestrictedUnpickler",
           "EDM2Checkpoint", "read_pickle", "load_checkpoint", "save_plain", "PLAIN_FORMAT"]

PLAIN_FORMAT = "swg-edm2-plain/1"
_PERSISTENCE_VERSION = 6


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded (unsafe, corrupt, or not an EDM2 network)."""


# ----------------------------------------------------------------------------
# Inert stand-ins for the objects a snapshot refers to.

class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclasses.dataclass
class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` described, kept as data."""

    class_name: str
    version: Any
    state: dict
    module_src_sha256: str  # identifies the pickled source without running it

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})


class ModuleRecord:
    """Stand-in for ``torch.nn.ModuleDict`` / ``ModuleList`` / ``Sequential`` (state kept as data)."""

    state: Optional[dict] = None

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict_state, slot_state)
            state = state[0] or {}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("malformed torch.nn container state")
        self.state = state


class _NdarrayStub:
    """Receives numpy's ndarray pickle state and turns it into an array without object dtypes."""

    def __init__(self):
        self.array: Optional[np.ndarray] = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("malformed numpy array state")
        _, shape, dtype, fortran, raw = state
        dtype = _check_dtype(dtype)
        if isinstance(raw, str):
            raw = raw.encode("latin1")
        if not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("numpy array data must be raw bytes")
        arr = np.frombuffer(bytes(raw), dtype=dtype).copy()
        self.array = arr.reshape(shape, order="F" if fortran else "C")


def _check_dtype(dtype):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("numpy arrays with object dtype are refused")
    return dtype


def _np_reconstruct(cls, shape, typecode):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays are accepted")
    return _NdarrayStub()


def _np_scalar(dtype, data=None):
    dtype = _check_dtype(dtype)
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("numpy scalar data must be raw bytes")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise pickle.UnpicklingError("numpy dtype must be given by name")
    return _check_dtype(np.dtype(spec, align, copy))


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("malformed persistent object record")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise pickle.UnpicklingError("malformed persistent object state")
    src = meta.get("module_src") or ""
    digest = hashlib.sha256(src.encode("utf-8", "replace") if isinstance(src, str) else b"").hexdigest()
    return PersistentRecord(meta["class_name"], meta.get("version"), state, digest)


def _load_from_bytes(data):
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("tensor storage must be bytes")
    try:
        with quiet_torch_load():
            storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - torch's own text may advise weights_only=False; never pass that on
        raise pickle.UnpicklingError("tensor data is truncated or corrupt") from None
    if not isinstance(storage, (torch.UntypedStorage, torch.storage.TypedStorage)):
        raise pickle.UnpicklingError("tensor storage bytes hold something else")
    return storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, (torch.UntypedStorage, torch.storage.TypedStorage)):
        raise pickle.UnpicklingError("tensor without a storage")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), False,
                                           collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter without tensor data")
    return torch.nn.Parameter(data, requires_grad=False)


def _copyreg_reconstructor(cls, base, state):
    if cls not in (ModuleRecord, EasyDict) or base is not object:
        raise pickle.UnpicklingError("unexpected copyreg reconstruction")
    return cls.__new__(cls)


def _codecs_encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return text.encode("latin1")


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch", "Size"): torch.Size,
    ("torch.nn.modules.container", "ModuleDict"): ModuleRecord,
    ("torch.nn.modules.container", "ModuleList"): ModuleRecord,
    ("torch.nn.modules.container", "Sequential"): ModuleRecord,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _np_dtype,
    **{(m, "_reconstruct"): _np_reconstruct for m in _NUMPY_MODULES},
    **{(m, "scalar"): _np_scalar for m in _NUMPY_MODULES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals an EDM2 snapshot needs (see the module docstring)."""

    def find_class(self, module: str, name: str):
        target = _ALLOWED.get((module, name))
        if target is not None:
            return target
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("numpy") and name.endswith("DType"):  # numpy 2 dtype classes
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if not global_exists(f"{module}.{name}"):  # a name clipped by the end of a truncated file
            raise pickle.UnpicklingError(f"pickle data was truncated inside the global {module}.{name}")
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not used by EDM2 snapshots")


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _finish(obj, depth: int = 0):
    """Replace numpy stubs by arrays everywhere in the loaded structure."""
    if depth > 200:
        raise CheckpointError("checkpoint structure is nested too deeply")
    if isinstance(obj, _NdarrayStub):
        if obj.array is None:
            raise CheckpointError("numpy array without data in checkpoint")
        return obj.array
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _finish(obj[k], depth + 1)
        return obj
    if isinstance(obj, list):
        obj[:] = [_finish(v, depth + 1) for v in obj]
        return obj
    if isinstance(obj, tuple):
        return tuple(_finish(v, depth + 1) for v in obj)
    if isinstance(obj, PersistentRecord):
        obj.state = _finish(obj.state, depth + 1)
        return obj
    if isinstance(obj, ModuleRecord):
        obj.state = _finish(obj.state, depth + 1)
        return obj
    return obj


def read_pickle(path: pathlib.Path | str) -> Any:
    """Unpickle an EDM2 snapshot into inert data (records, tensors, arrays)."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f).load()
    except _Refused as exc:
        raise CheckpointError(
            f"refusing to load {path}: it asks for {exc.name}, which is not part of an EDM2 network "
            f"snapshot (it could run code); use an official EDM2 .pkl or a .safetensors checkpoint") from None
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, OverflowError, MemoryError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"cannot read {path}: truncated or corrupt checkpoint ({reason}); "
                              f"delete it and download it again") from None
    except OSError as exc:
        raise CheckpointError(f"cannot open {path}: {exc.strerror or exc}; check the path and permissions") from None
    return _finish(data)


# ----------------------------------------------------------------------------
# From records to this project's objects.

@dataclasses.dataclass
class EDM2Checkpoint:
    """A loaded EDM2 checkpoint: the network, its encoder, and whatever else the file held (inert)."""

    net: torch.nn.Module
    encoder: Any
    init_kwargs: dict
    other: dict
    source: str


def gather_state_dict(record, prefix: str = "", out: Optional[dict] = None) -> dict:
    """Collect ``{dotted_name: tensor}`` from nested persistent / container records."""
    out = {} if out is None else out
    if isinstance(record, PersistentRecord):
        state = record.state
    elif isinstance(record, ModuleRecord):
        state = record.state or {}
    else:
        raise CheckpointError(f"unexpected object {type(record).__name__} at {prefix or 'top level'} "
                              f"of the network record")
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = _tensor(value, prefix + name)
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = _tensor(value, prefix + name)
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            gather_state_dict(child, f"{prefix}{name}.", out)
    return out


def _tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"checkpoint entry {name} is not a tensor")
    return value.detach()


def build_precond(init_kwargs: dict, state_dict: dict, source: str) -> torch.nn.Module:
    """This project's ``Precond`` from constructor kwargs, weights loaded with ``strict=True`` (float32).

    ``state_dict`` is consumed: its tensors are replaced by their float32 versions, which the network takes.
    """

    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(init_kwargs).items()}
    # Large networks are built on the meta device (no random init, no memory) and take the
    # loaded tensors directly; small ones are cheaper to build normally.
    big = sum(t.numel() for t in state_dict.values()) > 50_000_000
    try:
        with torch.device("meta") if big else contextlib.nullcontext():
            net = Precond(**kwargs)
    except TypeError as exc:
        raise CheckpointError(f"{source}: constructor arguments do not fit networks.edm2.Precond ({exc}); "
                              f"is this an EDM2 checkpoint?") from None
    # float32 one tensor at a time, dropping each half-precision original as it goes: the peak is the
    # float32 network plus one tensor (was: all fp16 tensors + all fp32 copies, 9 GB for XXL).
    for name in list(state_dict):
        state_dict[name] = state_dict[name].to(torch.float32)
    try:
        net.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{source}: weights do not match the network built from its constructor "
                              f"arguments ({first})") from None
    net = net.float()
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
        if t.is_meta:
            raise CheckpointError(f"{source}: no value for {name} in the checkpoint")
    return net.eval().requires_grad_(False)


def encoder_from_record(record, source: str):
    """This project's encoder for an EDM2 encoder record (None -> pixels)."""
    if record is None:
        return PixelEncoder()
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"{source}: 'encoder' is not an EDM2 encoder object")
    if record.class_name == "StandardRGBEncoder":
        return PixelEncoder()
    if record.class_name == "StabilityVAEEncoder":
        st = record.state
        try:
            return StabilityVAEEncoder(vae_name=str(st.get("vae_name", "stabilityai/sd-vae-ft-mse")),
                                       scale=np.asarray(st["scale"], np.float32),
                                       bias=np.asarray(st["bias"], np.float32),
                                       batch_size=int(st.get("batch_size", 8)))
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{source}: malformed StabilityVAEEncoder record ({exc})") from None
    raise CheckpointError(f"{source}: unknown encoder class {record.class_name!r}; expected "
                          f"StandardRGBEncoder or StabilityVAEEncoder")


def _from_pickle(path: pathlib.Path, source: str) -> EDM2Checkpoint:
    data = read_pickle(path)
    if not isinstance(data, dict) or "ema" not in data:
        raise CheckpointError(f"{source} is not an EDM2 snapshot (no 'ema' network inside); "
                              f"give a network .pkl from EDM2's training or post-hoc reconstruction")
    ema = data["ema"]
    if not isinstance(ema, PersistentRecord) or ema.class_name != "Precond":
        name = ema.class_name if isinstance(ema, PersistentRecord) else type(ema).__name__
        raise CheckpointError(f"{source}: 'ema' is a {name}, not an EDM2 Precond network")
    if ema.version != _PERSISTENCE_VERSION:
        raise CheckpointError(f"{source}: unsupported EDM2 persistence version {ema.version!r} "
                              f"(expected {_PERSISTENCE_VERSION})")
    if ema.state.get("_init_args"):
        raise CheckpointError(f"{source}: positional constructor arguments are not supported")
    kwargs = ema.init_kwargs
    state = gather_state_dict(ema)
    ema.state = {}  # the weights now live only in `state`, so each fp16 tensor is freed once converted
    net = build_precond(kwargs, state, source)
    encoder = encoder_from_record(data.get("encoder"), source)
    other = {k: v for k, v in data.items() if k not in ("ema", "encoder")}
    return EDM2Checkpoint(net, encoder, kwargs, other, source)


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_suffix(".json")


def _from_plain(path: pathlib.Path, source: str) -> EDM2Checkpoint:
    meta_path = _sidecar(path)
    if not meta_path.is_file():
        raise CheckpointError(f"{source}: a plain state dict needs its constructor arguments in {meta_path}; "
                              f"write it with networks.edm2_pickle.save_plain or convert_edm2")
    try:
        meta = json.loads(meta_path.read_text())
        kwargs = meta["init_kwargs"]
        if meta.get("class_name", "Precond") != "Precond" or not isinstance(kwargs, dict):
            raise ValueError("class_name must be Precond and init_kwargs an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: malformed constructor arguments ({exc}); expected JSON with "
                              f"class_name and init_kwargs") from None
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            state = safetensors.torch.load_file(str(path))
        else:
            with quiet_torch_load():
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
                state = next(iter(state.values()))  # {'ema': {...}} or {'state_dict': {...}}
    except Exception as exc:  # safetensors / torch raise many types for damaged files
        if path.suffix != ".safetensors" and load_error_kind(exc) == "unsafe":
            raise CheckpointError(f"refusing to load {source}: {REASONS['unsafe']}; use an official EDM2 .pkl "
                                  f"or a .safetensors checkpoint") from None
        raise CheckpointError(f"cannot read {source}: truncated or corrupt checkpoint; "
                              f"delete it and download or convert it again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} does not hold a state dict of tensors")
    try:
        encoder = encoder_from_config(meta.get("encoder"))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: {exc}") from None
    net = build_precond(kwargs, state, source)
    return EDM2Checkpoint(net, encoder, dict(kwargs), dict(meta.get("other", {})), source)


def load_checkpoint(path: pathlib.Path | str, source: Optional[str] = None) -> EDM2Checkpoint:
    """Load an EDM2 network from an official ``.pkl`` or a plain ``.safetensors``/``.pt`` + ``.json``."""
    path = pathlib.Path(path)
    source = source or str(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {source}; check the path")
    if path.suffix in (".safetensors", ".pt", ".pth"):
        return _from_plain(path, source)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":  # torch zip checkpoint saved under another suffix
        return _from_plain(path, source)
    return _from_pickle(path, source)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def save_plain(ckpt: EDM2Checkpoint, out_path: pathlib.Path | str) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``<out>.safetensors`` + ``<out>.json`` (constructor args, encoder) atomically."""
    out_path = pathlib.Path(out_path)
    if out_path.suffix != ".safetensors":
        out_path = out_path.with_name(out_path.name + ".safetensors")
    meta_path = _sidecar(out_path)
    for p in (out_path, meta_path):
        if p.exists():
            raise UsageError(f"{p} already exists; remove it or choose another output folder")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in ckpt.net.state_dict().items()}
    meta = {"format": PLAIN_FORMAT, "class_name": "Precond", "init_kwargs": _jsonable(ckpt.init_kwargs),
            "encoder": ckpt.encoder.config(), "source": ckpt.source}
    write_plain(state, meta, out_path, meta_path)
    return out_path, meta_path


def write_plain(state: dict, meta: dict, weights_path: pathlib.Path, meta_path: pathlib.Path) -> None:
    """Write a plain checkpoint: ``state`` as ``.safetensors`` and ``meta`` as JSON, each atomically."""
    import safetensors.torch

    with atomic_path(weights_path) as tmp_w, atomic_path(meta_path) as tmp_m:
        safetensors.torch.save_file(state, tmp_w, metadata={"format": PLAIN_FORMAT})
        pathlib.Path(tmp_m).write_text(json.dumps(meta, indent=2) + "\n")
