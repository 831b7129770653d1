"""The demo's feature detector: a small CNN digit classifier (trained by ``training.train_classifier``).

It plays, for 16x16 digits, the role Inception-v3 plays for ImageNet:

* ``features(images)`` -> ``[N, 128]`` penultimate activations, for a Fréchet
  distance ``FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` against the
  shipped training-set statistics (``demo/refs/digits-ref.pkl``, key ``fd_digits``);
* ``probs(images)`` -> ``[N, 10]`` softmax class probabilities, for an
  IS-like confidence score ``exp(E_x KL(p(y|x) || p(y)))`` (10 = every image
  confidently one digit and all digits equally often; 1 = no information).

Input: uint8 images ``[N, C, H, W]`` (``C`` 1 or 3; RGB is averaged to grey),
resized to 16x16 with antialiased bilinear filtering if needed, then mapped to
``[-1, 1]`` as in :mod:`training.data`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from utils.atomic import atomic_path
from utils.errors import UsageError

__all__ = ["DigitsClassifier", "DigitsDetector", "DEFAULT_CLASSIFIER", "DEFAULT_REF", "FEATURE_DIM",
           "confidence_score", "load_classifier", "save_classifier"]

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CLASSIFIER = REPO / "demo" / "models" / "digits-classifier.safetensors"
DEFAULT_REF = REPO / "demo" / "refs" / "digits-ref.pkl"
FEATURE_DIM = 128
METRIC = "fd_digits"


class DigitsClassifier(torch.nn.Module):
    """conv-conv-pool-conv-conv-pool-linear(features)-linear(logits) on 1x16x16 inputs in ``[-1, 1]``."""

    def __init__(self, resolution: int = 16, channels: int = 32, feature_dim: int = FEATURE_DIM,
                 num_classes: int = 10):
        super().__init__()
        self.resolution = resolution
        c = channels
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.GELU(), torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(c, 2 * c, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1), torch.nn.GELU(), torch.nn.AvgPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(2 * c * (resolution // 4) ** 2, feature_dim), torch.nn.GELU(),
        )
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f = self.body(x)
        logits = self.head(f)
        return (logits, f) if return_features else logits


def save_classifier(net: DigitsClassifier, path: str | pathlib.Path, extra: Optional[dict] = None) -> None:
    """``path`` (.safetensors, float32) + sidecar ``.json`` with constructor args; refuses to overwrite."""
    import safetensors.torch

    path = pathlib.Path(path)
    meta_path = path.with_suffix(".json")
    for p in (path, meta_path):
        if p.exists():
            raise UsageError(f"{p} already exists; remove it or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()}
    meta = {"class_name": "DigitsClassifier",
            "init_kwargs": dict(resolution=net.resolution, channels=net.body[0].out_channels,
                                feature_dim=net.head.in_features, num_classes=net.head.out_features),
            **(extra or {})}
    with atomic_path(path) as tmp_w, atomic_path(meta_path) as tmp_m:
        safetensors.torch.save_file(state, tmp_w)
        pathlib.Path(tmp_m).write_text(json.dumps(meta, indent=2) + "\n")


def load_classifier(path: str | pathlib.Path = DEFAULT_CLASSIFIER) -> DigitsClassifier:
    """Rebuild the classifier from ``.safetensors`` + ``.json`` (no code execution)."""
    import safetensors.torch

    path = pathlib.Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise UsageError(f"digit classifier not found at {path} (+ .json); train it with "
                         f"python -m training.train_classifier")
    meta = json.loads(meta_path.read_text())
    net = DigitsClassifier(**meta["init_kwargs"])
    net.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    return net.eval().requires_grad_(False)


class DigitsDetector:
    """Detector interface: ``features(uint8 NCHW) -> [N, 128]``, ``probs(uint8 NCHW) -> [N, 10]`` (float64 numpy).

    Registered as ``metrics.detectors.LOADERS['digits']`` (metrics ``fd_digits``, ``conf_digits``).
    """

    name = "digits"
    feature_dim = FEATURE_DIM
    metric = METRIC

    def __init__(self, path: str | pathlib.Path = DEFAULT_CLASSIFIER, device="cpu", batch: int = 512):
        self.net = load_classifier(path).to(device)
        self.device = torch.device(device)
        self.batch = batch

    def preprocess(self, images) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` -> float ``[N, 1, 16, 16]`` in ``[-1, 1]``."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise UsageError(f"digit detector expects uint8 images [N, 1 or 3, H, W], got shape {tuple(x.shape)}")
        # The channel sum of integers is exact in float32, so for equal channels sum / (255 C) is pixel / 255
        # (exactly, on the CPU): a grey image read as RGB (as metrics.api reads it) scores like the grey original.
        x = x.to(self.device, torch.float32).sum(dim=1, keepdim=True) / (255.0 * x.shape[1])
        r = self.net.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return x * 2 - 1

    @torch.no_grad()
    def _run(self, images):
        x = self.preprocess(images)
        logits, feats = [], []
        for i in range(0, len(x), self.batch):
            l, f = self.net(x[i:i + self.batch], return_features=True)
            logits.append(l)
            feats.append(f)
        return torch.cat(logits).double().cpu(), torch.cat(feats).double().cpu()

    def features(self, images) -> np.ndarray:
        return self._run(images)[1].numpy()

    def probs(self, images) -> np.ndarray:
        return self._run(images)[0].softmax(dim=1).numpy()

    def __call__(self, images) -> dict:
        """The metrics package's detector call: ``{'features': [N, 128], 'probs': [N, 10]}`` (float64 tensors)."""
        logits, feats = self._run(images)
        return {"features": feats, "probs": logits.softmax(dim=1)}

    def features_and_probs(self, images) -> tuple[np.ndarray, np.ndarray]:
        logits, feats = self._run(images)
        return feats.numpy(), logits.softmax(dim=1).numpy()


def confidence_score(probs: np.ndarray, eps: float = 1e-12) -> float:
    """IS-like score ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the mean of ``p(y|x)``; in ``[1, 10]``."""
    p = np.asarray(probs, dtype=np.float64)
    py = p.mean(axis=0, keepdims=True)
    kl = (p * (np.log(p + eps) - np.log(py + eps))).sum(axis=1)
    return float(np.exp(kl.mean()))
