"""SWG / M-SWG for diffusers models (guidance/diffusers/) on tiny random models built from configs.

Independent expectations: guide() on the adapter, the toolkit's own DiT
(networks/dit.py) and guidance.dit, per-window single-sample model calls, the
CFG algebra, and the affine output -> denoised-estimate maps.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, UNet2DConditionModel  # noqa: E402

from guidance import WindowGrid, guide, sliding_window_predict  # noqa: E402
from guidance.dit import dit_guidance  # noqa: E402
from guidance.diffusers import (DiffusersDenoiser, SlidingWindowGuidance, SlidingWindowGuided,  # noqa: E402
                                default_windows, window_multiple)
from networks.dit import DiT  # noqa: E402
from networks.dit_diffusers import match_official_dit, to_diffusers  # noqa: E402
from utils.errors import UsageError  # noqa: E402


def _unet(sdxl: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(1 if sdxl else 0)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=8 + 6 * 4) if sdxl else {}
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4, **extra)
    for p in unet.parameters():  # zero-initialised output layers would hide everything
        p.data.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def _our_dit(num_classes: int = 10, input_size: int = 16, pos_embed: str = "resize") -> DiT:
    torch.manual_seed(2)
    net = DiT(input_size=input_size, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=num_classes,
              pos_embed=pos_embed)
    for p in net.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.15)
    return net.eval()


@pytest.fixture(scope="module")
def unet():
    return _unet()


@pytest.fixture(scope="module")
def sdxl_unet():
    return _unet(sdxl=True)


def _sdxl_inputs(n: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return dict(encoder_hidden_states=torch.randn(n, 5, 8, generator=g),
                added_cond_kwargs=dict(text_embeds=torch.randn(n, 8, generator=g),
                                       time_ids=torch.rand(n, 6, generator=g) * 100))


# ----------------------------------------------------------------------------
# Windows.

def test_default_windows_are_the_papers():
    assert default_windows(64, 64)[0] == (40, 40)     # SD 1.5 at 512 px, EDM2 512
    assert default_windows(32, 32, 2)[0] == (20, 20)  # DiT-XL/2 at 256 px
    assert default_windows(128, 128, 8)[0] == (80, 80)  # SDXL at 1024 px
    assert default_windows(64, 96, 8) == ((40, 64), 2)  # 60 rounds to the UNet factor 8
    for n, m in ((8, 2), (16, 4), (20, 1), (96, 8)):    # the two windows always overlap and fit
        k = default_windows(n, n, m)[0][0]
        assert k % m == 0 and n / 2 < k <= n


def test_window_multiple(unet):
    assert window_multiple(unet) == 2
    assert window_multiple(to_diffusers(_our_dit())) == 2


# ----------------------------------------------------------------------------
# Wrapper == guide() on the adapter; conditioning reaches every window.

def test_wrapper_equals_guide_on_the_adapter(unet):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    wrapped = SlidingWindowGuided(unet, weight=0.7, window_size=10, window_steps=2)
    with torch.no_grad():
        out = wrapped(x, t, encoder_hidden_states=ehs).sample
        den = DiffusersDenoiser(unet, dict(encoder_hidden_states=ehs), 2)
        ref = guide(den, "swg", weight=0.7, window_size=10, window_steps=2)(x, t, torch.arange(2))
        plain = unet(x, t, ehs).sample
    assert torch.equal(out, ref)
    assert (out - plain).abs().max() > 1e-3
    # SWG equation by hand from independent per-window calls.
    grid = WindowGrid.create(16, 16, 10, 2)
    with torch.no_grad():
        win = torch.zeros_like(plain)
        for y, l in grid.boxes():
            for i in range(2):
                win[i, :, y:y + 10, l:l + 10] += unet(x[i:i + 1, :, y:y + 10, l:l + 10], t, ehs[i:i + 1]).sample[0]
    win = win / grid.count()
    m = (grid.count() > 1).float()
    torch.testing.assert_close(out, plain + 0.7 * m * (plain - win), atol=2e-5, rtol=0)


def _record_calls(model):
    calls = []

    def hook(module, args, kwargs):
        calls.append(dict(kwargs, _args=args))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_sdxl_added_cond_kwargs_and_text_reach_every_window(sdxl_unet):
    n, k = 2, 10
    x = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    inputs = _sdxl_inputs(n)
    t = torch.tensor(300)
    den = DiffusersDenoiser(sdxl_unet, inputs, n)
    grid = WindowGrid.create(16, 16, k, 3)
    calls, handle = _record_calls(sdxl_unet)
    try:
        with torch.no_grad():
            win, count = sliding_window_predict(den, x, t, torch.arange(n), grid)
    finally:
        handle.remove()
    assert len(calls) == 1 and grid.num_windows == 9
    seen = calls[0]
    reps = grid.num_windows  # window-major: window j holds samples 0..n-1
    assert torch.equal(seen["encoder_hidden_states"], inputs["encoder_hidden_states"].repeat(reps, 1, 1))
    for key in ("text_embeds", "time_ids"):
        assert torch.equal(seen["added_cond_kwargs"][key], inputs["added_cond_kwargs"][key].repeat(reps, 1))
    # Each window's prediction equals a single-sample call with that sample's conditioning.
    with torch.no_grad():
        y, l = list(grid.boxes())[4]
        one = sdxl_unet(x[1:2, :, y:y + k, l:l + k], t, inputs["encoder_hidden_states"][1:2],
                        added_cond_kwargs={q: v[1:2] for q, v in inputs["added_cond_kwargs"].items()}).sample
    assert count[0, 0, y + k // 2, l + k // 2] >= 1
    centre_only = grid.count()[y:y + k, l:l + k] == 1
    if centre_only.any():  # pixels covered by this window alone equal its own prediction
        torch.testing.assert_close(win[1, :, y:y + k, l:l + k][:, centre_only], one[0][:, centre_only],
                                   atol=1e-5, rtol=0)
    swapped = dict(inputs, added_cond_kwargs=dict(inputs["added_cond_kwargs"],
                                                  time_ids=inputs["added_cond_kwargs"]["time_ids"].flip(0)))
    with torch.no_grad():
        other, _ = sliding_window_predict(DiffusersDenoiser(sdxl_unet, swapped, n), x, t, torch.arange(n), grid)
    assert (other - win).abs().max() > 1e-4  # the added kwargs do change the window predictions


def test_dit_class_labels_reach_every_window():
    model = to_diffusers(_our_dit())
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([2, 7, 10])  # 10 = null class
    t = torch.tensor([10, 500, 990])
    calls, handle = _record_calls(model)
    try:
        with torch.no_grad():
            SlidingWindowGuided(model, weight=0.5, window_size=10, cfg_batch=False)(x, timestep=t, class_labels=labels)
    finally:
        handle.remove()
    assert [c["_args"][0].shape[0] if c["_args"] else c["hidden_states"].shape[0] for c in calls] == [3, 12]
    assert torch.equal(calls[1]["class_labels"], labels.repeat(4))
    assert torch.equal(calls[1]["timestep"], t.repeat(4))
    # Per-sample timesteps: the interval switches guidance per sample, as guide(sigma_range=...) does.
    with torch.no_grad():
        plain = model(x, timestep=t, class_labels=labels).sample
        full = SlidingWindowGuided(model, weight=0.5, window_size=10, cfg_batch=False)(
            x, timestep=t, class_labels=labels).sample
        part = SlidingWindowGuided(model, weight=0.5, window_size=10, cfg_batch=False, interval=(400, 999))(
            x, timestep=t, class_labels=labels).sample
    assert torch.equal(part[0], plain[0]) and torch.equal(part[1:], full[1:])
    assert (full[0] - plain[0]).abs().max() > 1e-4


# ----------------------------------------------------------------------------
# CFG batches: halves, exact cfg-swg.

def _cfg_call(wrapped, x, t, cond, uncond, s):
    """What SD / SDXL pipelines do each step: [uncond; cond] batch, one call, CFG on the two chunks."""
    latent_in = torch.cat([x] * 2)
    kwargs = {k: torch.cat([uncond[k], cond[k]]) for k in ("encoder_hidden_states",)}
    if "added_cond_kwargs" in cond:
        kwargs["added_cond_kwargs"] = {q: torch.cat([uncond["added_cond_kwargs"][q], cond["added_cond_kwargs"][q]])
                                       for q in cond["added_cond_kwargs"]}
    out = wrapped(latent_in, t, return_dict=False, **kwargs)[0]
    u, c = out.chunk(2)
    return u + s * (c - u), out


def _cfg_batch(cond, uncond):
    """The [uncond; cond] conditioning of an SD / SDXL pipeline's CFG batch."""
    return {k: (torch.cat([uncond[k], cond[k]]) if torch.is_tensor(v) else _cfg_batch(v, uncond[k]))
            for k, v in cond.items()}


@pytest.mark.parametrize("sdxl", [False, True])
def test_pipeline_cfg_gives_the_toolkits_cfg_swg(sdxl, unet, sdxl_unet):
    model = sdxl_unet if sdxl else unet
    n, s, w = 2, 4.5, 0.6
    x = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    cond, uncond = _sdxl_inputs(n, 7), _sdxl_inputs(n, 8)
    if not sdxl:
        cond, uncond = {"encoder_hidden_states": cond["encoder_hidden_states"]}, \
            {"encoder_hidden_states": uncond["encoder_hidden_states"]}
    t = torch.tensor(250)
    with torch.no_grad():
        result, raw = _cfg_call(SlidingWindowGuided(model, weight=w, window_size=10, cfg_batch=True), x, t, cond,
                                uncond, s)
        # The toolkit's cfg-swg through guide(): positive = cond inputs, negative (labels=None) = uncond inputs.
        pos, neg = DiffusersDenoiser(model, cond, n), DiffusersDenoiser(model, uncond, n)
        expected = guide(pos, "cfg-swg", weight=(s - 1, w), neg_denoiser=lambda xx, tt, _: neg(xx, tt),
                         window_size=10, window_steps=2)(x, t, torch.arange(n))
        both = torch.cat([x] * 2)
        unwrapped = model(both, t, return_dict=False, **_cfg_batch(cond, uncond))[0]
        half = SlidingWindowGuided(model, weight=w, window_size=10, shift_uncond=False, cfg_batch=True)(
            both, t, return_dict=False, **_cfg_batch(cond, uncond))[0]
    torch.testing.assert_close(result, expected, atol=5e-5, rtol=1e-5)
    # shift_uncond=False: the unconditional half is bit-identical to the unwrapped model, the conditional
    # half is SWG alone; the default gives the unconditional half its partner's SWG term.
    assert torch.equal(half[:n], unwrapped[:n])
    torch.testing.assert_close(half[n:], raw[n:], atol=0, rtol=0)
    torch.testing.assert_close(raw[:n] - unwrapped[:n], raw[n:] - unwrapped[n:], atol=1e-6, rtol=0)
    assert (raw[n:] - unwrapped[n:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------
# Mask, interval, looking like the model.

def test_mask_and_interval(unet):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(10))
    ehs = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(11))
    t = torch.tensor(600)
    count = WindowGrid.create(16, 16, 10, 2).count()
    with torch.no_grad():
        plain = unet(x, t, ehs).sample
        masked = SlidingWindowGuided(unet, weight=1.0, window_size=10)(x, t, ehs).sample
        full = SlidingWindowGuided(unet, weight=1.0, window_size=10, masked=False)(x, t, ehs).sample
        calls, handle = _record_calls(unet)
        try:
            outside = SlidingWindowGuided(unet, weight=1.0, window_size=10, interval=(0, 599))(x, t, ehs).sample
            inside = SlidingWindowGuided(unet, weight=1.0, window_size=10, interval=(600, 999))(x, t, ehs).sample
        finally:
            handle.remove()
    once = count == 1
    assert torch.equal(masked[..., once], plain[..., once])         # M-SWG: no guidance where one window covers
    assert (masked[..., ~once] - plain[..., ~once]).abs().max() > 1e-3
    assert (full[..., once] - plain[..., once]).abs().max() > 1e-3  # SWG: guidance everywhere
    assert torch.equal(outside, plain) and torch.equal(inside, masked)
    assert len(calls) == 1 + 2  # outside: the model once; inside: model + one window batch


def test_wrapper_looks_like_the_model(sdxl_unet):
    wrapped = SlidingWindowGuided(sdxl_unet, weight=0.3)
    assert wrapped.config is sdxl_unet.config and wrapped.dtype == sdxl_unet.dtype
    assert wrapped.device == sdxl_unet.device and wrapped.add_embedding is sdxl_unet.add_embedding
    assert wrapped.add_embedding.linear_1.in_features == 32  # what SDXL pipelines read
    assert list(wrapped.parameters())[0] is list(sdxl_unet.parameters())[0]
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        out = wrapped(x, 10, **_sdxl_inputs(1))
        tup = wrapped(x, 10, return_dict=False, **_sdxl_inputs(1))
    assert type(out).__name__ == "UNet2DConditionOutput" and isinstance(tup, tuple) and len(tup) == 1
    assert torch.equal(out.sample, tup[0])
    with pytest.raises(UsageError):
        SlidingWindowGuided(wrapped, weight=0.1)
    # Writes: the model's attributes are set on the model; SWG settings live in .swg (a plain attribute would
    # be ignored silently, so it is refused).
    with pytest.raises(UsageError, match=r"swg\.weight"):
        wrapped.weight = 0.0
    wrapped.swg.weight = 0.0
    with torch.no_grad():
        assert torch.equal(wrapped(x, 10, **_sdxl_inputs(1)).sample, sdxl_unet(x, 10, **_sdxl_inputs(1)).sample)
    embedding = sdxl_unet.add_embedding
    wrapped.add_embedding = torch.nn.Identity()
    assert isinstance(sdxl_unet.add_embedding, torch.nn.Identity) and "add_embedding" not in wrapped._modules
    wrapped.add_embedding = embedding
    wrapped.eval()
    assert not wrapped.training and not sdxl_unet.training
    with pytest.raises(UsageError, match="pos_embed"):
        SlidingWindowGuidance(pos_embed="bicubic")


def test_bad_windows_and_inputs_are_refused(unet):
    dit = to_diffusers(_our_dit())
    x = torch.randn(1, 4, 16, 16)
    with pytest.raises(UsageError, match="square"):
        SlidingWindowGuided(dit, weight=0.5, window_size=(10, 12))(x, timestep=torch.tensor([1]),
                                                                     class_labels=torch.tensor([1]))
    with pytest.raises(UsageError, match="patch size"):
        SlidingWindowGuided(dit, weight=0.5, window_size=9)(x, timestep=torch.tensor([1]),
                                                              class_labels=torch.tensor([1]))
    with pytest.raises(UsageError, match="spatial map"):
        SlidingWindowGuided(unet, weight=0.5, window_size=10)(
            x, 1, torch.randn(1, 5, 8), mid_block_additional_residual=torch.randn(1, 16, 8, 8))
    with pytest.raises(UsageError, match="pos_embed"):
        SlidingWindowGuided(unet, weight=0.5, pos_embed="resize")
    with pytest.raises(UsageError, match="interval"):
        SlidingWindowGuided(unet, weight=0.5, interval=(10, 1))


# ----------------------------------------------------------------------------
# DiT: position tables, the toolkit's DiT, DiTPipeline end to end.

@pytest.mark.parametrize("policy", ["resize", "sincos"])
def test_diffusers_dit_windows_match_the_toolkits_dit(policy):
    net = _our_dit(pos_embed=policy)
    model = match_official_dit(to_diffusers(net))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(12))
    t, y = torch.tensor([100, 800]), torch.tensor([3, 9])
    with torch.no_grad():
        ours = dit_guidance(net, "swg", g_scale=0.8, mask=True, window_size=10)(x, t, y)
        theirs = SlidingWindowGuided(model, weight=0.8, window_size=10, pos_embed=policy, cfg_batch=False)(
            x, timestep=t, class_labels=y).sample
        native = SlidingWindowGuided(model, weight=0.8, window_size=10, pos_embed="native", cfg_batch=False)(
            x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)
    assert (native - ours).abs().max() > 1e-4  # diffusers' stretched table is a different policy


def _dit_pipe(model):
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, layers_per_block=1).eval()
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dit_pipeline_end_to_end():
    model = to_diffusers(_our_dit(num_classes=1000))  # DiTPipeline's null class is 1000
    pipe = _dit_pipe(model)

    def sample(scale):
        return pipe(class_labels=[1, 7], guidance_scale=scale, num_inference_steps=3, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    plain_cfg, plain = sample(1.5), sample(1.0)
    pipe.transformer = SlidingWindowGuided(pipe.transformer, weight=0.5, window_size=10, window_steps=2)
    swg_cfg, swg = sample(1.5), sample(1.0)
    pipe.transformer.swg.weight = 0.0
    off = sample(1.5)
    pipe.transformer = pipe.transformer.model
    assert swg_cfg.shape == (2, 3, 16, 16) and torch.isfinite(swg_cfg).all()
    assert (swg_cfg - plain_cfg).abs().max() > 1e-3 and (swg - plain).abs().max() > 1e-3
    assert torch.equal(off, plain_cfg)


def test_dit_pipeline_step_is_cfg_swg():
    """One DiTPipeline step's CFG on the wrapper's output = the toolkit's cfg-swg on all eps channels."""
    net = _our_dit(num_classes=1000)
    model = match_official_dit(to_diffusers(net))
    s, w = 1.5, 0.4
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(13))
    y = torch.tensor([4, 8])
    t = torch.tensor(700)
    with torch.no_grad():
        out = SlidingWindowGuided(model, weight=w, window_size=10, cfg_batch=True)(
            torch.cat([x, x]), timestep=t.expand(4), class_labels=torch.cat([y, torch.full_like(y, 1000)])).sample
        c, u = out[:2, :4], out[2:, :4]  # DiTPipeline: [cond; uncond], CFG on the eps channels
        ref = dit_guidance(net, "cfg-swg", g_scale=s - 1, crop_scale=w, mask=True, window_size=10)(x, t, y)
    torch.testing.assert_close(u + s * (c - u), ref[:, :4], atol=5e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# eps / v / flow: guiding the output is guiding the denoised estimate.

@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_output_guidance_equals_denoised_guidance(kind, unet):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(14))
    ehs = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(15))
    t = torch.tensor(400)
    alpha_bar = torch.tensor(0.37)  # any fixed schedule value
    sigma = torch.tensor(0.4)       # flow: x_t = (1 - sigma) x0 + sigma noise

    def to_x0(xt, out):
        if kind == "epsilon":
            return (xt - (1 - alpha_bar).sqrt() * out) / alpha_bar.sqrt()
        if kind == "v_prediction":
            return alpha_bar.sqrt() * xt - (1 - alpha_bar).sqrt() * out
        return xt - sigma * out

    den = DiffusersDenoiser(unet, dict(encoder_hidden_states=ehs), 2)

    def den_x0(xt, tt, rows):
        return to_x0(xt, den(xt, tt, rows))

    kw = dict(weight=0.9, window_size=(10, 12), window_steps=(2, 3))  # non-square, uneven overlaps
    with torch.no_grad():
        on_output = to_x0(x, guide(den, "swg", **kw)(x, t, torch.arange(2)))
        on_x0 = guide(den_x0, "swg", **kw)(x, t, torch.arange(2))
        plain = to_x0(x, den(x, t))
    torch.testing.assert_close(on_output, on_x0, atol=1e-4, rtol=1e-5)
    assert (on_x0 - plain).abs().max() > 1e-3


# ----------------------------------------------------------------------------
# The guider (diffusers.guiders.BaseGuidance), driven as a modular pipeline's denoise step drives it.

def test_guider_matches_the_wrapper(sdxl_unet):
    pytest.importorskip("diffusers.guiders")
    n, s, w = 2, 3.0, 0.5
    x = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(16))
    cond, uncond = _sdxl_inputs(n, 17), _sdxl_inputs(n, 18)
    t = torch.tensor(420)
    guider = SlidingWindowGuidance(guidance_scale=s, swg_scale=w, window_size=10)
    guider.set_state(step=0, num_inference_steps=10, timestep=t)
    inputs = {"prompt_embeds": (cond["encoder_hidden_states"], uncond["encoder_hidden_states"]),
              "text_embeds": (cond["added_cond_kwargs"]["text_embeds"], uncond["added_cond_kwargs"]["text_embeds"]),
              "time_ids": (cond["added_cond_kwargs"]["time_ids"], uncond["added_cond_kwargs"]["time_ids"])}
    batches = guider.prepare_inputs(inputs)
    assert [getattr(b, "__guidance_identifier__") for b in batches] == ["pred_cond", "pred_uncond", "pred_cond_window"]
    with torch.no_grad():
        for batch in batches:  # the loop of diffusers' modular SDXL denoise step
            guider.prepare_models(sdxl_unet)
            batch.noise_pred = sdxl_unet(x, t, encoder_hidden_states=batch.prompt_embeds,
                                         added_cond_kwargs={"text_embeds": batch.text_embeds,
                                                            "time_ids": batch.time_ids}, return_dict=False)[0]
            guider.cleanup_models(sdxl_unet)
        pred = guider(batches)[0]
        after = sdxl_unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                          added_cond_kwargs=cond["added_cond_kwargs"]).sample
        expected, _ = _cfg_call(SlidingWindowGuided(sdxl_unet, weight=w, window_size=10, cfg_batch=True), x, t, cond,
                                uncond, s)
    torch.testing.assert_close(pred, expected, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(after, batches[0].noise_pred, atol=0, rtol=0)  # the hook is gone
    # Outside start/stop only the conditional prediction is asked for.
    late = SlidingWindowGuidance(guidance_scale=s, swg_scale=w, start=0.0, stop=0.5)
    late.set_state(step=7, num_inference_steps=10, timestep=t)
    assert late.num_conditions == 1 and len(late.prepare_inputs(inputs)) == 1
    assert "pred_cond_window" in SlidingWindowGuidance.__doc__ and "w m (pred_cond - pred_cond_window)" in \
        SlidingWindowGuidance.__doc__


# ----------------------------------------------------------------------------
# SD3 and PixArt transformers: windows through their own patch embedding.

def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(3)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)
    inputs = dict(encoder_hidden_states=torch.randn(2, 5, 8), pooled_projections=torch.randn(2, 8))
    return model, inputs, torch.tensor([700.0, 700.0])


def _pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(4)
    model = PixArtTransformer2DModel(sample_size=16, num_layers=1, patch_size=2, attention_head_dim=12,
                                     num_attention_heads=2, caption_channels=8, in_channels=4, cross_attention_dim=24,
                                     out_channels=8, use_additional_conditions=True, norm_num_groups=4)
    inputs = dict(encoder_hidden_states=torch.randn(2, 5, 8),
                  encoder_attention_mask=torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2]),
                  added_cond_kwargs=dict(resolution=torch.tensor([[128.0, 128.0], [96.0, 128.0]]),
                                         aspect_ratio=torch.tensor([[1.0], [0.75]])))
    return model, inputs, torch.tensor([300, 300])


def _rows(value, i):
    if torch.is_tensor(value):
        return value[i:i + 1]
    return {k: _rows(v, i) for k, v in value.items()}


@pytest.mark.parametrize("build", [_sd3, _pixart], ids=["sd3", "pixart"])
def test_transformer_windows_equal_single_sample_calls(build):
    model, inputs, t = build()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(19))
    grid = WindowGrid.create(16, 16, 10, 2)
    den = DiffusersDenoiser(model, inputs, 2)
    with torch.no_grad():
        win, _ = sliding_window_predict(den, x, t, torch.arange(2), grid)
        expected = torch.zeros_like(win)
        for y, l in grid.boxes():
            for i in range(2):
                crop = x[i:i + 1, :, y:y + 10, l:l + 10]
                expected[i, :, y:y + 10, l:l + 10] += model(crop, timestep=t[i:i + 1], **_rows(inputs, i)).sample[0]
        wrapped = SlidingWindowGuided(model, weight=0.5, window_size=10, cfg_batch=False)(x, timestep=t, **inputs)
        plain = model(x, timestep=t, **inputs).sample
    torch.testing.assert_close(win, expected / grid.count(), atol=2e-5, rtol=1e-5)
    m = (grid.count() > 1).float()
    torch.testing.assert_close(wrapped.sample, plain + 0.5 * m * (plain - win), atol=2e-5, rtol=1e-5)
