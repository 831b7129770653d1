"""Restricted loading of official-layout EDM2 pickles, plain checkpoints and the converter."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import subprocess
import sys

import numpy as np
import pytest
import torch

from networks import edm2_pickle as P
from networks.encoders import PixelEncoder, StabilityVAEEncoder
from benchmarks import edm2_snapshot as WR
from utils.errors import UsageError

TINY = dict(img_resolution=16, img_channels=4, label_dim=10, use_fp16=False, model_channels=16,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return WR.make_precond(**TINY)


def _out(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    labels = torch.eye(10)[[3, 7]]
    with torch.no_grad():
        return net(x, torch.tensor([0.5, 3.0]), labels)


def test_writer_layout_is_official(tmp_path, tiny_net):
    path = tmp_path / "net.pkl"
    WR.write_edm2_pickle(path, tiny_net, encoder=WR.OfficialStabilityVAEEncoder())
    data = path.read_bytes()
    globals_used = set()
    strings = [arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str)]
    for i, s in enumerate(strings[:-1]):
        if s in ("torch_utils.persistence", "dnnlib.util", "torch._utils", "torch.storage",
                 "torch.nn.modules.container", "collections"):
            globals_used.add(f"{s}.{strings[i + 1]}")
    assert "torch_utils.persistence._reconstruct_persistent_obj" in globals_used
    assert "dnnlib.util.EasyDict" in globals_used
    assert {"torch._utils._rebuild_parameter", "torch.storage._load_from_bytes",
            "torch.nn.modules.container.ModuleDict", "collections.OrderedDict"} <= globals_used
    for key in ("module_src", "class_name", "_init_kwargs", "_parameters", "_modules", "Precond", "UNet"):
        assert key in strings
    assert "torch_utils" not in sys.modules  # the stand-in modules were removed again


def test_official_pickle_roundtrip_never_executes_source(tmp_path, tiny_net):
    path = tmp_path / "net.pkl"
    marker = tmp_path / "MARKER"
    WR.write_edm2_pickle(path, tiny_net, marker_path=str(marker), half=False)
    ckpt = P.load_checkpoint(path)
    assert not marker.exists()
    assert isinstance(ckpt.net, type(tiny_net)) and isinstance(ckpt.encoder, PixelEncoder)
    assert ckpt.init_kwargs == TINY
    ref = tiny_net.state_dict()
    got = ckpt.net.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    torch.testing.assert_close(_out(ckpt.net), _out(tiny_net), rtol=0, atol=0)
    # The other training objects are kept, inert.
    assert isinstance(ckpt.other["loss_fn"], P.PersistentRecord)
    assert ckpt.other["loss_fn"].class_name == "EDM2Loss"
    assert ckpt.other["dataset_kwargs"]["path"] == "x.zip"


def test_half_snapshot_loads_as_float32_values(tmp_path, tiny_net):
    path = tmp_path / "net.pkl"
    WR.write_edm2_pickle(path, tiny_net, half=True)
    ckpt = P.load_checkpoint(path)
    for k, v in ckpt.net.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, tiny_net.state_dict()[k].half().float()), k


def test_vae_encoder_record(tmp_path, tiny_net):
    path = tmp_path / "net.pkl"
    WR.write_edm2_pickle(path, tiny_net, encoder=WR.OfficialStabilityVAEEncoder(batch_size=4))
    enc = P.load_checkpoint(path).encoder
    assert isinstance(enc, StabilityVAEEncoder)
    assert enc.vae_name == "stabilityai/sd-vae-ft-mse" and enc.batch_size == 4
    np.testing.assert_allclose(enc.scale, 0.5 / np.array([4.17, 4.62, 3.71, 3.28]), rtol=1e-6)
    np.testing.assert_allclose(enc.bias, -np.array([5.81, 3.25, 0.12, -2.15]) * 0.5 /
                               np.array([4.17, 4.62, 3.71, 3.28]), rtol=1e-6)


def test_posthoc_layout_without_training_objects(tmp_path, tiny_net):
    path = tmp_path / "net.pkl"
    WR.write_edm2_pickle(path, tiny_net, training_snapshot=False, protocol=2)
    ckpt = P.load_checkpoint(path)
    assert isinstance(ckpt.encoder, PixelEncoder) and ckpt.other == {}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Evil(marker)}))
    with pytest.raises(P.CheckpointError) as info:
        P.load_checkpoint(path)
    msg = str(info.value)
    assert "system" in msg and "refusing" in msg and "\n" not in msg
    assert isinstance(info.value, UsageError)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(eval),  # builtins.eval
    pickle.dumps(subprocess.Popen),
    pickle.dumps(exec, protocol=2),
])
def test_other_globals_refused(tmp_path, payload):
    path = tmp_path / "x.pkl"
    path.write_bytes(payload)
    with pytest.raises(P.CheckpointError, match="refusing"):
        P.read_pickle(path)


def test_object_dtype_array_refused(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"ema": np.array([1, "a"], dtype=object)}))
    with pytest.raises(P.CheckpointError):
        P.read_pickle(path)


def test_truncated_and_corrupt(tmp_path, tiny_net):
    good = tmp_path / "net.pkl"
    WR.write_edm2_pickle(good, tiny_net)
    data = good.read_bytes()
    for name, blob in [("trunc.pkl", data[: len(data) // 2]), ("junk.pkl", b"\x00garbage" * 10),
                       ("empty.pkl", b"")]:
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(P.CheckpointError, match="truncated or corrupt") as info:
            P.load_checkpoint(p)
        assert "\n" not in str(info.value)


def test_wrong_content(tmp_path, tiny_net):
    p = tmp_path / "noema.pkl"
    p.write_bytes(pickle.dumps({"net": 1}))
    with pytest.raises(P.CheckpointError, match="no 'ema'"):
        P.load_checkpoint(p)
    # Weights that do not fit the recorded constructor arguments.
    other = WR.make_precond(**dict(TINY, model_channels=8))
    other._init_kwargs = dict(TINY)
    p2 = tmp_path / "mismatch.pkl"
    WR.write_edm2_pickle(p2, other)
    with pytest.raises(P.CheckpointError, match="do not match"):
        P.load_checkpoint(p2)
    with pytest.raises(P.CheckpointError, match="not found"):
        P.load_checkpoint(tmp_path / "missing.pkl")


def test_plain_checkpoints(tmp_path, tiny_net):
    pkl = tmp_path / "net.pkl"
    WR.write_edm2_pickle(pkl, tiny_net, half=False, encoder=WR.OfficialStabilityVAEEncoder())
    ckpt = P.load_checkpoint(pkl)
    st, js = P.save_plain(ckpt, tmp_path / "plain" / "net")
    meta = json.loads(js.read_text())
    assert meta["init_kwargs"] == TINY and meta["encoder"]["class_name"] == "StabilityVAEEncoder"
    again = P.load_checkpoint(st)
    torch.testing.assert_close(_out(again.net), _out(tiny_net), rtol=0, atol=0)
    np.testing.assert_array_equal(again.encoder.scale, ckpt.encoder.scale)
    with pytest.raises(UsageError, match="already exists"):
        P.save_plain(ckpt, tmp_path / "plain" / "net")
    # .pt state dict + JSON
    pt = tmp_path / "plain" / "other.pt"
    torch.save({"ema": tiny_net.state_dict()}, pt)
    (tmp_path / "plain" / "other.json").write_text(json.dumps({"class_name": "Precond", "init_kwargs": TINY}))
    torch.testing.assert_close(_out(P.load_checkpoint(pt).net), _out(tiny_net), rtol=0, atol=0)
    # Missing JSON, corrupt weights.
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(st.read_bytes())
    with pytest.raises(P.CheckpointError, match="constructor arguments"):
        P.load_checkpoint(lone)
    bad = tmp_path / "plain" / "bad.safetensors"
    bad.write_bytes(st.read_bytes()[:100])
    (tmp_path / "plain" / "bad.json").write_text(js.read_text())
    with pytest.raises(P.CheckpointError, match="corrupt"):
        P.load_checkpoint(bad)


def test_convert_command(tmp_path, tiny_net):
    pkl = tmp_path / "edm2-img512-xs-0134217-0.100.pkl"
    WR.write_edm2_pickle(pkl, tiny_net)
    out = tmp_path / "out"
    run = lambda: subprocess.run([sys.executable, "-m", "networks.convert_edm2", str(pkl), str(out)],  # noqa: E731
                                 cwd=ROOT, capture_output=True, text=True)
    r = run()
    assert r.returncode == 0, r.stderr
    st = out / "edm2-img512-xs-0134217-0.100.safetensors"
    assert st.is_file() and st.with_suffix(".json").is_file()
    before = st.read_bytes()
    r = run()  # refuses to overwrite
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "already exists" in r.stderr
    assert st.read_bytes() == before
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Evil(tmp_path / "PWNED")))
    r = subprocess.run([sys.executable, "-m", "networks.convert_edm2", str(evil), str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: refusing") and not (tmp_path / "PWNED").exists()
