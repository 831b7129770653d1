"""Diffusion Transformer (DiT, Peebles & Xie 2023) with the official constructor and state-dict names.

The network predicts, for a latent ``x`` of shape ``[N, C, H, W]``, integer
timesteps ``t`` and class labels ``y``, the noise ``eps`` (``C`` channels)
followed by ``C`` values ``v`` in ``[-1, 1]`` that interpolate the log-variance
(learned sigma)::

    tokens = PatchEmbed(x) + P                      # P: fixed 2-D sin-cos table
    c      = MLP(sinusoid(t)) + Embedding(y)        # y == num_classes is the null class
    tokens = Block_k(tokens, c)  k = 1..depth       # adaLN-Zero transformer blocks
    out    = unpatchify(Linear(modulate(LN(tokens), c)))

Inputs smaller than the trained ``input_size`` (the windows of sliding window
guidance) need a position table for their own patch grid ``g_h x g_w``.  The
reference resizes the trained ``G x G`` table with bicubic interpolation
(``pos_embed="resize"``, the default); ``pos_embed="sincos"`` evaluates the
exact sin-cos table of the smaller grid instead.

Parameter names follow ``facebookresearch/DiT`` exactly (``x_embedder.proj``,
``t_embedder.mlp``, ``y_embedder.embedding_table``, ``blocks.{i}.attn.qkv``,
``blocks.{i}.adaLN_modulation.1``, ``final_layer.linear``, ``pos_embed``), so the
released ``DiT-XL-2-{256,512}.pt`` files and ``train.py`` checkpoints load as is.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention

from utils.errors import UsageError
from utils.safe_load import load_weights

from .edits import EDIT_OPS, blur_tokens, check_edit

__all__ = [
    "DiT", "DiT_models", "create_dit", "sincos_pos_embed_2d", "resize_pos_embed",
    "load_dit_state_dict", "PRETRAINED_DIT", "DiTSizeError",
]


class DiTSizeError(UsageError):
    """An input whose spatial size or channel count the network cannot process."""


# ----------------------------------------------------------------------------
# Position and timestep embeddings.

def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000^(-k / (dim/2))``, k < dim/2 (float64)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: Optional[int] = None) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``[grid_h * grid_w, dim]`` (row-major tokens).

    The first ``dim/2`` features encode the column index and the last ``dim/2``
    the row index (the MAE / DiT convention, where the mesh grid lists ``w`` first).
    """
    if dim % 4 != 0:
        raise ValueError(f"the sin-cos table needs a hidden size divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32),
                             indexing="ij")
    table = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float()


def resize_pos_embed(table: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """Resize a position table ``[1, G_h*G_w, D]`` to ``[1, g_h*g_w, D]`` by bicubic interpolation.

    Treats the table as a ``D``-channel image of ``G_h x G_w`` pixels and
    resamples it with ``F.interpolate(mode="bicubic", align_corners=False)`` in
    float32, without anti-aliasing: the resizing of the reference's windows
    (golden ``dit_out_crop10``; timm's anti-aliased default differs by ~4%).
    """
    if tuple(old_grid) == tuple(new_grid):
        return table
    dim = table.shape[-1]
    image = table.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, -1, dim).to(table.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(t * f_k), sin(t * f_k)]`` with ``f_k = max_period^(-k / (dim/2))`` (GLIDE), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``shift``/``scale`` broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """``t -> Linear(SiLU(Linear(sinusoid(t))))`` (names ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row (index ``num_classes``) for the null class.

    The null row exists when the model was trained with label dropout
    (``dropout_prob > 0``), as every released DiT was.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, train: bool = False) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block.

    ``(b1, s1, g1, b2, s2, g2) = Linear(SiLU(c))``;
    ``x += g1 * Attn(modulate(LN(x), b1, s1))``; ``x += g2 * MLP(modulate(LN(x), b2, s2))``.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=functools.partial(nn.GELU, approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, edit: Optional[tuple] = None) -> torch.Tensor:
        """``edit``: None, or ``(op, sigma, (grid_h, grid_w))`` of :mod:`networks.edits` for this block."""
        if edit is not None and edit[0] == "skip":
            return x
        b1, s1, g1, b2, s2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), b1, s1)
        x = x + g1.unsqueeze(1) * (self.attn(h) if edit is None else self._edited_attention(h, *edit))
        x = x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), b2, s2))
        return x

    def _edited_attention(self, x: torch.Tensor, op: str, sigma: float, grid: Tuple[int, int]) -> torch.Tensor:
        """timm's ``Attention.forward`` with the identity map (``V``) or blurred queries."""
        attn = self.attn
        n, t, _ = x.shape
        q, k, v = attn.qkv(x).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if op == "identity":
            y = v
        else:  # "blur": the queries that enter the dot product, blurred over the token grid
            q = blur_tokens(attn.q_norm(q), grid[0], grid[1], sigma)
            y = F.scaled_dot_product_attention(q, attn.k_norm(k), v)
        y = attn.norm(y.transpose(1, 2).reshape(n, t, attn.attn_dim))
        return attn.proj_drop(attn.proj(y))


class FinalLayer(nn.Module):
    """``Linear(modulate(LN(x), shift, scale))`` to ``patch_size^2 * out_channels`` values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------
# The network.

POS_EMBED_MODES = ("resize", "sincos")


class DiT(nn.Module):
    """Class-conditional DiT; ``forward(x, t, y) -> [eps, v]`` (``2C`` channels with learned sigma).

    Constructor arguments are the official ones. ``pos_embed`` chooses the
    position table for inputs smaller than ``input_size`` (see the module doc):
    ``"resize"`` (reference, bicubic) or ``"sincos"`` (exact table of the smaller grid).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        pos_embed: str = "resize",
    ):
        super().__init__()
        if pos_embed not in POS_EMBED_MODES:
            raise UsageError(f"unknown position-table mode {pos_embed!r}; use one of {', '.join(POS_EMBED_MODES)}")
        if input_size % patch_size != 0:
            raise UsageError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.pos_embed_mode = pos_embed
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True,
                                     strict_img_size=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Label of the unconditional (dropped-label) embedding."""
        return self.num_classes

    @property
    def has_null_class(self) -> bool:
        return self.y_embedder.embedding_table.num_embeddings > self.num_classes

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, sin-cos table, zeroed adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size)[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position table ``[1, grid_h * grid_w, D]`` for a ``grid_h x grid_w`` patch grid."""
        if (grid_h, grid_w) == (self.grid_size, self.grid_size):
            return self.pos_embed
        if self.pos_embed_mode == "sincos":
            return sincos_pos_embed_2d(self.pos_embed.shape[-1], grid_h, grid_w)[None].to(self.pos_embed)
        return resize_pos_embed(self.pos_embed, (self.grid_size, self.grid_size), (grid_h, grid_w))

    def check_input(self, x: torch.Tensor) -> Tuple[int, int]:
        """Validate ``x`` and return its patch grid; raises :class:`DiTSizeError` with the fix."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise DiTSizeError(f"DiT expects latents of shape [N, {self.in_channels}, H, W], "
                               f"got {list(x.shape)}; check the VAE / --image-size")
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise DiTSizeError(f"input {h}x{w} is not a multiple of the patch size {p}; "
                               f"use window sizes divisible by {p}")
        if self.pos_embed_mode == "resize" and (h > self.input_size or w > self.input_size):
            raise DiTSizeError(f"input {h}x{w} is larger than the trained {self.input_size}x{self.input_size} "
                               f"latent; use --image-size matching the checkpoint")
        return h // p, w // p

    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """Tokens ``[N, g_h*g_w, p*p*C]`` -> image ``[N, C, g_h*p, g_w*p]``."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def block_names(self) -> list:
        """``blocks.0`` ... ``blocks.{depth-1}``, in call order; a block's index is its position."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def edit_blocks(self, op: str) -> dict:
        """``{index: name}`` of the blocks where edit ``op`` applies: every block has self-attention and keeps its shape."""
        if op not in EDIT_OPS:
            raise ValueError(f"unknown block edit {op!r}; use one of {', '.join(EDIT_OPS)}")
        return dict(enumerate(self.block_names()))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, edit=None) -> torch.Tensor:
        """``x``: ``[N, C, H, W]`` latents; ``t``: ``[N]`` timesteps (0..999); ``y``: ``[N]`` labels.

        ``edit`` (:mod:`networks.edits`) changes chosen blocks for this call only.
        """
        if edit is not None:
            op, chosen, sigma = check_edit(edit, self.edit_blocks)
        grid_h, grid_w = self.check_input(x)
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0]) if torch.as_tensor(t).ndim == 0 else t
        if y.min() < 0 or y.max() >= self.y_embedder.embedding_table.num_embeddings:
            raise UsageError(f"class labels must lie in [0, {self.num_classes - 1}] "
                             f"(or {self.num_classes} for the null class), got {y.min().item()}..{y.max().item()}")
        tokens = self.x_embedder(x) + self.position_table(grid_h, grid_w)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        if edit is None:
            for block in self.blocks:
                tokens = block(tokens, c)
        else:
            for i, block in enumerate(self.blocks):
                tokens = block(tokens, c, (op, sigma, (grid_h, grid_w)) if i in chosen else None)
        return self.unpatchify(self.final_layer(tokens, c), grid_h, grid_w)


# ----------------------------------------------------------------------------
# Model zoo (official names) and checkpoints.

_ZOO = {  # name: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}

DiT_models = {
    f"DiT-{size}/{patch}": functools.partial(DiT, depth=d, hidden_size=h, num_heads=heads, patch_size=patch)
    for size, (d, h, heads) in _ZOO.items() for patch in (2, 4, 8)
}

PRETRAINED_DIT = {  # image size -> released DiT-XL/2 checkpoint (plain state dict)
    256: "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
    512: "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
}


def create_dit(model: str, **kwargs) -> DiT:
    """Instantiate a zoo model by its official name (``"DiT-XL/2"``, ...); ``kwargs`` go to :class:`DiT`."""
    if model not in DiT_models:
        raise UsageError(f"unknown DiT model {model!r}; use one of {', '.join(DiT_models)}")
    return DiT_models[model](**kwargs)


def load_dit_state_dict(path: str | os.PathLike) -> dict:
    """Read a DiT checkpoint with ``torch.load(weights_only=True)``.

    Accepts the released plain state dicts and ``train.py`` checkpoints
    (``{"model", "ema", "opt", "args"}``), of which the EMA weights are returned.
    The ``args`` entry of training checkpoints is an ``argparse.Namespace``, the
    one non-tensor class allowed while unpickling.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"DiT checkpoint {path!r} not found; pass an existing file with --ckpt")
    # A truncated file is told to be downloaded again, never to be loaded with weights_only=False; a zip
    # checkpoint is memory-mapped, so the 2.7 GB DiT-XL/2 file is not read into a second copy.
    ckpt = load_weights(path, what="DiT checkpoint", fix="pass a DiT state dict or a train.py checkpoint with --ckpt",
                        safe_globals=[argparse.Namespace], mmap=True)
    if isinstance(ckpt, dict) and "ema" in ckpt:
        ckpt = ckpt["ema"]
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise UsageError(f"{path!r} holds no DiT state dict; pass a DiT-XL-2-256x256.pt-style file "
                         f"or a train.py checkpoint with an 'ema' entry")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def load_dit(model: str, path: str | os.PathLike, **kwargs) -> DiT:
    """Build zoo model ``model`` and load ``path`` strictly; mismatches raise a one-line UsageError.

    The network is built on the meta device (no random initialisation of 675 M
    parameters, no second copy) and takes the checkpoint's tensors as they are.
    """
    with torch.device("meta"):
        net = create_dit(model, **kwargs)
    state = load_dit_state_dict(path)
    ours = net.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    shapes = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        detail = []
        if missing:
            detail.append(f"missing {missing[:3]}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:3]}")
        if shapes:
            k = shapes[0]
            detail.append(f"{k} is {list(state[k].shape)} in the file but {list(ours[k].shape)} in {model}")
        raise UsageError(f"checkpoint {os.fspath(path)!r} does not fit {model} "
                         f"(input_size={net.input_size}, num_classes={net.num_classes}): {'; '.join(detail)}; "
                         f"check --model, --image-size and --num-classes")
    net.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if left:
        raise UsageError(f"checkpoint {os.fspath(path)!r} has no value for {left[:3]}")
    return net.eval()
