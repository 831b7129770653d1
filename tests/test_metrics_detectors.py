"""Detectors: Inception-v3 (FID variant) and DINOv2 via timm, random weights built here."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics import dinov2, inception
from metrics.detectors import DINOv2Detector, InceptionDetector
from utils.errors import UsageError


# ---------------------------------------------------------------------------
# Inception


def _official_inception_state():
    """State dict with the public port's names: torchvision's Inception3 layout, 1008 classes, no aux head."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    state = net.state_dict()
    for k, v in state.items():  # non-trivial BN statistics
        if k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
        elif k.endswith("running_mean"):
            v.normal_(0, 0.1)
    return state


def _tf1_resize_numpy(img, size):
    """Independent TF1 resize_bilinear (align_corners=False, no half-pixel centres), float64."""
    c, h, w = img.shape
    out = np.zeros((c, size, size))
    for i in range(size):
        sy = i * h / size
        y0 = int(math.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
        for j in range(size):
            sx = j * w / size
            x0 = int(math.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
            top = img[:, y0, x0] * (1 - fx) + img[:, y0, x1] * fx
            bot = img[:, y1, x0] * (1 - fx) + img[:, y1, x1] * fx
            out[:, i, j] = top * (1 - fy) + bot * fy
    return out


@pytest.mark.parametrize("h,w,size", [(7, 11, 19), (20, 13, 9), (16, 16, 16)])
def test_tf1_resize_matches_direct_computation(h, w, size):
    rng = np.random.default_rng(h * w)
    img = rng.uniform(0, 255, (3, h, w))
    got = inception.tf1_resize_bilinear(torch.from_numpy(img).float()[None], size)[0].double().numpy()
    np.testing.assert_allclose(got, _tf1_resize_numpy(img, size), atol=2e-3)


def test_inception_loads_port_state_dict_and_runs(tmp_path, monkeypatch):
    state = _official_inception_state()
    path = tmp_path / "pt_inception-2015-12-05-random.pth"  # random weights: no sha256 prefix in the name
    torch.save(state, path)
    model = inception.load_inception(path)
    assert set(model.state_dict()) == set(state)
    # The default loader goes through utils.cache.fetch with the published URL.
    seen = []
    monkeypatch.setattr(inception, "fetch", lambda url, **kw: seen.append(url) or path)
    inception.load_inception()
    assert seen == [inception.INCEPTION_URL]

    x = torch.randint(0, 256, (2, 3, 32, 40), dtype=torch.uint8)
    with torch.no_grad():
        feats, logits = model(x)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    # Preprocessing: (resize(x) - 128) / 128.
    pre = model.preprocess(x)
    torch.testing.assert_close(pre, (inception.tf1_resize_bilinear(x.float()) - 128) / 128)
    # The detector's IS probabilities drop the output bias.
    out = InceptionDetector(model)(x)
    torch.testing.assert_close(out["features"], feats)
    expect = torch.softmax((logits - model.fc.bias).double(), dim=1)
    torch.testing.assert_close(out["probs"], expect, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(out["probs"], torch.softmax(logits.double(), dim=1), atol=1e-6)

    bad = dict(state)
    bad.pop("fc.bias")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="not the pt_inception"):
        inception.load_inception(tmp_path / "bad.pth")


def test_fid_blocks_pool_as_the_tf_graph():
    """Mixed_5b's pool ignores padding; Mixed_7c's pool branch is a max pool."""
    torch.manual_seed(1)
    a = inception.FIDInceptionA(4, pool_features=3).eval()
    x = torch.randn(1, 4, 5, 5)
    pooled = torch.zeros_like(x)
    xp = F.pad(x, (1, 1, 1, 1))
    ones = F.pad(torch.ones_like(x), (1, 1, 1, 1))
    for i in range(5):
        for j in range(5):
            pooled[..., i, j] = xp[..., i:i + 3, j:j + 3].sum((-1, -2)) / ones[..., i:i + 3, j:j + 3].sum((-1, -2))
    torch.testing.assert_close(a(x)[:, -3:], a.branch_pool(pooled))
    e = inception.FIDInceptionE_2(4).eval()
    xm = F.pad(x, (1, 1, 1, 1), value=-float("inf"))
    maxed = torch.stack([torch.stack([xm[..., i:i + 3, j:j + 3].amax((-1, -2)) for j in range(5)], -1)
                         for i in range(5)], -2)
    torch.testing.assert_close(e(x)[:, -192:], e.branch_pool(maxed))


@pytest.mark.parametrize("ours,theirs,args", [
    ("FIDInceptionA", "InceptionA", (192, 32)),
    ("FIDInceptionC", "InceptionC", (768, 128)),
    ("FIDInceptionE_1", "InceptionE", (1280,)),
    ("InceptionB", "InceptionB", (288,)),
    ("InceptionD", "InceptionD", (768,)),
])
def test_blocks_match_torchvision_except_padded_pools(ours, theirs, args):
    """Same names and weights as torchvision's blocks; the TF pools differ from them only on the border."""
    tv = pytest.importorskip("torchvision.models.inception")
    torch.manual_seed(4)
    ref = getattr(tv, theirs)(*args).eval()
    mine = getattr(inception, ours)(*args).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, args[0], 7, 7)
    with torch.no_grad():
        a, b = mine(x), ref(x)
    if ours == theirs:  # reduction blocks are unchanged
        torch.testing.assert_close(a, b)
    else:
        torch.testing.assert_close(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1])
        assert not torch.allclose(a[..., 0, :], b[..., 0, :])


# ---------------------------------------------------------------------------
# DINOv2


def _cubic(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def _official_resize_numpy(table, m, grid, offset=0.1):
    """Bicubic resize with scale factor (grid + offset) / m, source x = (d + 0.5) / scale - 0.5, clamped taps."""
    scale = (grid + offset) / m
    patches = table[1:].reshape(m, m, -1)

    def weights(d):
        src = (d + 0.5) / scale - 0.5
        base = math.floor(src)
        return [(min(max(base + k, 0), m - 1), _cubic(src - (base + k))) for k in (-1, 0, 1, 2)]

    out = np.zeros((grid, grid, patches.shape[-1]))
    for i in range(grid):
        for j in range(grid):
            for yi, wy in weights(i):
                for xj, wx in weights(j):
                    out[i, j] += wy * wx * patches[yi, xj]
    return np.concatenate([table[:1], out.reshape(grid * grid, -1)])


def test_pos_embed_resize_matches_official_formula():
    rng = np.random.default_rng(0)
    m, grid, dim = 37, 16, 3
    table = rng.standard_normal((1 + m * m, dim))
    got = dinov2.resize_pos_embed_official(torch.from_numpy(table).float()[None], grid)[0].double().numpy()
    np.testing.assert_allclose(got, _official_resize_numpy(table, m, grid), atol=1e-5)
    # timm's own resize (size=16, antialias) differs: the offset matters.
    plain = F.interpolate(torch.from_numpy(table[1:]).float().reshape(1, m, m, dim).permute(0, 3, 1, 2),
                          size=(grid, grid), mode="bicubic", antialias=True)
    assert not np.allclose(plain.permute(0, 2, 3, 1).reshape(-1, dim).numpy(), got[1:], atol=1e-3)


TINY = dict(embed_dim=32, depth=2, num_heads=2)


def _official_tiny_state():
    """A state dict as the official/timm checkpoints store it: 37x37 table (518 px) plus mask_token."""
    torch.manual_seed(2)
    net = dinov2.build_dinov2(img_size=518, **TINY)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["pos_embed"].normal_(0, 1)
    state["mask_token"] = torch.zeros(1, 32)
    return state


def test_dinov2_loads_weights_and_outputs_cls_token(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    state = _official_tiny_state()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    model = dinov2.load_dinov2(tmp_path / "model.safetensors", **TINY)
    torch.testing.assert_close(model.pos_embed, dinov2.resize_pos_embed_official(state["pos_embed"], 16))
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    torch.save(state, tmp_path / "official.pth")  # official .pth layout loads too
    torch.testing.assert_close(dinov2.load_dinov2(tmp_path / "official.pth", **TINY).pos_embed, model.pos_embed)

    seen = []  # the default loader goes through utils.cache.fetch with the published source
    monkeypatch.setattr(dinov2, "fetch", lambda src, **kw: seen.append(src) or tmp_path / "model.safetensors")
    dinov2.load_dinov2(**TINY)
    assert seen == [dinov2.DINOV2_SOURCE]

    x = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    det = DINOv2Detector(model)
    feats = det(x)["features"]
    assert feats.shape == (2, 32) and det.feature_dim == 32
    # EDM2 preprocessing then the CLS token after the final norm.
    pre = F.interpolate(x.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    pre = (pre - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    tokens = model.forward_features(pre)
    torch.testing.assert_close(feats, tokens[:, 0])
    # The PIL mode resizes uint8 images with PIL bicubic: close, not identical.
    pil = DINOv2Detector(model, resize_mode="pil")(x)["features"]
    assert pil.shape == feats.shape and torch.isfinite(pil).all()

    with pytest.raises(UsageError, match="does not hold DINOv2"):
        dinov2.load_dinov2(tmp_path / "official.pth", embed_dim=48, depth=2, num_heads=2)


def test_full_precision_restores_tf32_flags():
    from metrics.detectors import full_precision

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with full_precision():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
