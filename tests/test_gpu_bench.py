"""``benchmarks/gpu_bench.py`` runs end to end on the CPU (it has never had a GPU to itself).

The script is meant for one short call on a lent GPU machine; a crash there would
waste the call.  Here it runs its whole path at the smallest published size
(EDM2-XS, batch 1, one sampler step) without the reference checkout, which the
tests cannot fetch: accuracy section (with a narrow VAE), timing, FLOP counting,
the variants pass and both output files.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from benchmarks import gpu_bench
from benchmarks.real_scale import edm2_init_kwargs, random_edm2


@pytest.fixture()
def narrow_vae(tmp_path, monkeypatch):
    """The SD VAE's layout with 32 channels per level: the same 8x decode, 40 times cheaper than the real one."""
    config = json.loads(gpu_bench.VAE_CONFIG.read_text())
    config.update(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    (tmp_path / "vae.json").write_text(json.dumps(config))
    monkeypatch.setattr(gpu_bench, "VAE_CONFIG", tmp_path / "vae.json")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cpu_run_writes_rows_and_accuracy(tmp_path, narrow_vae):
    out = tmp_path / "bench"
    assert gpu_bench.main(["--refcode", "none", "--device", "cpu", "--models", "edm2-xs", "--batches", "1",
                           "--steps", "1", "--warmup", "0", "--repeats", "1", "--accuracy", "1",
                           "--accuracy-steps", "1", "--accuracy-batch", "1", "--variants", "nocache",
                           "--variants-model", "xs", "--out", str(out)]) == 0
    result = json.loads((out / "gpu_bench.json").read_text())
    main_row, variant_row = result["speed"]
    assert main_row["model"] == "EDM2-XS" and variant_row["model"] == "EDM2-XS variant nocache"
    assert main_row["params"] == 124_713_253  # EDM2-XS as published
    assert main_row["ours_img_per_s"] > 0 and main_row["tflop_per_eval"] > 0
    assert variant_row["ours+nocache_vs_ours"] > 0
    # One M-SWG evaluation = the plain one at 64x64 + 2x2 windows of 40x40 (4 * 40^2 / 64^2 = 1.56 plain).
    net = random_edm2(edm2_init_kwargs("xs"), seed=1).float()
    noise, labels = gpu_bench.edm2_inputs(net, 1, torch.device("cpu"))
    with torch.no_grad():
        plain = gpu_bench.count_flops(lambda: net(noise, torch.full((1,), 2.5), labels))
    assert 2.3 < main_row["tflop_per_eval"] * 1e12 / plain < 2.7
    # On the CPU the U-Net's fp16 path is its fp32 path: the two agree exactly.
    errs = result["accuracy"]["denoiser_rel_err"]
    assert set(errs) == {"sigma=80", "sigma=5", "sigma=0.5", "sigma=0.05"}
    assert all(row["ours_fp16_vs_fp32"] == 0 for row in errs.values())
    assert result["accuracy"]["psnr_db"]["ours_fp16_vs_fp32"] == float("inf")  # identical decoded images
    assert "EDM2-XS" in (out / "gpu_bench.md").read_text()


def test_unknown_variant_is_refused_before_any_network(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(gpu_bench, "edm2_pair", lambda *a, **k: built.append(a))
    with pytest.raises(SystemExit, match="unknown variant 'compiled'; use nocache, channels_last, compile"):
        gpu_bench.main(["--refcode", "none", "--device", "cpu", "--variants", "compile,compiled",
                        "--out", str(tmp_path)])
    assert built == []


REFCODE = pathlib.Path(__file__).resolve().parents[1] / ".refcode"


@pytest.mark.skipif(not (REFCODE / "edm2" / "training" / "networks_edm2.py").is_file(),
                    reason="no .refcode/ (benchmarks/prep_refcode.sh fills it where there is internet)")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_against_the_reference_checkout(tmp_path, narrow_vae):
    """With the reference code present: both codes' rows, the same outputs, its accuracy rows."""
    out = tmp_path / "bench"
    assert gpu_bench.main(["--refcode", str(REFCODE), "--device", "cpu", "--models", "edm2-xs", "--batches", "1",
                           "--steps", "2", "--warmup", "0", "--repeats", "1", "--accuracy", "1",
                           "--accuracy-steps", "2", "--accuracy-batch", "1", "--variants", "channels_last",
                           "--variants-model", "xs", "--out", str(out)]) == 0
    result = json.loads((out / "gpu_bench.json").read_text())
    row, variant = result["speed"]
    assert row["ref_img_per_s"] > 0 and row["speedup"] == row["ours_img_per_s"] / row["ref_img_per_s"]
    assert variant["model"] == "EDM2-XS variant channels_last" and variant["ours+channels_last_vs_ours"] > 0
    for sigma, errs in result["accuracy"]["denoiser_rel_err"].items():
        assert errs["ref_fp16_vs_fp32"] == 0, sigma  # the CPU runs both codes' fp16 paths in fp32
        assert errs["ours_fp32_vs_ref_fp32"] < 1e-5, sigma  # the same network, the same numbers
    psnr = result["accuracy"]["psnr_db"]
    assert psnr["ours_fp32_vs_ref_fp32"] > 60  # the same M-SWG sampler result, decoded alike
    assert result["reference_commit"]
