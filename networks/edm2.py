"""EDM2 denoiser: the magnitude-preserving U-Net of Karras et al. (CVPR 2024) and its preconditioning.

Constructor arguments and parameter/buffer names follow the official release so
that official weights load with ``strict=True``.  The network runs on any
spatial size divisible by its downsampling factor ``2 ** (len(channel_mult) - 1)``,
which is what sliding-window guidance needs (windows smaller than the
nominal resolution).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .edits import EDIT_OPS, blur_tokens, check_edit

__all__ = ["Precond", "UNet", "Block", "MPConv", "MPFourier", "EDM2SizeError", "clear_weight_cache"]


class EDM2SizeError(ValueError):
    """Input spatial size the U-Net cannot process."""


# ----------------------------------------------------------------------------
# Magnitude-preserving primitives.

def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scale ``x`` to unit average magnitude over ``dim`` (all but batch by default)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, mode: str = "keep", f: Sequence[float] = (1, 1)) -> torch.Tensor:
    """2x down- or upsampling with a separable box-like filter ``f`` (``keep``: identity)."""
    if mode == "keep":
        return x
    f = np.float32(f)
    f = f / f.sum()
    kernel = torch.as_tensor(np.outer(f, f), dtype=x.dtype, device=x.device)[None, None]
    c = x.shape[1]
    if mode == "down":
        return F.conv2d(x, kernel.tile([c, 1, 1, 1]), groups=c, stride=2)
    if mode == "up":
        return F.conv_transpose2d(x, (kernel * 4).tile([c, 1, 1, 1]), groups=c, stride=2)
    raise ValueError(f"unknown resample mode {mode!r}")


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to preserve unit magnitude for unit-variance Gaussian input."""
    return F.silu(x).div_(0.596)  # in place on the fresh result: one large buffer less per call


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """``lerp(a, b, t)`` rescaled so that unit-magnitude inputs give a unit-magnitude output."""
    return a.lerp(b, t).div_(math.sqrt((1 - t) ** 2 + t ** 2))


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along ``dim`` with blend ``t`` that preserves the overall magnitude."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    wa = scale / math.sqrt(na) * (1 - t)
    wb = scale / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


class MPFourier(torch.nn.Module):
    """Random Fourier features ``sqrt(2) cos(2 pi (f x + phi))`` with fixed frequencies and phases."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        return (y.cos() * np.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Convolution (or linear layer for ``kernel=()``) with weights normalised to unit magnitude.

    At inference (eval mode, no autograd) the normalised, scaled weight of each
    dtype is computed once and kept (:meth:`_inference_weight`): the same
    operations in the same order as the training path, so the outputs are the
    same bit for bit, without re-normalising every weight on every call (five
    times per M-SWG evaluation).  Any change of the weight (optimizer step,
    ``load_state_dict``, ``.to()``) or of a tensor gain invalidates the copy;
    :func:`clear_weight_cache` drops all copies of a network (their memory).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.cache_weights = True  # set by Precond.forward (see CPU_WEIGHT_CACHE_BYTES)
        self._wcache: dict = {}

    def clear_cache(self) -> None:
        """Drop the cached inference weights."""
        self._wcache.clear()

    def cached_weight(self, dtype) -> Optional[torch.Tensor]:
        """The cached inference weight of ``dtype``, or None (not cached yet, or the cache is off)."""
        hit = self._wcache.get(dtype)
        return None if hit is None else hit[1]

    def _scaled_weight(self, gain, dtype) -> torch.Tensor:
        w = normalize(self.weight.to(torch.float32))
        w = w * (gain / np.sqrt(w[0].numel()))
        return w.to(dtype)

    def _inference_weight(self, gain, dtype) -> torch.Tensor:
        w = self.weight
        g = (id(gain), gain.data_ptr(), gain._version, gain.device) if isinstance(gain, torch.Tensor) else gain
        key = (dtype, w.device, w.dtype, id(w), w.data_ptr(), w._version, g)
        hit = self._wcache.get(dtype)
        if hit is None or hit[0] != key:
            hit = (key, self._scaled_weight(gain, dtype))
            self._wcache[dtype] = hit
        return hit[1]

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))  # forced weight normalisation
        # Not while torch.compile traces: the cache's bookkeeping (ids, data pointers) would break the graph
        # at every layer; traced, the normalisation is part of the graph (constants under inductor freezing).
        if (self.cache_weights and not self.training and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            w = self._inference_weight(gain, x.dtype)
        else:
            w = self._scaled_weight(gain, x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


# What this project adds to EDM2's modules for inference (the weight cache): not part of EDM2's pickles.
INFERENCE_ATTRS = ("_wcache", "cache_weights", "_cache_device", "weight_cache")
# On the CPU the cache holds a float32 copy of every weight; networks larger than this (L, XL, XXL:
# 3.1-6.1 GB of weights) are not cached there, so that XXL stays within 24 GB of RAM with M-SWG.
CPU_WEIGHT_CACHE_BYTES = 2 << 30


def clear_weight_cache(net: torch.nn.Module) -> None:
    """Drop the cached inference weights of every :class:`MPConv` in ``net``."""
    for m in net.modules():
        if isinstance(m, MPConv):
            m.clear_cache()
    if hasattr(net, "_cache_device"):
        net._cache_device = None


# ----------------------------------------------------------------------------
# U-Net.

class Block(torch.nn.Module):
    """Encoder or decoder block: optional resampling, residual branch, optional self-attention."""

    def __init__(self,
        in_channels:        int,                # Input channels.
        out_channels:       int,                # Output channels.
        emb_channels:       int,                # Embedding channels.
        flavor:             str = "enc",        # "enc" or "dec".
        resample_mode:      str = "keep",       # "keep", "up" or "down".
        resample_filter:    Sequence[int] = (1, 1),
        attention:          bool = False,       # Self-attention after the residual branch?
        channels_per_head:  int = 64,           # Channels per attention head.
        dropout:            float = 0,          # Dropout probability (training only).
        res_balance:        float = 0.3,        # Blend of the residual branch.
        attn_balance:       float = 0.3,        # Blend of the attention branch.
        clip_act:           Optional[float] = 256,  # Activation clipping.
    ):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    @property
    def keeps_shape(self) -> bool:
        """True when the output has the input's shape (no resampling, no change of channels): skippable."""
        return self.resample_mode == "keep" and self.conv_skip is None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, edit: Optional[tuple] = None) -> torch.Tensor:
        """``edit``: None, or ``(op, sigma)`` of :mod:`networks.edits` for this block (checked by the U-Net)."""
        if edit is not None and edit[0] == "skip":
            return x
        x = resample(x, mode=self.resample_mode, f=self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)  # [n, heads, channels, pixels] each
            if edit is None:
                # softmax(q^T k / sqrt(c)) v^T through the fused kernel (flash / memory-efficient on GPUs).
                y = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
            elif edit[0] == "identity":
                y = v.transpose(2, 3)  # identity attention map: each pixel's output is its own value
            else:  # "blur": the queries that enter the dot product, blurred over the pixel grid
                q = blur_tokens(q.transpose(2, 3), x.shape[2], x.shape[3], edit[1])
                y = F.scaled_dot_product_attention(q, k.transpose(2, 3), v.transpose(2, 3))
            y = self.attn_proj(y.transpose(2, 3).reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x


class UNet(torch.nn.Module):
    """The EDM2 U-Net (config G): magnitude-preserving everywhere, no biases, no group norms."""

    def __init__(self,
        img_resolution:     int,                # Nominal resolution (names the blocks; any divisible size runs).
        img_channels:       int,                # Image channels.
        label_dim:          int,                # Class label dimensionality, 0 = unconditional.
        model_channels:     int = 192,          # Base channels.
        channel_mult:       Sequence[int] = (1, 2, 3, 4),  # Per-level channel multipliers.
        channel_mult_noise: Optional[int] = None,  # Noise embedding multiplier (None = channel_mult[0]).
        channel_mult_emb:   Optional[int] = None,  # Embedding multiplier (None = max(channel_mult)).
        num_blocks:         int = 3,            # Residual blocks per level.
        attn_resolutions:   Sequence[int] = (16, 8),  # Levels (by nominal resolution) with attention.
        label_balance:      float = 0.5,        # Blend of noise and class embeddings.
        concat_balance:     float = 0.5,        # Blend of skip connections.
        **block_kwargs,                         # Passed on to Block.
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.num_levels = len(cblock)
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="enc", attention=(res in attn_resolutions), **block_kwargs)

        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="dec", attention=(res in attn_resolutions), **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def block_names(self) -> list:
        """Every :class:`Block`, encoder then decoder, in call order (``"enc.16x16_block0"`` ...); index = position."""
        return [f"{part}.{name}" for part, blocks in (("enc", self.enc), ("dec", self.dec))
                for name, block in blocks.items() if isinstance(block, Block)]

    def edit_blocks(self, op: str) -> dict:
        """``{index: name}`` of the blocks where edit ``op`` applies (:mod:`networks.edits`).

        ``identity`` and ``blur`` need self-attention (the 16x16 and 8x8 levels of the
        released networks, and the decoder's first block); ``skip`` needs a block whose
        output has its input's shape (decoder blocks take the concatenated skip
        connection, resampling blocks change the size, and first blocks of a level the channels).
        """
        if op not in EDIT_OPS:
            raise ValueError(f"unknown block edit {op!r}; use one of {', '.join(EDIT_OPS)}")
        blocks = [b for part in (self.enc, self.dec) for b in part.values() if isinstance(b, Block)]
        ok = (lambda b: b.keeps_shape) if op == "skip" else (lambda b: b.num_heads > 0)
        return {i: name for i, (name, b) in enumerate(zip(self.block_names(), blocks)) if ok(b)}

    def _block_edits(self, edit) -> dict:
        op, chosen, sigma = check_edit(edit, self.edit_blocks)
        names = self.block_names()
        return {names[i]: (op, sigma) for i in chosen}

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this (one halving per level below the first)."""
        return 2 ** (self.num_levels - 1)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
                edit=None) -> torch.Tensor:
        """``edit``: None, or a block edit of :mod:`networks.edits` for this call only."""
        edits = self._block_edits(edit) if edit is not None else None
        m = self.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m or x.shape[-1] < m or x.shape[-2] < m:
            raise EDM2SizeError(
                f"EDM2 U-Net input {tuple(x.shape[-2:])} is not a multiple of {m} "
                f"(one halving per level); use a window size divisible by {m}")
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            if name.endswith("_conv"):
                x = block(x)
            else:
                x = block(x, emb) if edits is None else block(x, emb, edits.get(f"enc.{name}"))
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb) if edits is None else block(x, emb, edits.get(f"dec.{name}"))
        return self.out_conv(x, gain=self.out_gain)


class Precond(torch.nn.Module):
    """EDM preconditioning around the U-Net: ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``.

    ``c_skip = s_d^2 / (sigma^2 + s_d^2)``, ``c_out = sigma s_d / sqrt(sigma^2 + s_d^2)``,
    ``c_in = 1 / sqrt(sigma^2 + s_d^2)``, ``c_noise = ln(sigma) / 4`` with ``s_d = sigma_data``.
    Optionally returns the learned log-variance ``u(sigma)`` of the training loss.
    """

    def __init__(self,
        img_resolution:     int,                # Nominal image resolution.
        img_channels:       int,                # Image channels.
        label_dim:          int,                # Class label dimensionality, 0 = unconditional.
        use_fp16:           bool = True,        # Run the U-Net in float16 on CUDA.
        sigma_data:         float = 0.5,        # Expected standard deviation of the data.
        logvar_channels:    int = 128,          # Fourier channels of the log-variance head.
        **unet_kwargs,                          # Passed on to UNet.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])
        self.weight_cache = True  # use_weight_cache(False): re-normalise every weight on every call

    def use_weight_cache(self, enabled: bool = True) -> None:
        """Cache the normalised inference weights (the default; bit-identical) or, ``False``, re-normalise every
        weight on every call, as the reference does.  Takes effect at the next call."""
        self.weight_cache = bool(enabled)
        clear_weight_cache(self)

    def caches_weights_on(self, device) -> bool:
        """Whether calls on ``device`` use the weight cache: when enabled, except for networks on the CPU
        larger than :data:`CPU_WEIGHT_CACHE_BYTES` (a first call then costs no more than the next)."""
        nbytes = sum(p.numel() * 4 for p in self.unet.parameters())
        return self.weight_cache and (torch.device(device).type != "cpu" or nbytes <= CPU_WEIGHT_CACHE_BYTES)

    def _choose_weight_cache(self, device: torch.device) -> None:
        """Cache inference weights (see :class:`MPConv`) except for large networks on the CPU."""
        if getattr(self, "_cache_device", None) == device.type:
            return
        enabled = self.caches_weights_on(device)
        for m in self.unet.modules():
            if isinstance(m, MPConv):
                m.cache_weights = enabled
                if not enabled:
                    m.clear_cache()
        self._cache_device = device.type

    def block_names(self) -> list:
        """The U-Net's blocks in call order (see :meth:`UNet.block_names`)."""
        return self.unet.block_names()

    def edit_blocks(self, op: str) -> dict:
        """``{index: name}`` of the blocks where edit ``op`` applies (see :meth:`UNet.edit_blocks`)."""
        return self.unet.edit_blocks(op)

    def forward(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, return_logvar: bool = False, edit=None):
        """``D(x; sigma, c)``; ``edit`` (:mod:`networks.edits`) changes chosen blocks for this call only."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)  # all-zero label vector
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and x.device.type == "cuda" and not force_fp32) else torch.float32

        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        self._choose_weight_cache(x.device)
        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels) if edit is None else \
            self.unet((c_in * x).to(dtype), c_noise, class_labels, edit=edit)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x
