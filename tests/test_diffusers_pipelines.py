"""SWG inside real diffusers pipelines: SD 1.x, SDXL, PixArt-alpha, SD3, DiT and the modular SDXL pipeline.

Every pipeline is diffusers' own class, built offline from tiny configs: random-weight UNets and
transformers, `transformers` text encoders, and CLIP / T5 tokenizers this module writes (one token per
character).  Independent expectations: guide() on the adapter for each call the pipeline makes, the
pipeline run on each sample alone, the unwrapped model's attributes and saved weights, and diffusers'
classic SDXL pipeline against its modular one.  Two inference steps, 32 x 32 images (PixArt: 256 x 256,
the smallest size its resolution binning knows).
"""

from __future__ import annotations

import inspect
import json
import pathlib
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTPipeline,  # noqa: E402
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PixArtAlphaPipeline,
                       PixArtTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,  # noqa: E402
                          T5Config, T5EncoderModel, T5Tokenizer)

from guidance import guide  # noqa: E402
from guidance.diffusers import (DiffusersDenoiser, SlidingWindowGuidance, SlidingWindowGuided,  # noqa: E402
                                default_windows, window_multiple)
from networks.dit import DiT  # noqa: E402
from networks.dit_diffusers import to_diffusers  # noqa: E402
from utils.errors import UsageError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?"
TOKENS = 32  # tokenizer length
W = 0.5      # SWG weight used throughout
STEPS = dict(num_inference_steps=2)


# ----------------------------------------------------------------------------
# Tiny components.

def _clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENS)


def _t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in CHARS] + [("\u2581", -2.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TOKENS)


def _clip(projection: bool, seed: int):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=2 + 2 * len(CHARS), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=TOKENS, projection_dim=8)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5():
    torch.manual_seed(5)
    cfg = T5Config(vocab_size=4 + len(CHARS), d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    return T5EncoderModel(cfg).eval()


def _vae(blocks: int = 2, **kwargs) -> AutoencoderKL:
    torch.manual_seed(9)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * blocks,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, norm_num_groups=4, layers_per_block=1,
                         **kwargs).eval()


def _jitter(model, seed: int):
    """Random weights everywhere (diffusers zero-initialises output layers, which would hide every effect)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _unet(sdxl: bool) -> UNet2DConditionModel:
    torch.manual_seed(1)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=8 + 6 * 4) if sdxl else {}
    return _jitter(UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16 if sdxl else 8, attention_head_dim=2, norm_num_groups=4, **extra), 11)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit_pipe() -> DiTPipeline:
    torch.manual_seed(2)
    net = DiT(input_size=16, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=1000)
    for p in net.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.15)
    return _quiet(DiTPipeline(transformer=to_diffusers(net.eval()), vae=_vae(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False)))


@pytest.fixture(scope="module")
def pipes() -> dict:
    """One tiny pipeline of each kind, shared by the module (tests restore what they change)."""
    clip_l, clip_g = _clip(False, 2), _clip(True, 3)
    sd = StableDiffusionPipeline(vae=_vae(), text_encoder=clip_l, tokenizer=_clip_tokenizer(), unet=_unet(False),
                                 scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sdxl = StableDiffusionXLPipeline(vae=_vae(), text_encoder=clip_l, text_encoder_2=clip_g,
                                     tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), unet=_unet(True),
                                     scheduler=EulerDiscreteScheduler())
    torch.manual_seed(4)
    pixart = PixArtAlphaPipeline(
        tokenizer=_t5_tokenizer(), text_encoder=_t5(), vae=_vae(4), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        transformer=_jitter(PixArtTransformer2DModel(
            sample_size=32, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
            caption_channels=16, in_channels=4, cross_attention_dim=16, out_channels=8, norm_num_groups=4), 12))
    torch.manual_seed(3)
    sd3 = StableDiffusion3Pipeline(
        transformer=_jitter(SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=16), 13),
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0), text_encoder=_clip(True, 2),
        tokenizer=_clip_tokenizer(), text_encoder_2=clip_g, tokenizer_2=_clip_tokenizer(), text_encoder_3=_t5(),
        tokenizer_3=_t5_tokenizer())
    return {name: _quiet(p) for name, p in
            dict(sd=sd, sdxl=sdxl, pixart=pixart, sd3=sd3, dit=_dit_pipe()).items()}


def _denoiser_name(pipe) -> str:
    return "unet" if "unet" in pipe.components else "transformer"


def _run(name: str, pipe, scale: float, seeds=(0,), **kwargs) -> torch.Tensor:
    """Images of the pipeline ``name`` for one prompt / class per seed (each seed its own generator)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if name == "dit":
        labels = kwargs.pop("labels", [1, 7, 3][:len(seeds)])
        return pipe(class_labels=labels, guidance_scale=scale, generator=gens, output_type="pt", **STEPS).images
    prompts = kwargs.pop("prompts", ["a photo of a cat", "a dog", "red"][:len(seeds)])
    extra = {"pixart": dict(clean_caption=False, max_sequence_length=TOKENS),
             "sd3": dict(max_sequence_length=TOKENS)}.get(name, {})
    return pipe(prompts, guidance_scale=scale, generator=gens, output_type="pt", **STEPS, **extra, **kwargs).images


class _Wrapped:
    """``with _Wrapped(pipe, **settings) as wrapper``: the pipeline's denoiser wrapped, then unwrapped."""

    def __init__(self, pipe, **settings):
        self.pipe, self.name, self.settings = pipe, _denoiser_name(pipe), settings

    def __enter__(self) -> SlidingWindowGuided:
        wrapper = SlidingWindowGuided(getattr(self.pipe, self.name), **self.settings)
        setattr(self.pipe, self.name, wrapper)
        return wrapper

    def __exit__(self, *exc):
        setattr(self.pipe, self.name, getattr(self.pipe, self.name).model)


# ----------------------------------------------------------------------------
# Item 17: the wrapper shadows nothing of the model.

def _same(a, b) -> bool:
    """The same attribute: the same object, the same function bound to the same owner, or an equal value."""
    if inspect.ismethod(a):
        return inspect.ismethod(b) and b.__func__ is a.__func__ and b.__self__ is a.__self__
    return a is b or (type(a) is type(b) and not torch.is_tensor(a) and a == b)


@pytest.mark.parametrize("name", ["sd", "sdxl", "pixart", "sd3", "dit"])
def test_every_attribute_of_the_model_shows_through(pipes, name):
    pipe = pipes[name]
    model = getattr(pipe, _denoiser_name(pipe))
    plain = set(dir(torch.nn.Module()))
    with _Wrapped(pipe, weight=W) as wrapper:
        shown = getattr(pipe, _denoiser_name(pipe))
        assert shown is wrapper and wrapper.model is model
        different = [n for n in sorted(set(dir(model)) - plain - {"save_pretrained"})
                     if not n.startswith("__") and not _same(getattr(model, n), getattr(wrapper, n))]
        assert different == []
        if name not in ("sd", "sdxl"):
            assert wrapper.pos_embed is model.pos_embed  # the PatchEmbed, not the wrapper's pos_embed= argument
        assert wrapper.config is model.config and wrapper.dtype == model.dtype and wrapper.device == model.device
        assert wrapper.to(torch.float32) is wrapper  # nn.Module's own methods stay the wrapper's


# ----------------------------------------------------------------------------
# Item 18 and the CFG layout of each pipeline: every model call is guide() on the adapter.

def _record(wrapper):
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args, kwargs, output))

    return calls, wrapper.register_forward_hook(hook, with_kwargs=True)


def _expected(model, args, kwargs, cond_rows, w):
    """The wrapper's output for one call (paper's windows), from guide() on the adapter and the unwrapped model."""
    call = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    call.update(call.pop("kwargs", {}))
    latent = next(iter(inspect.signature(model.forward).parameters))
    x, t = call.pop(latent), call.pop("timestep")
    n = x.shape[0]
    size, steps = default_windows(x.shape[-2], x.shape[-1], window_multiple(model))
    with torch.no_grad():
        pos = DiffusersDenoiser(model, call, n)(x, t)
        rows = torch.tensor(cond_rows)
        den = DiffusersDenoiser(model, call, n)
        t_c = t.index_select(0, rows) if torch.is_tensor(t) and t.ndim == 1 and t.shape[0] == n else t
        guided = guide(den, "swg", weight=w, window_size=size, window_steps=steps)(x[rows], t_c, rows)
    out = pos.clone()
    out[rows] = guided
    others = [i for i in range(n) if i not in cond_rows]
    if others:  # the partner of each conditional row gets its SWG term
        partner = torch.tensor(others)
        out[partner] = pos[partner] + (guided - pos[rows])
    return out


@pytest.mark.parametrize("name", ["sd", "sdxl", "pixart", "sd3", "dit"])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_each_model_call_is_swg_on_the_conditional_half(pipes, name, scale):
    pipe = pipes[name]
    model = getattr(pipe, _denoiser_name(pipe))
    with _Wrapped(pipe, weight=W) as wrapper:
        calls, handle = _record(wrapper)
        try:
            images = _run(name, pipe, scale, seeds=(0, 1))
        finally:
            handle.remove()
    plain = _run(name, pipe, scale, seeds=(0, 1))
    assert len(calls) == STEPS["num_inference_steps"] and torch.isfinite(images).all()
    assert (images - plain).abs().max() > 1e-4
    for args, kwargs, output in calls:
        n = (args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))).shape[0]
        if scale == 1.0:
            cond = list(range(n))                        # no CFG: every row is a sample of its own
        else:
            assert n == 4
            cond = [0, 1] if name == "dit" else [2, 3]   # DiTPipeline: [cond; uncond], the others [uncond; cond]
        out = output[0] if isinstance(output, tuple) else output.sample
        torch.testing.assert_close(out, _expected(model, args, kwargs, cond, W), atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sd", "dit"])
def test_samples_sharing_a_starting_latent_are_guided_alone(pipes, name):
    """CFG off, two prompts (classes) from the same seed: each image equals its prompt run alone."""
    pipe = pipes[name]
    prompts = dict(labels=[1, 7]) if name == "dit" else dict(prompts=["a photo of a cat", "a dog"])
    with _Wrapped(pipe, weight=W):
        both = _run(name, pipe, 1.0, seeds=(0, 0), **prompts)
        alone = [_run(name, pipe, 1.0, seeds=(0,), **{k: v[i:i + 1] for k, v in prompts.items()}) for i in (0, 1)]
    torch.testing.assert_close(both, torch.cat(alone), atol=2e-5, rtol=1e-5)


def test_a_pipeline_without_latents_is_refused():
    class NoLatents(DiffusionPipeline):
        def __init__(self, unet):
            super().__init__()
            self.register_modules(unet=unet)

        def __call__(self, x):
            return self.unet(x, 10, torch.zeros(len(x), 3, 8))

    pipe = NoLatents(SlidingWindowGuided(_unet(False), weight=W, window_size=10))
    with pytest.raises(UsageError, match="cfg_batch=True or False"), torch.no_grad():
        pipe(torch.zeros(2, 4, 16, 16))
    pipe.unet.swg.cfg_batch = False
    with torch.no_grad():
        assert pipe(torch.zeros(2, 4, 16, 16)).sample.shape == (2, 4, 16, 16)


# ----------------------------------------------------------------------------
# Item 19: save_pretrained with the wrapper in place.

@pytest.mark.parametrize("name", ["sd", "dit"])
def test_save_pretrained_saves_the_wrapped_model(pipes, name, tmp_path):
    pipe = pipes[name]
    denoiser = _denoiser_name(pipe)
    model = getattr(pipe, denoiser)
    with _Wrapped(pipe, weight=W) as wrapper:
        pipe.save_pretrained(tmp_path)
        assert getattr(pipe, denoiser) is wrapper  # still guided after saving
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index[denoiser] == ["diffusers", type(model).__name__]
    reloaded = type(pipe).from_pretrained(tmp_path)
    theirs, ours = getattr(reloaded, denoiser).state_dict(), model.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    single = tmp_path / "alone"
    SlidingWindowGuided(model, weight=W).save_pretrained(single)
    assert json.loads((single / "config.json").read_text())["_class_name"] == type(model).__name__


# ----------------------------------------------------------------------------
# The guider inside diffusers' modular SDXL pipeline.

def test_guider_in_the_modular_sdxl_pipeline_equals_the_wrapper(pipes):
    pytest.importorskip("diffusers.guiders")
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    sdxl, s = pipes["sdxl"], 5.0
    modular = StableDiffusionXLAutoBlocks().init_pipeline()
    parts = {k: v for k, v in sdxl.components.items() if k in modular.component_names and v is not None}
    modular.update_components(guider=SlidingWindowGuidance(guidance_scale=s, swg_scale=W, window_size=10), **parts)
    modular.set_progress_bar_config(disable=True)
    common = dict(height=32, width=32, output_type="pt", **STEPS)
    ours = modular(prompt="a photo of a cat", generator=torch.Generator().manual_seed(0), output="images", **common)
    with _Wrapped(sdxl, weight=W, window_size=10):
        theirs = sdxl("a photo of a cat", guidance_scale=s, generator=torch.Generator().manual_seed(0),
                      **common).images
    plain = sdxl("a photo of a cat", guidance_scale=s, generator=torch.Generator().manual_seed(0), **common).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-3


# ----------------------------------------------------------------------------
# Items 20 and 21: the documented examples, as written, on these pipelines; the documented defaults.

def _doc() -> str:
    return (ROOT / "docs" / "diffusers.md").read_text()


def test_documented_guider_signature_is_the_codes():
    (text,) = re.findall(r"`SlidingWindowGuidance\((.*?)\)`", _doc(), flags=re.S)
    documented = dict(item.split("=") for item in re.sub(r"\s+", "", text).split(","))
    defaults = inspect.signature(SlidingWindowGuidance.__init__).parameters
    assert documented and all(repr(defaults[k].default) == v for k, v in documented.items())


# The hub ids of the documented examples, and the tiny pipeline each stands for.
HUB = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd", "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
       "PixArt-alpha/PixArt-XL-2-1024-MS": "pixart", "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
       "facebook/DiT-XL-2-256": "dit"}


def test_documented_examples_run(pipes, tmp_path):
    """Every python block of docs/diffusers.md, top to bottom in one namespace, each hub id replaced by a
    folder holding the tiny pipeline (saved here, loaded by the example's own from_pretrained)."""
    text = "\n".join(re.findall(r"```python\n(.*?)```", _doc(), flags=re.S))
    ids = set(re.findall(r"(?:from_pretrained|init_pipeline)\(\s*\"([^\"]+)\"", text))
    assert ids == set(HUB)  # every example has a stand-in, every stand-in an example
    for hub_id, name in HUB.items():
        pipes[name].save_pretrained(tmp_path / name)
        text = text.replace(f'"{hub_id}"', repr(str(tmp_path / name)))
    namespace: dict = {}
    exec(compile(text, "docs/diffusers.md", "exec"), namespace)
    assert torch.isfinite(namespace["swg"]).all() and torch.isfinite(namespace["cfg_swg"]).all()
    assert min(namespace["image"].size) >= 32  # a PIL image of the last example
