"""Writer of pickles in the layout of official EDM2 snapshots (for the tests and the benchmarks).

EDM2 pickles its networks with ``torch_utils.persistence``: a persistent object
is saved as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = dict(type='class', version=6, module_src=<source>, class_name=<name>,
state=<obj.__dict__>)``, the ``__dict__`` holding ``_init_args`` and
``_init_kwargs`` next to the ``nn.Module`` internals.  ``torch.nn.ModuleDict``
is not persistent and pickles normally.  The snapshot itself is a
``dnnlib.util.EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=...)``
written with ``pickle.dump`` (protocol 4), the network in float16.

This module reproduces those bytes with this project's ``networks.edm2``
classes: it temporarily registers stand-in ``torch_utils.persistence`` and
``dnnlib.util`` modules so the pickle refers to the official global names.  The
``module_src`` it stores is code that would create a marker file if anybody
executed it, which the tests use to prove the loader never does.

``benchmarks/real_scale.py`` uses it to write random-weight snapshots at the
published sizes; the tests use it for official-format files of tiny networks.
"""

from __future__ import annotations

import contextlib
import copy
import copy as _copy
import pickle
import sys
import types
from typing import Optional

import numpy as np
import torch

from networks import edm2

PERSISTENT_CLASSES = (edm2.Precond, edm2.UNet, edm2.Block, edm2.MPConv, edm2.MPFourier)


def trap_source(marker_path: str) -> str:
    """Module source that creates ``marker_path`` when executed (it must never be)."""
    return (f"import pathlib\npathlib.Path({str(marker_path)!r}).write_text('module_src was executed')\n"
            f"class Precond:\n    pass\n")


class _EasyDict(dict):
    pass


class OfficialStandardRGBEncoder:
    """Object with the ``__dict__`` of EDM2's ``StandardRGBEncoder``."""

    def __init__(self):
        self._init_args, self._init_kwargs = (), {}


class OfficialStabilityVAEEncoder:
    """Object with the ``__dict__`` of EDM2's ``StabilityVAEEncoder`` (``_vae`` never pickled)."""

    def __init__(self, vae_name="stabilityai/sd-vae-ft-mse", raw_mean=(5.81, 3.25, 0.12, -2.15),
                 raw_std=(4.17, 4.62, 3.71, 3.28), final_mean=0, final_std=0.5, batch_size=8):
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(list(raw_std))
        self.bias = np.float32(final_mean) - np.float32(list(raw_mean)) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None
        self._init_args = ()
        self._init_kwargs = dict(vae_name=vae_name)


class OfficialEDM2Loss:
    """Object with the ``__dict__`` of EDM2's ``EDM2Loss`` (kept as an inert record by the loader)."""

    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self._init_args, self._init_kwargs = (), dict(P_mean=P_mean, P_std=P_std)


_OFFICIAL_NAMES = {OfficialStandardRGBEncoder: "StandardRGBEncoder",
                   OfficialStabilityVAEEncoder: "StabilityVAEEncoder", OfficialEDM2Loss: "EDM2Loss"}


@contextlib.contextmanager
def record_init_args():
    """Build networks inside this block to record ``_init_args`` / ``_init_kwargs`` as persistence does."""
    originals = {cls: cls.__init__ for cls in PERSISTENT_CLASSES}

    def wrap(cls, orig):
        def __init__(self, *args, **kwargs):
            orig(self, *args, **kwargs)
            if type(self) is cls:
                self._init_args = copy.deepcopy(args)
                self._init_kwargs = copy.deepcopy(kwargs)
        return __init__

    for cls, orig in originals.items():
        cls.__init__ = wrap(cls, orig)
    try:
        yield
    finally:
        for cls, orig in originals.items():
            cls.__init__ = orig


def make_precond(**kwargs) -> torch.nn.Module:
    """A ``networks.edm2.Precond`` carrying recorded constructor arguments."""
    with record_init_args():
        return edm2.Precond(**kwargs)


@contextlib.contextmanager
def _official_modules():
    """Temporarily provide ``torch_utils.persistence`` and ``dnnlib.util`` so pickle names them."""
    saved = {name: sys.modules.get(name) for name in ("torch_utils", "torch_utils.persistence", "dnnlib",
                                                       "dnnlib.util")}
    tu, tup = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dn, dnu = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):  # never called: this module only writes with it
        raise AssertionError("stand-in")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    tup._reconstruct_persistent_obj = _reconstruct_persistent_obj
    tu.persistence = tup
    easy = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    dnu.EasyDict = easy
    dn.util = dnu
    sys.modules.update({"torch_utils": tu, "torch_utils.persistence": tup, "dnnlib": dn, "dnnlib.util": dnu})
    try:
        yield _reconstruct_persistent_obj, easy
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


class _PersistencePickler(pickle.Pickler):
    def __init__(self, f, reconstruct, module_src, protocol):
        super().__init__(f, protocol=protocol)
        self._reconstruct = reconstruct
        self._src = module_src

    def reducer_override(self, obj):
        if isinstance(obj, PERSISTENT_CLASSES) or type(obj) in _OFFICIAL_NAMES:
            name = _OFFICIAL_NAMES.get(type(obj), type(obj).__name__)
            state = dict(obj.__dict__)
            for attr in edm2.INFERENCE_ATTRS:  # this project's inference cache, not in EDM2's pickles
                state.pop(attr, None)
            state.setdefault("_init_args", ())
            state.setdefault("_init_kwargs", {})
            meta = dict(type="class", version=6, module_src=self._src, class_name=name, state=state)
            return self._reconstruct, (meta,)
        return NotImplemented


def write_edm2_pickle(path, net: torch.nn.Module, *, encoder=None, marker_path: Optional[str] = None,
                      half: bool = True, extra: Optional[dict] = None, protocol: int = 4,
                      training_snapshot: bool = True, loss=None, use_labels: bool = True,
                      copy: bool = True) -> None:
    """Write ``net`` (+ encoder) like EDM2's ``training_loop`` / ``reconstruct_phema`` do.

    ``copy=False`` pickles ``net`` itself (already on the CPU and in the wanted
    precision): no second copy of a 1.5 B-parameter network in memory.
    """
    src = trap_source(marker_path or str(path) + ".EXECUTED")
    ema = _copy.deepcopy(net).cpu() if copy else net
    ema = ema.eval().requires_grad_(False)
    if half:
        ema = ema.to(torch.float16)
    with _official_modules() as (reconstruct, easy):
        data = easy()
        if training_snapshot:
            data["encoder"] = encoder if encoder is not None else OfficialStandardRGBEncoder()
            data["dataset_kwargs"] = easy(class_name="training.dataset.ImageFolderDataset", path="x.zip",
                                          use_labels=use_labels)
            data["loss_fn"] = loss if loss is not None else OfficialEDM2Loss()
        elif encoder is not None:
            data["encoder"] = encoder
        data["ema"] = ema
        data.update(extra or {})
        with open(path, "wb") as f:
            _PersistencePickler(f, reconstruct, src, protocol).dump(data)
