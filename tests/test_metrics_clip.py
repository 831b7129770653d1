"""FD-CLIP's detector: our ViT-L/14 image tower equals open_clip's on random weights, its preprocessing
equals dgm-eval's torchvision transform, and its weights are checked like the other detectors'."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from metrics import api, detectors
from metrics.clip import CLIP_MEAN, CLIP_STD, CLIPVisionTower, load_clip, preprocess_clip
from utils.errors import UsageError


@pytest.fixture(scope="module")
def open_clip_tower():
    """open_clip's ViT-L/14 vision transformer (GELU, as dgm-eval's DataComp weights), random weights.

    Built on the meta device and filled with random numbers (faster than open_clip's own initialisation);
    norms around 1 and projections of std 0.02 keep the 24 blocks' activations in range.
    """
    from open_clip.transformer import VisionTransformer

    with torch.device("meta"):
        tower = VisionTransformer(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_ratio=4.0,
                                  output_dim=768, act_layer=torch.nn.GELU)
    tower = tower.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if ".ln_" in name or name.startswith("ln_"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embedding" in name else 0.02))
    return tower


def test_tower_equals_open_clip_vit_l14(open_clip_tower):
    from metrics.clip import visual_state_dict

    state = {f"visual.{k}": v for k, v in open_clip_tower.state_dict().items()}
    state["logit_scale"] = torch.tensor(4.6)  # a whole open_clip state dict: the text side is ignored
    state["text_projection"] = torch.zeros(768, 768)
    with torch.device("meta"):
        ours = CLIPVisionTower()  # ViT-L/14 defaults
    ours.load_state_dict(visual_state_dict(state), strict=True, assign=True)  # as load_clip does
    assert ours.embed_dim == 1024
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours.eval()(x)
        proj, open_clip_tower.proj = open_clip_tower.proj, None  # dgm-eval's feature: ln_post(class token)
        try:
            expect = open_clip_tower(x)
        finally:
            open_clip_tower.proj = proj
    assert got.shape == expect.shape == (1, 1024) and float(expect.std()) > 0.1
    assert float((got - expect).abs().max()) <= 1e-5 * float(expect.abs().max())


def test_preprocessing_equals_dgm_evals_torchvision_transform():
    """Resize the shorter side to 224 (PIL bicubic), centre crop, /255, CLIP's mean/std, as dgm-eval."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode, Normalize

    rng = np.random.default_rng(0)
    for shape in ((40, 64, 3), (300, 256, 3), (224, 224, 3)):
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        img = TF.resize(PIL.Image.fromarray(a), 224, interpolation=InterpolationMode.BICUBIC).convert("RGB")
        expect = Normalize(CLIP_MEAN, CLIP_STD)(TF.center_crop(TF.to_tensor(img), 224))
        got = preprocess_clip(torch.from_numpy(a).permute(2, 0, 1)[None])[0]
        assert got.shape == (3, 224, 224)
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)


def test_weights_file_loads_and_wrong_weights_are_one_line(tmp_path):
    torch.manual_seed(4)
    small = CLIPVisionTower(width=32, layers=1, heads=2)
    torch.save({f"visual.{k}": v for k, v in small.state_dict().items()}, tmp_path / "small.bin")
    with pytest.raises(UsageError, match=r"small\.bin does not hold CLIP ViT-L/14 image-tower weights"):
        load_clip(tmp_path / "small.bin")  # a ViT-S-like file: shapes differ
    torch.save({"visual.conv1.weight": torch.zeros(3)}, tmp_path / "bad.bin")
    with pytest.raises(UsageError, match=r"bad\.bin does not hold CLIP ViT-L/14 image-tower weights"):
        load_clip(tmp_path / "bad.bin")
    with pytest.raises(UsageError, match="CLIP weights not found"):
        load_clip(tmp_path / "missing.bin")
    (tmp_path / "cut.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UsageError, match="CLIP weights"):
        load_clip(tmp_path / "cut.bin")


def test_fd_clip_through_the_api(monkeypatch, tmp_path):
    """fd_clip/kid_clip run the 'clip' detector on its 1024-d features (a tiny tower of the same class here)."""
    torch.manual_seed(2)
    tiny = CLIPVisionTower(width=32, layers=1, heads=2, patch=14).eval()
    with torch.no_grad():
        for p in tiny.parameters():
            p.normal_(0, 0.3)
    monkeypatch.setitem(detectors.LOADERS, "clip", lambda device, **kw: detectors.CLIPDetector(tiny, "torch"))
    detectors.clear_cache()
    rng = np.random.default_rng(3)
    real = [rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)]
    fake = [rng.integers(0, 128, (8, 32, 32, 3), dtype=np.uint8)]
    ref = api.compute_stats(iter(real), ["clip"], keep_features=True, progress=False)
    assert ref["fd_clip"]["mu"].shape == (32,) and ref["fd_clip"]["features"].dtype == np.float16
    got = api.calc_metrics(iter(fake), "fd_clip,kid_clip", ref=ref, device="cpu", progress=False)
    assert got["fd_clip"] > 0 and "kid_clip" in got
    same = api.calc_metrics(iter(real), "fd_clip", ref=ref, device="cpu", progress=False)
    assert abs(same["fd_clip"]) < 1e-6 * np.trace(ref["fd_clip"]["sigma"])
    detectors.clear_cache()
