"""Reference statistics: EDM2 pickle round trip, safe unpickling, .npz refs, validation."""

import os
import pickle

import numpy as np
import pytest

from metrics.refs import load_ref, save_ref
from utils.errors import UsageError


def _edm2_like(rng):
    def block(d):
        x = rng.standard_normal((3 * d, d))
        return {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}
    return {"num_images": 50000, "fid": block(8), "fd_dinov2": block(4)}


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_edm2_format_pickle_round_trip(tmp_path, protocol):
    ref = _edm2_like(np.random.default_rng(0))
    # A file as EDM2 writes it (plain pickle.dump of the dict), any protocol.
    with open(tmp_path / "img.pkl", "wb") as f:
        pickle.dump(ref, f, protocol=protocol)
    got = load_ref(tmp_path / "img.pkl")
    assert got["num_images"] == 50000
    for key in ("fid", "fd_dinov2"):
        np.testing.assert_array_equal(got[key]["mu"], ref[key]["mu"])
        np.testing.assert_array_equal(got[key]["sigma"], ref[key]["sigma"])
    # Our writer produces the same layout and refuses to overwrite.
    save_ref(got, tmp_path / "copy.pkl")
    with open(tmp_path / "copy.pkl", "rb") as f:
        plain = pickle.load(f)
    assert set(plain) == {"num_images", "fid", "fd_dinov2"} and isinstance(plain["fid"]["mu"], np.ndarray)
    before = (tmp_path / "copy.pkl").read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        save_ref({"num_images": 1}, tmp_path / "copy.pkl")
    assert (tmp_path / "copy.pkl").read_bytes() == before


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"num_images": 1, "fid": _Evil()}, f)
    with pytest.raises(UsageError, match="not allowed"):
        load_ref(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_npz_reference_is_fid_only(tmp_path):
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(6), np.eye(6)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    got = load_ref(tmp_path / "ref.npz")
    assert set(got) == {"fid", "npz_keys"} and got["npz_keys"] == ["mu", "sigma"]
    np.testing.assert_array_equal(got["fid"]["mu"], mu)
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(UsageError, match="has keys m; .* pytorch-fid's mu, sigma"):
        load_ref(tmp_path / "bad.npz")


def test_bad_references(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_ref(tmp_path / "missing.pkl")
    ref = _edm2_like(np.random.default_rng(2))
    ref["fid"]["sigma"] = ref["fid"]["sigma"][:3]
    with open(tmp_path / "shape.pkl", "wb") as f:
        pickle.dump(ref, f)
    with pytest.raises(UsageError, match="sigma has shape"):
        load_ref(tmp_path / "shape.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(UsageError):
        load_ref(tmp_path / "junk.pkl")
