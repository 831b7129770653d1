"""DiT network, checkpoints in the official layouts, bad sizes, and DiT's diffusion."""

from __future__ import annotations

import argparse
import collections

import numpy as np
import pytest
import torch

from conftest import rel_err
from networks.dit import DiT, DiT_models, DiTSizeError, create_dit, load_dit, load_dit_state_dict, sincos_pos_embed_2d
from guidance.dit import DiTDenoiser, default_window_size, dit_guidance
from sampling.gaussian_diffusion import create_diffusion, linear_betas, space_timesteps
from utils.errors import UsageError

TINY = dict(input_size=8, num_classes=5, hidden_size=32, num_heads=2, depth=1)


def _randomize(net: DiT, seed: int = 0) -> DiT:
    """Give the zero-initialised adaLN / output layers random values so outputs depend on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


# ----------------------------------------------------------------------------
# Model zoo and the network.

def test_zoo_matches_published_configs():
    published = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
    assert len(DiT_models) == 12
    for size, (depth, hidden, heads) in published.items():
        for patch in (2, 4, 8):
            kw = DiT_models[f"DiT-{size}/{patch}"].keywords
            assert (kw["depth"], kw["hidden_size"], kw["num_heads"], kw["patch_size"]) == (depth, hidden, heads, patch)
    with pytest.raises(UsageError, match="unknown DiT model 'DiT-M/2'"):
        create_dit("DiT-M/2")


def test_sincos_table_properties():
    dim, grid = 16, 4
    table = sincos_pos_embed_2d(dim, grid)
    assert table.shape == (grid * grid, dim)
    # Token index r*grid + c: first half encodes the column, second half the row.
    col = torch.arange(grid * grid) % grid
    row = torch.arange(grid * grid) // grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    expect_col = torch.cat([torch.sin(col[:, None] * omega), torch.cos(col[:, None] * omega)], 1)
    expect_row = torch.cat([torch.sin(row[:, None] * omega), torch.cos(row[:, None] * omega)], 1)
    assert torch.allclose(table.double(), torch.cat([expect_col, expect_row], 1), atol=1e-6)
    # Rectangular grids.
    assert sincos_pos_embed_2d(dim, 2, 3).shape == (6, dim)


@torch.no_grad()
def test_output_shapes_and_batch_independence():
    net = _randomize(create_dit("DiT-S/2", **TINY))
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 4])
    out = net(x, t, y)
    assert out.shape == (2, 8, 8, 8)
    win = net(x[:, :, :4, :6], t, y)
    assert win.shape == (2, 8, 4, 6)
    # Batch independence: each sample's output depends only on itself.
    assert rel_err(net(x[:1], t[:1], y[:1]), out[:1]) < 1e-5


@torch.no_grad()
def test_bad_sizes_and_labels_give_clear_errors():
    net = _randomize(create_dit("DiT-S/2", **TINY))
    t, y = torch.tensor([1]), torch.tensor([0])
    with pytest.raises(DiTSizeError, match="not a multiple of the patch size 2"):
        net(torch.randn(1, 4, 7, 8), t, y)
    with pytest.raises(DiTSizeError, match="larger than the trained 8x8"):
        net(torch.randn(1, 4, 10, 10), t, y)
    with pytest.raises(DiTSizeError, match=r"latents of shape \[N, 4, H, W\]"):
        net(torch.randn(1, 3, 8, 8), t, y)
    with pytest.raises(UsageError, match="class labels must lie in"):
        net(torch.randn(1, 4, 8, 8), t, torch.tensor([6]))
    # The null class (num_classes) is accepted and is what labels=None means.
    den = DiTDenoiser(net)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(den(x, t, None), net(x, t, torch.tensor([5])))
    # Exact tables can go beyond the trained grid.
    exact = DiT(**TINY, pos_embed="sincos").eval()
    assert exact(torch.randn(1, 4, 12, 10), t, y).shape == (1, 8, 12, 10)
    with pytest.raises(UsageError, match="position-table mode"):
        DiT(**TINY, pos_embed="nearest")


def test_no_null_class_without_label_dropout():
    net = DiT(**TINY, class_dropout_prob=0.0).eval()
    assert net.y_embedder.embedding_table.num_embeddings == 5
    with pytest.raises(UsageError, match="no null-class embedding"):
        DiTDenoiser(net)(torch.randn(1, 4, 8, 8), 10, None)


def test_default_window_sizes():
    assert default_window_size(32) == 20 and default_window_size(64) == 40


# ----------------------------------------------------------------------------
# Checkpoints in the official layouts.

@torch.no_grad()
def test_plain_and_training_checkpoints_load(tmp_path):
    model = _randomize(create_dit("DiT-B/4", **TINY), seed=1)
    ema = _randomize(create_dit("DiT-B/4", **TINY), seed=2)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([0, 3])

    plain = tmp_path / "DiT-B-4-64x64.pt"  # released layout: a plain OrderedDict
    torch.save(collections.OrderedDict(model.state_dict()), plain)
    net = load_dit("DiT-B/4", plain, **TINY)
    assert torch.equal(net(x, t, y), model(x, t, y))

    # train.py layout: model, ema, optimizer state and the argparse Namespace of the run.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.enable_grad():
        model.train()
        model(x, t, y).square().mean().backward()
        opt.step()
    train_ckpt = tmp_path / "0001000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": argparse.Namespace(model="DiT-B/4", image_size=64, epochs=1)}, train_ckpt)
    net = load_dit("DiT-B/4", train_ckpt, **TINY)
    assert torch.equal(net(x, t, y), ema.eval()(x, t, y))
    assert set(load_dit_state_dict(train_ckpt)) == set(ema.state_dict())


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_bad_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(create_dit("DiT-S/2", **TINY).state_dict(), good)
    with pytest.raises(UsageError, match="does not fit DiT-S/4 .*check --model, --image-size and --num-classes"):
        load_dit("DiT-S/4", good, **TINY)
    with pytest.raises(UsageError, match="does not fit .*num_classes=7"):
        load_dit("DiT-S/2", good, **{**TINY, "num_classes": 7})
    with pytest.raises(UsageError, match="not found"):
        load_dit("DiT-S/2", tmp_path / "missing.pt", **TINY)
    evil = tmp_path / "evil.pt"
    torch.save({"ema": _Evil()}, evil)
    with pytest.raises(UsageError, match="refusing to load DiT checkpoint .*could run code"):
        load_dit_state_dict(evil)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot read DiT checkpoint"):
        load_dit_state_dict(junk)
    not_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(UsageError, match="holds no DiT state dict"):
        load_dit_state_dict(not_state)


# ----------------------------------------------------------------------------
# The diffusion.

def test_space_timesteps_strings():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert all(0 < b - a <= 5 for a, b in zip(steps, steps[1:]))
    assert space_timesteps(1000, 250) == steps
    assert space_timesteps(1000, "1000") == list(range(1000))
    # Sections: 300 steps as 10, 15, 20 -> three sections of 100 strided separately.
    s = space_timesteps(300, "10,15,20")
    assert len(s) == 45 and s[:10] == list(range(0, 100, 11)) and s[10] == 100 and s[-1] == 299
    for bad, msg in [("ddimx", "ddimN"), ("ddim999", "no integer stride"), ("1001", "at most 1000"),
                     ("a,b", "bad respacing"), ("0", "positive")]:
        with pytest.raises(UsageError, match=msg):
            space_timesteps(1000, bad)


def test_respaced_betas_keep_the_marginals():
    base = linear_betas(1000)
    assert base[0] == pytest.approx(1e-4) and base[-1] == pytest.approx(0.02)
    diff = create_diffusion("ddim50")
    abar_base = np.cumprod(1 - base)
    assert np.allclose(diff.alphas_cumprod, abar_base[diff.timestep_map], rtol=1e-12)
    assert list(create_diffusion("").timestep_map) == list(range(1000))


def test_reverse_step_analytic():
    """An oracle eps gives x0_hat = x0 exactly, the posterior mean, and v = -1 / +1 select
    the posterior / beta variance."""
    diff = create_diffusion("10")
    i = 5
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    abar = diff.alphas_cumprod[i]
    xt = (np.sqrt(abar) * x0.double() + np.sqrt(1 - abar) * eps.double()).float()
    for v, expect in ((-1.0, diff.posterior_log_variance_clipped[i]), (1.0, np.log(diff.betas[i]))):
        out = diff.p_mean_variance(torch.cat([eps, torch.full_like(eps, v)], 1), xt, i)
        assert rel_err(out["pred_xstart"], x0) < 1e-5
        abar_prev = diff.alphas_cumprod[i - 1]
        mean = (np.sqrt(abar_prev) * diff.betas[i] * x0.double()
                + np.sqrt(1 - diff.betas[i]) * (1 - abar_prev) * xt.double()) / (1 - abar)
        assert rel_err(out["mean"], mean) < 1e-5
        assert torch.allclose(out["log_variance"].double(), torch.full_like(xt, expect).double(), atol=1e-5)
    # The last step adds no noise; the model sees the original timestep.
    seen = []

    def model(x, t, labels):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 8, *x.shape[2:])
    final = diff.p_sample(model, xt, 0, None, randn_like=lambda x: torch.full_like(x, 1e6))["sample"]
    assert final.abs().max() < 1e3 and seen == [[0, 0]]
    diff.p_sample(model, xt, 9, None)
    assert seen[-1] == [999, 999]


def test_fixed_variance_without_learned_sigma():
    diff = create_diffusion("10", learn_sigma=False)
    out = diff.p_mean_variance(torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), 3)
    assert torch.allclose(out["log_variance"], torch.full((1, 4, 2, 2), float(np.log(diff.betas[3]))))


@torch.no_grad()
def test_loop_calls_begin_step_and_is_batch_independent():
    net = _randomize(create_dit("DiT-S/2", **TINY))
    guided = dit_guidance(net, "swg", g_scale=0.3, mask=True, window_size=6)
    steps = []
    guided.begin_step = lambda k, f=guided.begin_step: (steps.append(k), f(k))
    diff = create_diffusion("5")
    noise = torch.randn(3, 4, 8, 8)
    y = torch.tensor([0, 1, 2])
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    stacked = lambda x: torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
    full = diff.p_sample_loop(guided, noise, y, randn_like=stacked)
    assert steps == [0, 1, 2, 3, 4]
    gen1 = torch.Generator().manual_seed(1)
    one = diff.p_sample_loop(guided, noise[1:2], y[1:2],
                             randn_like=lambda x: torch.randn(x.shape[1:], generator=gen1)[None])
    assert rel_err(one, full[1:2]) < 1e-5
