"""notebooks/visualize.ipynb runs headless (nbclient) on tiny EDM2 and DiT models and saves its grids."""

from __future__ import annotations

import json
import pathlib

import nbformat
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL
from nbclient import NotebookClient

from networks.dit import create_dit
from networks.edm2_pickle import load_checkpoint
from sampling.edm import edm_sampler
from sampling.gaussian_diffusion import create_diffusion
from benchmarks import edm2_snapshot as WR

ROOT = pathlib.Path(__file__).resolve().parents[1]
EDM2 = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, model_channels=8,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
DIT = {"hidden_size": 32, "depth": 2, "num_heads": 2}
SEEDS = [3, 11]
EDM2_COLUMNS = ["none", "cfg:0.9", "m-swg:0.5", "cfg-m-swg:0.3,0.3"]
DIT_COLUMNS = ["none", "cfg:0.5", "m-swg:1.5", "cfg-m-swg:0.6,0.5"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models in the formats the loaders accept: EDM2 pickles, a DiT state dict, a diffusers VAE folder."""
    d = tmp_path_factory.mktemp("nb_models")
    for seed, name, label_dim in ((0, "pos.pkl", 10), (1, "uncond.pkl", 0)):
        torch.manual_seed(seed)
        net = WR.make_precond(**dict(EDM2, label_dim=label_dim))
        with torch.no_grad():  # EDM2 initialises these gains to zero, which makes D independent of F
            for pname, p in net.named_parameters():
                if pname.endswith(("out_gain", "emb_gain")):
                    p.fill_(0.4)
        WR.write_edm2_pickle(d / name, net, half=False)
    torch.manual_seed(2)
    net = create_dit("DiT-S/2", input_size=8, num_classes=10, **DIT)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.1)
    torch.save(net.state_dict(), d / "dit.pt")
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(d / "vae", safe_serialization=True)
    return d


def _tiles(path: pathlib.Path, rows: int, cols: int, size: int, pad: int = 2) -> np.ndarray:
    img = np.asarray(PIL.Image.open(path).convert("RGB"))
    assert img.shape == (rows * size + (rows - 1) * pad, cols * size + (cols - 1) * pad, 3)
    return np.stack([np.stack([img[i * (size + pad):i * (size + pad) + size, j * (size + pad):j * (size + pad) + size]
                               for j in range(cols)]) for i in range(rows)])


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to one grey level in a few pixels (batch size changes float rounding before uint8)."""
    diff = np.abs(actual.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


@torch.no_grad()
def _edm2_unguided(path: pathlib.Path, seed: int) -> np.ndarray:
    """One unguided image computed directly: the seed's generator draws noise, then the class, then churn."""
    net = load_checkpoint(path).net.eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn([1, 3, 16, 16], generator=g)
    label = torch.eye(10)[torch.randint(10, size=[1], generator=g)]
    x = edm_sampler(lambda x, s, c: net(x, s, c), noise, label, num_steps=2)
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()


@torch.no_grad()
def _dit_unguided(path: pathlib.Path, vae_dir: pathlib.Path, seed: int, label: int) -> np.ndarray:
    net = create_dit("DiT-S/2", input_size=8, num_classes=10, **DIT)
    net.load_state_dict(torch.load(path, weights_only=True))
    net.eval()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn([1, 4, 8, 8], generator=g)
    torch.randint(10, size=[1], generator=g)  # the seed's random class, replaced by the row's class
    y = torch.tensor([label])
    x = create_diffusion("3").p_sample_loop(lambda x, t, c: net(x, t, c), z, y,
                                            randn_like=lambda x: torch.randn(x.shape, generator=g))
    img = vae.decode(x / 0.18215).sample
    return torch.clamp(127.5 * img + 128.0, 0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()


def test_notebook_runs_headless(models, tmp_path):
    nb = nbformat.read(ROOT / "notebooks" / "visualize.ipynb", as_version=4)
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    out = tmp_path / "figures"
    overrides = {
        "out_dir": str(out), "device": "cpu", "seeds": SEEDS, "classes": None,
        "edm2_pos": str(models / "pos.pkl"), "edm2_uncond": str(models / "uncond.pkl"), "edm2_neg": None,
        "edm2_columns": EDM2_COLUMNS, "edm2_swg_sizes": 12, "edm2_steps": 2,
        "dit_model": "DiT-S/2", "dit_ckpt": str(models / "dit.pt"), "dit_image_size": 64,
        "dit_model_kwargs": DIT, "dit_num_classes": 10, "dit_vae_path": str(models / "vae"),
        "dit_columns": DIT_COLUMNS, "dit_sampling_steps": "3", "dit_window_size": 6,
    }  # windows of 6 on the 8x8 latent overlap, so the M-SWG mask is not empty
    source = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    source += "\nclasses_dit = [4, 7]"  # the DiT grid gets fixed classes, the EDM2 grid random ones
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    # DiT with fixed classes: patch the call through a tiny wrapper cell (same API the notebook uses).
    for cell in nb.cells:
        if cell.cell_type == "code" and "dit_grid(parse_columns(dit_columns), seeds, classes," in cell.source:
            cell.source = cell.source.replace("seeds, classes,", "seeds, classes_dit,")
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    # Labelled figures: PNGs of the size draw_grid gives (cell 1.6 in + margins, 100 dpi).
    for name, cols in (("edm2_grid.png", EDM2_COLUMNS), ("dit_grid.png", DIT_COLUMNS)):
        img = PIL.Image.open(out / name)
        assert img.format == "PNG"
        assert img.size == (round((1.6 * len(cols) + 0.9) * 100), round((1.6 * len(SEEDS) + 0.7) * 100))
        assert np.asarray(img.convert("L")).std() > 5

    edm2 = _tiles(out / "edm2_mosaic.png", len(SEEDS), len(EDM2_COLUMNS), 16)
    for r, seed in enumerate(SEEDS):
        _close(edm2[r, 0], _edm2_unguided(models / "pos.pkl", seed))
        for c in range(1, len(EDM2_COLUMNS)):  # every guided column changes the image
            assert np.abs(edm2[r, c].astype(int) - edm2[r, 0]).max() > 0
    dit = _tiles(out / "dit_mosaic.png", len(SEEDS), len(DIT_COLUMNS), 64)
    for r, (seed, label) in enumerate(zip(SEEDS, [4, 7])):
        _close(dit[r, 0], _dit_unguided(models / "dit.pt", models / "vae", seed, label))
        for c in range(1, len(DIT_COLUMNS)):
            assert np.abs(dit[r, c].astype(int) - dit[r, 0]).max() > 0
    # The notebook's own output lists what it saved.
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "edm2_grid.png" in text and "dit_mosaic.png" in text


@pytest.mark.parametrize("kernel_dir", ["notebooks", "."])
def test_default_figures_folder_is_the_ignored_one_and_printed(kernel_dir):
    """Run as README says (``jupyter execute`` starts the kernel in notebooks/) or from the repository root
    (papermill), the default figures folder is notebooks/figures/, which git ignores, and the notebook says so
    (issue 23 #10: it wrote to notebooks/notebooks/figures/ without saying where)."""
    import subprocess

    nb = nbformat.read(ROOT / "notebooks" / "visualize.ipynb", as_version=4)
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell("run_edm2 = False\nrun_dit = False"))  # no model needed
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / kernel_dir)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    expected = ROOT / "notebooks" / "figures"
    assert f"figures go to {expected}\n" in text, text
    assert "nothing saved" in text
    if (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", str(expected / "edm2_grid.png")], cwd=ROOT)
        assert ignored.returncode == 0, "notebooks/figures/ must be git-ignored"
