"""Train a tiny EDM2 denoiser (``networks.edm2.Precond``) on the digits, with EDM2's recipe, on a CPU.

    python -m training.train_edm2 --out demo/models/digits-cond --steps 600 --seed 0
    python -m training.train_edm2 --data quad-digits --resolution 32 --out demo/models/quad-cond ...

``--data digits`` trains on the 16x16 digits of :mod:`training.data`;
``--data quad-digits`` on its 32x32 long-range images (2x2 grids of one class,
:func:`training.data.load_quad_digits`, ``--num-images`` of them drawn with
``--data-seed``).

Recipe (Karras et al., "Analyzing and Improving the Training Dynamics of
Diffusion Models", CVPR 2024), reimplemented here:

* noise levels are log-normal, ``ln sigma ~ N(P_mean, P_std^2)`` (EDM2's
  pixel-space values ``P_mean = -0.8``, ``P_std = 1.6`` by default);
* the loss of one image is ``sum_pixels  lambda(sigma) / exp(u(sigma)) * (D(x + n; sigma) - x)^2 + u(sigma)``
  with ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` and the
  network's learned log-variance ``u(sigma)`` (uncertainty weighting); the batch
  loss is the sum over pixels averaged over images;
* forced weight normalisation: every ``MPConv`` renormalises its stored weight
  in training mode (done by the network itself);
* Adam (``betas = (0.9, 0.99)``, ``eps = 1e-8``) with EDM2's learning-rate schedule
  ``lr(t) = ref_lr / sqrt(max(t / t_ref, 1)) * min(t / t_rampup, 1)`` where ``t``
  counts training images, ``t_ref = ref_batches * batch`` and ``t_rampup = rampup_kimg * 1000``;
* a power-function EMA (EDM2's ``PowerFunctionEMA``): after ``t`` images,
  ``ema <- beta ema + (1 - beta) net`` with ``beta = (1 - batch / t)^(gamma + 1)``, where
  ``gamma`` solves ``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))`` for the
  relative width ``--ema-std`` (EDM2's snapshots use 0.100).

Reduced-training (RT) negatives are snapshots of the same run at ``T/16`` steps
(``--snapshot STEP:PATH``), as EDM2's raw snapshots are; the EMA snapshot at
that step is saved.  Everything is seeded (``--seed``): initial weights, batch
order, noise levels and noise.  The output is ``PATH.safetensors`` (the EMA
network's state dict, float16 or float32) and ``PATH.json`` with the ``Precond``
constructor arguments in the project's plain-checkpoint format
(:func:`networks.edm2_pickle.load_checkpoint` reads it) plus the training settings.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pathlib
import sys
import time
from typing import Callable, Optional, Sequence

import click
import numpy as np
import torch

from networks.edm2 import Precond
from networks.edm2_pickle import PLAIN_FORMAT, write_plain
from training.data import NUM_CLASSES, load_digits_images, load_quad_digits, one_hot
from utils.cli import CONTEXT, run_command
from utils.errors import INTERRUPTED_RESTART, UsageError, exit_on_usage_error

__all__ = ["TrainConfig", "edm2_loss", "learning_rate", "ema_exponent", "PowerEMA", "build_net", "train",
           "save_checkpoint", "main"]



@dataclasses.dataclass
class TrainConfig:
    """Everything that determines a training run (saved in the checkpoint's JSON)."""

    data: str = "digits"                    # 'digits' (16x16) or 'quad-digits' (32x32 long-range grids)
    num_images: int = 16384                 # quad-digits only: size of the fixed training set
    data_seed: int = 0                      # quad-digits only: seed of its composition
    resolution: int = 16
    cond: bool = True                       # Class-conditional (label_dim 10) or unconditional (0).
    model_channels: int = 32
    channel_mult: Sequence[int] = (1, 2, 2)
    num_blocks: int = 1
    attn_resolutions: Sequence[int] = ()
    channels_per_head: int = 64
    dropout: float = 0.0
    sigma_data: float = 0.5
    P_mean: float = -0.8
    P_std: float = 1.6
    batch: int = 128
    steps: int = 600
    ref_lr: float = 1e-2
    ref_batches: float = 100                # t_ref in batches (inverse-sqrt decay starts there).
    rampup_kimg: float = 2.0
    ema_std: float = 0.10
    seed: int = 0
    threads: int = 2
    device: str = "cpu"

    def net_kwargs(self) -> dict:
        return dict(img_resolution=self.resolution, img_channels=1, label_dim=NUM_CLASSES if self.cond else 0,
                    use_fp16=False, sigma_data=self.sigma_data, model_channels=self.model_channels,
                    channel_mult=list(self.channel_mult), num_blocks=self.num_blocks,
                    attn_resolutions=list(self.attn_resolutions), channels_per_head=self.channels_per_head,
                    dropout=self.dropout)


# ----------------------------------------------------------------------------
# EDM2 loss, learning rate and EMA.

def edm2_loss(net, images: torch.Tensor, labels: Optional[torch.Tensor], P_mean: float, P_std: float,
              sigma_data: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-pixel uncertainty-weighted EDM2 loss ``lambda / e^u (D - x)^2 + u`` (shape of ``images``)."""
    n = images.shape[0]
    # Drawn on the CPU (from ``generator``) so that a seed gives the same draws on every device.
    rnd = torch.randn([n, 1, 1, 1], generator=generator).to(images.device)
    sigma = (rnd * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    noise = torch.randn(images.shape, generator=generator).to(images.device) * sigma
    denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
    return weight / logvar.exp() * (denoised - images) ** 2 + logvar


def learning_rate(cur_nimg: float, batch: int, ref_lr: float, ref_batches: float, rampup_kimg: float) -> float:
    """EDM2's schedule: ``ref_lr / sqrt(max(t / (ref_batches batch), 1)) * min(t / rampup, 1)``."""
    lr = ref_lr
    if ref_batches > 0:
        lr /= math.sqrt(max(cur_nimg / (ref_batches * batch), 1))
    if rampup_kimg > 0:
        lr *= min(cur_nimg / (rampup_kimg * 1000), 1)
    return lr


def ema_exponent(std: float) -> float:
    """Power-function exponent ``gamma`` whose EMA profile has relative width ``std``.

    Solves ``std^2 (gamma + 2)^2 (gamma + 3) = gamma + 1``, i.e. the cubic
    ``gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2) = 0``, largest real root.
    """
    s = std ** -2
    roots = np.roots([1, 7, 16 - s, 12 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


class PowerEMA:
    """EMA with ``beta = (1 - batch / t)^(gamma + 1)`` after ``t`` training images (EDM2's power-function EMA)."""

    def __init__(self, net: torch.nn.Module, std: float):
        self.gamma = ema_exponent(std)
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module, cur_nimg: int, batch: int) -> None:
        beta = (1 - batch / cur_nimg) ** (self.gamma + 1)
        for p_ema, p in zip(self.net.parameters(), net.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)


# ----------------------------------------------------------------------------
# Training.

DATASETS = ("digits", "quad-digits")


def load_data(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels ``cfg`` names (``cfg.data``)."""
    if cfg.data == "quad-digits":
        if cfg.resolution != 32:
            raise UsageError(f"--data quad-digits makes 32x32 images; pass --resolution 32, not {cfg.resolution}")
        return load_quad_digits(cfg.num_images, seed=cfg.data_seed, split="train")
    if cfg.data != "digits":
        raise UsageError(f"unknown --data {cfg.data!r}; choose one of {', '.join(DATASETS)}")
    return load_digits_images(cfg.resolution, split="train")

def build_net(cfg: TrainConfig) -> torch.nn.Module:

    return Precond(**cfg.net_kwargs())


def train(cfg: TrainConfig, snapshots: Optional[dict[int, Callable]] = None,
          log: Optional[Callable[[str], None]] = None, data=None) -> dict:
    """Run the training; returns ``{'net', 'ema', 'losses', 'seconds'}``.

    ``snapshots`` maps a step count to a callback ``fn(ema_net, step)`` called
    when that many steps are done.  ``data`` overrides the images/labels.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    images, labels = data if data is not None else load_data(cfg)
    images = images.to(device)
    cond = one_hot(labels).to(device) if cfg.cond else None
    net = build_net(cfg).train().requires_grad_(True).to(device)
    ema = PowerEMA(net, cfg.ema_std)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.ref_lr, betas=(0.9, 0.99), eps=1e-8)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    snapshots = dict(snapshots or {})
    t0 = time.time()
    for step in range(cfg.steps):
        if len(order) < cfg.batch:  # reshuffle once an epoch is used up (fixed by the seed)
            order = torch.cat([order, torch.randperm(len(images), generator=gen)])
        idx, order = order[:cfg.batch], order[cfg.batch:]
        idx = idx.to(device)
        batch_labels = cond[idx] if cond is not None else None
        loss = edm2_loss(net, images[idx], batch_labels, cfg.P_mean, cfg.P_std, cfg.sigma_data, generator=gen)
        cur_nimg = step * cfg.batch
        lr = learning_rate(cur_nimg + cfg.batch / 2, cfg.batch, cfg.ref_lr, cfg.ref_batches, cfg.rampup_kimg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.sum().div(cfg.batch).backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
        opt.step()
        ema.update(net, (step + 1) * cfg.batch, cfg.batch)
        losses.append(float(loss.detach().mean()))
        if log is not None and ((step + 1) % 50 == 0 or step == 0 or step + 1 == cfg.steps):
            log(f"step {step + 1:5d}/{cfg.steps}  loss {np.mean(losses[-50:]):.4f}  lr {lr:.5f}  "
                f"{time.time() - t0:.0f}s")
        if step + 1 in snapshots:
            snapshots.pop(step + 1)(ema.net, step + 1)
    return {"net": net.eval(), "ema": ema.net, "losses": losses, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------
# Checkpoints.

def _paths(out: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    out = pathlib.Path(out)
    if out.suffix == ".safetensors":
        out = out.with_suffix("")
    return out.with_name(out.name + ".safetensors"), out.with_name(out.name + ".json")


def check_free(out: str | pathlib.Path) -> None:
    """Refuse to overwrite a finished checkpoint."""
    for p in _paths(out):
        if p.exists():
            raise UsageError(f"{p} already exists; remove it or choose another --out")


def save_checkpoint(net: torch.nn.Module, cfg: TrainConfig, out: str | pathlib.Path, dtype: str = "float16",
                    extra: Optional[dict] = None) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``out.safetensors`` (state dict) and ``out.json`` (constructor args, training settings) atomically."""
    weights, meta_path = _paths(out)
    check_free(out)
    weights.parent.mkdir(parents=True, exist_ok=True)
    dt = {"float16": torch.float16, "float32": torch.float32}[dtype]
    state = {k: v.detach().cpu().to(dt if v.is_floating_point() else v.dtype).contiguous()
             for k, v in net.state_dict().items()}
    meta = {"format": PLAIN_FORMAT, "class_name": "Precond", "init_kwargs": cfg.net_kwargs(),
            "encoder": {"class_name": "StandardRGBEncoder"}, "source": "training.train_edm2",
            "other": {"training": {**dataclasses.asdict(cfg), **(extra or {})}}}
    meta["other"]["training"]["channel_mult"] = list(cfg.channel_mult)
    meta["other"]["training"]["attn_resolutions"] = list(cfg.attn_resolutions)
    write_plain(state, meta, weights, meta_path)
    return weights, meta_path


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()] if text else []
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated integers like '1,2,2', got {text!r}") from None


def _snapshot_specs(specs: Sequence[str], steps: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for spec in specs:
        step, sep, path = spec.partition(":")
        if not sep or not step.strip().isdigit() or not path:
            raise UsageError(f"--snapshot {spec!r}: expected STEP:PATH, e.g. 37:demo/models/digits-rt")
        if not 0 < int(step) <= steps:
            raise UsageError(f"--snapshot {spec!r}: step must lie in 1..{steps} (--steps)")
        out[int(step)] = path
    return out


@click.command(context_settings=CONTEXT)
@click.option("--out", required=True, help="Output path without suffix: writes OUT.safetensors and OUT.json.")
@click.option("--uncond", is_flag=True, help="Unconditional model (label_dim 0), e.g. the CFG negative.")
@click.option("--data", type=click.Choice(DATASETS), default="digits", show_default=True,
              help="Training set: 16x16 digits or 32x32 long-range grids of one class.")
@click.option("--num-images", type=int, default=16384, show_default=True, help="quad-digits: training set size.")
@click.option("--data-seed", type=int, default=0, show_default=True, help="quad-digits: seed of the set.")
@click.option("--resolution", type=int, default=16, show_default=True, help="Training resolution (digits are 8x8, upsampled).")
@click.option("--model-channels", type=int, default=32, show_default=True)
@click.option("--channel-mult", default="1,2,2", show_default=True)
@click.option("--num-blocks", type=int, default=1, show_default=True)
@click.option("--attn-resolutions", default="", show_default=True, help="Comma list, e.g. '4'.")
@click.option("--batch", type=int, default=128, show_default=True)
@click.option("--steps", type=int, default=600, show_default=True, help="Training iterations T.")
@click.option("--lr", "ref_lr", type=float, default=1e-2, show_default=True, help="Reference learning rate.")
@click.option("--lr-ref-batches", "ref_batches", type=float, default=100, show_default=True,
              help="Batches after which the inverse-sqrt decay starts.")
@click.option("--rampup-kimg", type=float, default=2.0, show_default=True)
@click.option("--P-mean", "P_mean", type=float, default=-0.8, show_default=True)
@click.option("--P-std", "P_std", type=float, default=1.6, show_default=True)
@click.option("--ema-std", type=float, default=0.10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads (torch.set_num_threads).")
@click.option("--device", default="cpu", show_default=True, help="'cpu' or 'cuda' (random draws stay on the CPU).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage dtype of the saved weights.")
@click.option("--snapshot", "snapshot", multiple=True, help="STEP:PATH, also save the EMA after STEP steps (RT negative).")
@exit_on_usage_error(interrupted=INTERRUPTED_RESTART)
def main(out, uncond, data, num_images, data_seed, resolution, model_channels, channel_mult, num_blocks, attn_resolutions, batch, steps, ref_lr,
         ref_batches, rampup_kimg, P_mean, P_std, ema_std, seed, threads, device, dtype, snapshot):
    """Train a tiny EDM2 model on scikit-learn's digits with EDM2's loss, schedule and EMA."""
    if steps < 1 or batch < 1:
        raise UsageError("--steps and --batch must be positive")
    mult = _int_list(channel_mult, "--channel-mult")
    if not mult:
        raise UsageError("--channel-mult: give at least one multiplier, e.g. '1,2,2'")
    if resolution % (2 ** (len(mult) - 1)):
        raise UsageError(f"--resolution {resolution} is not divisible by 2^{len(mult) - 1} "
                         f"(one halving per --channel-mult level); use e.g. 16 with '1,2,2'")
    if num_images < 1:
        raise UsageError("--num-images must be positive")
    cfg = TrainConfig(data=data, num_images=num_images, data_seed=data_seed, resolution=resolution, cond=not uncond, model_channels=model_channels, channel_mult=mult,
                      num_blocks=num_blocks, attn_resolutions=_int_list(attn_resolutions, "--attn-resolutions"),
                      batch=batch, steps=steps, ref_lr=ref_lr, ref_batches=ref_batches, rampup_kimg=rampup_kimg,
                      P_mean=P_mean, P_std=P_std, ema_std=ema_std, seed=seed, threads=threads,
                      device=device)
    if data == "quad-digits" and resolution != 32:
        raise UsageError(f"--data quad-digits makes 32x32 images; pass --resolution 32, not {resolution}")
    specs = _snapshot_specs(snapshot, steps)
    for path in [out, *specs.values()]:
        check_free(path)

    def snap(ema_net, step, path):
        for p in save_checkpoint(ema_net, cfg, path, dtype, extra={"snapshot_step": step}):
            print(f"saved {p}")

    callbacks = {step: (lambda net, s, p=path: snap(net, s, p)) for step, path in specs.items()}
    result = train(cfg, snapshots=callbacks, log=print)
    for p in save_checkpoint(result["ema"], cfg, out, dtype,
                             extra={"snapshot_step": steps, "train_seconds": round(result["seconds"], 1),
                                    "final_loss": round(float(np.mean(result["losses"][-50:])), 4)}):
        print(f"saved {p}")
    print(f"trained {steps} steps in {result['seconds']:.0f}s")


if __name__ == "__main__":  # click's usage errors as one line, exit 2 (utils.cli.run_command)
    sys.exit(run_command(main, None, "python -m training.train_edm2"))
