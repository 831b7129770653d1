"""DiT weights in diffusers' layout (``DiTTransformer2DModel``) <-> our DiT (official names).

diffusers stores DiT as ``transformer/config.json`` + ``diffusion_pytorch_model.safetensors``
(``facebook/DiT-XL-2-256`` on the hub).  The two layouts hold the same numbers:

================================================  ===============================================
ours (facebookresearch/DiT names)                 diffusers ``DiTTransformer2DModel``
================================================  ===============================================
``x_embedder.proj``                               ``pos_embed.proj``
``pos_embed`` (fixed sin-cos table, saved)        ``pos_embed.pos_embed`` (recomputed, not saved)
``t_embedder.mlp.{0,2}``                          ``transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{1,2}``
``y_embedder.embedding_table``                    ``transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table``
``blocks.{i}.adaLN_modulation.1``                 ``transformer_blocks.{i}.norm1.linear``
``blocks.{i}.attn.qkv`` (q, k, v stacked)         ``transformer_blocks.{i}.attn1.to_{q,k,v}``
``blocks.{i}.attn.proj``                          ``transformer_blocks.{i}.attn1.to_out.0``
``blocks.{i}.mlp.fc{1,2}``                        ``transformer_blocks.{i}.ff.net.{0.proj,2}``
``final_layer.adaLN_modulation.1``                ``proj_out_1``
``final_layer.linear``                            ``proj_out_2``
================================================  ===============================================

diffusers keeps one copy of the timestep and class embedders per block (all equal
in a converted DiT); reading keeps block 0's and refuses blocks that differ.

Two numerical differences are in diffusers' network, not in the weights: its
timestep sinusoid uses the frequencies ``10000^(-k / (128 - 1))`` where DiT uses
``10000^(-k / 128)`` (``downscale_freq_shift=1``), and its MLP layer norm uses
``norm_eps`` (1e-5 unless the config says otherwise) where DiT uses 1e-6.  Loading
diffusers weights into our DiT therefore gives the released network exactly;
:func:`match_official_dit` makes a ``DiTTransformer2DModel`` compute it too.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Optional, Tuple

import torch

from utils.cache import fetch, hf_snapshot
from utils.errors import UsageError

from .dit import DiT, DiT_models, load_dit, sincos_pos_embed_2d

__all__ = ["dit_to_diffusers_config", "diffusers_config_to_dit", "dit_to_diffusers_state",
           "diffusers_to_dit_state", "to_diffusers", "from_diffusers", "match_official_dit",
           "is_diffusers_source", "snapshot_source", "diffusers_folder", "read_diffusers_dit", "load_dit_weights",
           "save_diffusers_dit",
           "zoo_name"]

_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_EMB = "transformer_blocks.{i}.norm1.emb."


# ----------------------------------------------------------------------------
# Configuration.

def dit_to_diffusers_config(kwargs: dict) -> dict:
    """``DiTTransformer2DModel`` config for our DiT constructor ``kwargs`` (the official network's eps)."""
    hidden, heads = kwargs["hidden_size"], kwargs["num_heads"]
    if hidden % heads:
        raise UsageError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
    if kwargs.get("class_dropout_prob", 0.1) <= 0:
        raise UsageError("diffusers' DiT always has a null-class embedding; this DiT was built with "
                         "class_dropout_prob=0 and has none, so it cannot be converted")
    if kwargs.get("mlp_ratio", 4.0) != 4.0:
        raise UsageError(f"diffusers' DiT has a fixed MLP ratio of 4, got mlp_ratio={kwargs['mlp_ratio']}")
    in_ch = kwargs.get("in_channels", 4)
    return dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=in_ch,
                out_channels=2 * in_ch if kwargs.get("learn_sigma", True) else in_ch,
                num_layers=kwargs["depth"], sample_size=kwargs["input_size"], patch_size=kwargs["patch_size"],
                num_embeds_ada_norm=kwargs["num_classes"], norm_eps=1e-6, attention_bias=True,
                activation_fn="gelu-approximate", norm_type="ada_norm_zero", norm_elementwise_affine=False)


def diffusers_config_to_dit(config: dict) -> dict:
    """Our DiT constructor kwargs for a diffusers DiT ``config`` (``config.json`` as a dict)."""
    name = config.get("_class_name", "DiTTransformer2DModel")
    if name not in _DIT_CLASSES or config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise UsageError(f"the diffusers model is a {name} (norm_type {config.get('norm_type')!r}), not a DiT; "
                         f"pass the transformer/ folder of a DiTPipeline")
    heads, head_dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 72)
    in_ch = config.get("in_channels", 4)
    out_ch = config.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise UsageError(f"diffusers DiT with {in_ch} input and {out_ch} output channels; DiT predicts "
                         f"{in_ch} (eps) or {2 * in_ch} (eps and variance)")
    if config.get("activation_fn", "gelu-approximate") != "gelu-approximate" or not config.get("attention_bias", True):
        raise UsageError("this diffusers DiT uses another activation or no attention bias; only the DiT "
                         "architecture (gelu-approximate, biased attention) converts")
    return dict(input_size=config.get("sample_size", 32), patch_size=config.get("patch_size", 2),
                in_channels=in_ch, hidden_size=heads * head_dim, depth=config.get("num_layers", 28),
                num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1,
                num_classes=config.get("num_embeds_ada_norm", 1000), learn_sigma=out_ch == 2 * in_ch)


def zoo_name(kwargs: dict) -> Optional[str]:
    """Official zoo name (``"DiT-XL/2"``) of an architecture, or None when it is not a zoo model."""
    for name, ctor in DiT_models.items():
        k = ctor.keywords
        if (k["depth"], k["hidden_size"], k["num_heads"], k["patch_size"]) == \
                (kwargs["depth"], kwargs["hidden_size"], kwargs["num_heads"], kwargs["patch_size"]):
            return name
    return None


# ----------------------------------------------------------------------------
# State dicts.

def _pairs(depth: int):
    """``(ours, theirs)`` names of every per-block tensor except the fused qkv."""
    for i in range(depth):
        b, t = f"blocks.{i}.", f"transformer_blocks.{i}."
        for ours, theirs in (("adaLN_modulation.1", "norm1.linear"), ("attn.proj", "attn1.to_out.0"),
                             ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2")):
            for p in ("weight", "bias"):
                yield f"{b}{ours}.{p}", f"{t}{theirs}.{p}"
    for ours, theirs in (("x_embedder.proj", "pos_embed.proj"), ("final_layer.adaLN_modulation.1", "proj_out_1"),
                         ("final_layer.linear", "proj_out_2")):
        for p in ("weight", "bias"):
            yield f"{ours}.{p}", f"{theirs}.{p}"


def _embedders(i: int):
    e = _EMB.format(i=i)
    return (("t_embedder.mlp.0", e + "timestep_embedder.linear_1"),
            ("t_embedder.mlp.2", e + "timestep_embedder.linear_2"),
            ("y_embedder.embedding_table", e + "class_embedder.embedding_table"))


def _get(state: dict, key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise UsageError(f"{where} lacks {key!r}; it is not a complete DiT state dict")
    return state[key]


def dit_to_diffusers_state(state: dict, depth: int) -> dict:
    """Our DiT state dict -> ``DiTTransformer2DModel`` state dict (embedders copied into every block)."""
    out = {theirs: _get(state, ours, "the DiT state dict").clone() for ours, theirs in _pairs(depth)}
    for i in range(depth):
        q, k, v = _get(state, f"blocks.{i}.attn.qkv.weight", "the DiT state dict").chunk(3, dim=0)
        qb, kb, vb = state[f"blocks.{i}.attn.qkv.bias"].chunk(3, dim=0)
        for name, w, b in (("to_q", q, qb), ("to_k", k, kb), ("to_v", v, vb)):
            out[f"transformer_blocks.{i}.attn1.{name}.weight"] = w.clone()
            out[f"transformer_blocks.{i}.attn1.{name}.bias"] = b.clone()
        for ours, theirs in _embedders(i):
            for p in ("weight", "bias") if "mlp" in ours else ("weight",):
                out[f"{theirs}.{p}"] = _get(state, f"{ours}.{p}", "the DiT state dict").clone()
    return out


def diffusers_to_dit_state(state: dict, kwargs: dict, where: str = "the diffusers state dict") -> dict:
    """``DiTTransformer2DModel`` state dict -> our DiT state dict for constructor ``kwargs``.

    The fixed position table is recomputed (diffusers does not save it).  Raises
    :class:`UsageError` when the blocks carry different timestep/class embedders.
    """
    depth = kwargs["depth"]
    out = {ours: _get(state, theirs, where).float().clone() for ours, theirs in _pairs(depth)}
    for i in range(depth):
        t = f"transformer_blocks.{i}.attn1."
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(
                [_get(state, f"{t}to_{n}.{p}", where).float() for n in "qkv"], dim=0)
        for ours, theirs in _embedders(i):
            for p in ("weight", "bias") if "mlp" in ours else ("weight",):
                value = _get(state, f"{theirs}.{p}", where).float()
                if i == 0:
                    out[f"{ours}.{p}"] = value.clone()
                elif not torch.equal(value, out[f"{ours}.{p}"]):
                    raise UsageError(f"{where}: block {i} has its own {theirs.split('.')[-1]} weights; DiT shares "
                                     f"one timestep/class embedder, so this model cannot be converted")
    grid = kwargs["input_size"] // kwargs["patch_size"]
    out["pos_embed"] = sincos_pos_embed_2d(kwargs["hidden_size"], grid)[None]
    return out


# ----------------------------------------------------------------------------
# Models.

def _kwargs_of(net: DiT) -> dict:
    return dict(input_size=net.input_size, patch_size=net.patch_size, in_channels=net.in_channels,
                hidden_size=net.pos_embed.shape[-1], depth=len(net.blocks), num_heads=net.num_heads,
                mlp_ratio=net.blocks[0].mlp.fc1.out_features / net.pos_embed.shape[-1],
                class_dropout_prob=net.y_embedder.dropout_prob, num_classes=net.num_classes,
                learn_sigma=net.learn_sigma)


def to_diffusers(net: DiT):
    """A ``DiTTransformer2DModel`` holding ``net``'s weights (float32, eval mode)."""
    from diffusers import DiTTransformer2DModel

    kwargs = _kwargs_of(net)
    model = DiTTransformer2DModel(**dit_to_diffusers_config(kwargs))
    model.load_state_dict(dit_to_diffusers_state(net.state_dict(), kwargs["depth"]), strict=True)
    return model.eval()


def from_diffusers(model, pos_embed: str = "resize") -> DiT:
    """Our :class:`DiT` holding the weights of a diffusers DiT ``model`` (float32, eval mode)."""
    kwargs = diffusers_config_to_dit(dict(model.config))
    net = DiT(pos_embed=pos_embed, **kwargs)
    net.load_state_dict(diffusers_to_dit_state(model.state_dict(), kwargs))
    return net.eval()


def match_official_dit(model):
    """Make a diffusers DiT compute the released DiT exactly (timestep frequencies and MLP norm eps).

    Sets ``downscale_freq_shift = 0`` on every block's timestep projection and
    ``eps = 1e-6`` on every block's MLP layer norm, in place; returns ``model``.
    """
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        if getattr(block, "norm3", None) is not None:
            block.norm3.eps = 1e-6
    return model


# ----------------------------------------------------------------------------
# Loading from a .pt file, a diffusers folder or a hub id.

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/transformer)?$")


def is_diffusers_source(source) -> bool:
    """True for a local diffusers folder (``config.json`` there or in ``transformer/``) or a hub id ``org/name``."""
    text = os.fspath(source)
    path = pathlib.Path(os.path.expanduser(text))
    if path.is_dir():
        return (path / "config.json").is_file() or (path / "transformer" / "config.json").is_file()
    if path.exists() or "://" in text or text.endswith((".pt", ".pth", ".ckpt")):
        return False
    return bool(_HUB_ID.match(text))


def snapshot_source(source) -> str:
    """What :func:`utils.cache.prefetch` fetches for ``source``: ``hf-snapshot://<repo>/transformer`` for a hub id."""
    text = os.fspath(source)
    if is_diffusers_source(text) and not pathlib.Path(os.path.expanduser(text)).is_dir():
        return f"hf-snapshot://{text.removesuffix('/transformer')}/transformer"
    return text


def diffusers_folder(source) -> pathlib.Path:
    """Local folder with the DiT's ``config.json``: ``source`` itself, its ``transformer/``, or the hub snapshot."""
    text = os.fspath(source)
    path = pathlib.Path(os.path.expanduser(text))
    if not path.is_dir():

        repo = text.removesuffix("/transformer")
        path = hf_snapshot(repo, "transformer")
    if (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise UsageError(f"{text} has no config.json; pass a DiTPipeline folder, its transformer/ folder or a hub id")
    return path


def _weight_files(folder: pathlib.Path) -> list:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise UsageError(f"{folder} holds no diffusion_pytorch_model.safetensors; pass a diffusers DiT folder")


def read_diffusers_dit(source) -> Tuple[dict, dict]:
    """``(our kwargs, our state dict)`` of the diffusers DiT at ``source`` (folder or hub id).

    Reads safetensors (or ``.bin`` with ``torch.load(weights_only=True)``); runs no code from the folder.
    """
    folder = diffusers_folder(source)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {folder / 'config.json'} ({exc}); pass a diffusers DiT folder") from None
    kwargs = diffusers_config_to_dit(config)
    state = {}
    for path in _weight_files(folder):
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"cannot read {path} ({msg}); pass an intact diffusers DiT folder") from None
    return kwargs, diffusers_to_dit_state(state, kwargs, where=str(folder))


def load_dit_weights(source, model: Optional[str] = "DiT-XL/2", pos_embed: str = "resize",
                     **expected) -> Tuple[DiT, dict]:
    """Our DiT and its constructor kwargs from a ``.pt`` file/URL or a diffusers folder / hub id.

    ``.pt`` (plain state dict or ``train.py`` checkpoint): the architecture is
    ``model`` with ``expected`` kwargs, as :func:`networks.dit.load_dit`.  Diffusers
    layout: the architecture is read from ``config.json``; ``model`` (when given)
    and every ``expected`` kwarg (``input_size``, ``num_classes``, ...) must agree
    with it, else :class:`UsageError` names the difference.
    """
    if not is_diffusers_source(source):

        path = fetch(os.fspath(source), desc=os.path.basename(os.fspath(source)))
        net = load_dit(model, path, pos_embed=pos_embed, **expected)
        return net, _kwargs_of(net)
    kwargs, state = read_diffusers_dit(source)
    if model is not None:
        if model not in DiT_models:
            raise UsageError(f"unknown DiT model {model!r}; use one of {', '.join(DiT_models)}")
        for key, value in DiT_models[model].keywords.items():
            expected.setdefault(key, value)
    for key, value in expected.items():
        if key in kwargs and kwargs[key] != value:
            found = zoo_name(kwargs) or "a custom DiT"
            raise UsageError(f"{os.fspath(source)} holds {found} with {key}={kwargs[key]}, not {value}; "
                             f"match `model`, `image_size`, `num_classes` and `model_kwargs` to it")
    net = DiT(pos_embed=pos_embed, **kwargs)
    net.load_state_dict(state)
    return net.eval(), kwargs


def save_diffusers_dit(net: DiT, folder) -> pathlib.Path:
    """Write ``net`` as a diffusers ``transformer`` folder (``config.json`` + safetensors)."""
    model = to_diffusers(net)
    model.save_pretrained(os.fspath(folder), safe_serialization=True)
    return pathlib.Path(folder)

