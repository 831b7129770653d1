"""This project next to the paper's reference code, same random weights, one process (GPU or CPU).

Measures, on the published architectures with random weights:

* accuracy (CUDA only): the fp16 EDM2 path against fp32 on the same weights and
  noise, relative error of the denoiser output at several noise levels and PSNR
  of VAE-decoded images after a short M-SWG sampling run; the same for the
  reference's fp16 path, and ours against the reference;
* speed: images per second of M-SWG for EDM2-S, EDM2-XXL and DiT-XL/2 (256 px)
  at each batch, ours and the reference's side by side, timed on the same
  inputs one after the other; EDM2 is timed through each code's own EDM sampler
  (``--steps`` steps), DiT through one guided evaluation; images/s are
  extrapolated to a full run (EDM2: 32 steps = 63 evaluations, DiT: 250 steps);
* model FLOPs utilisation: FLOPs of one of our M-SWG evaluations counted with
  ``torch.utils.flop_counter``, divided by its time and the card's dense fp16 peak;
* the time of 50,000 EDM2-S M-SWG images (batch 64), extrapolated.

It writes ``gpu_bench.json`` and ``gpu_bench.md`` under ``--out``.  The reference
code is not part of this repository: ``benchmarks/prep_refcode.sh`` copies it into
``.refcode/`` (ignored by git), which the GPU machine receives with the working tree.

    python benchmarks/gpu_bench.py --refcode .refcode --out $OUT                # GPU, defaults
    python benchmarks/gpu_bench.py --refcode .refcode --device cpu --models edm2-s --batches 2 --steps 2
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
import types

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.real_scale import EDM2_SIZES, VAE_CONFIG, edm2_init_kwargs, random_dit, random_edm2  # noqa: E402

VARIANTS = ("nocache", "channels_last", "compile", "cudagraphs")  # see _variant
EDM2_EVALS_32 = 63    # Heun, 32 steps: 2 * 32 - 1 evaluations
DIT_STEPS = 250       # DDPM steps of the DiT evaluation protocol
# Dense fp16/bf16 tensor-core peaks (no sparsity), TFLOP/s.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0,
               "L40S": 362.0, "RTX 4090": 165.2}


# ----------------------------------------------------------------------------
# The reference code, loaded from a checkout without touching this project's packages.

def _load_file(name: str, path: pathlib.Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _functions_from(path: pathlib.Path, names, namespace: dict) -> dict:
    """The named top-level functions of a source file, without running the rest of it (its imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    missing = set(names) - {node.name for node in body}
    if missing:
        raise SystemExit(f"error: {path} has no {', '.join(sorted(missing))}; is it the SWG reference checkout?")
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return {n: namespace[n] for n in names}


class Reference:
    """EDM2 network + sampler and DiT model of the SWG reference checkout (``<refcode>/edm2/...``)."""

    def __init__(self, refcode: pathlib.Path):
        root = pathlib.Path(refcode) / "edm2"
        if not (root / "training" / "networks_edm2.py").is_file():
            raise SystemExit(f"error: {refcode} holds no edm2/training/networks_edm2.py; run "
                             f"benchmarks/prep_refcode.sh first (it fills .refcode/)")
        commit = pathlib.Path(refcode) / "COMMIT"  # written by prep_refcode.sh
        self.commit = commit.read_text().strip() if commit.is_file() else "unknown"
        sys.path.append(str(root))  # for its own 'torch_utils' and 'dnnlib' (appended: ours win on clashes)
        self.edm2 = _load_file("swg_reference_networks_edm2", root / "training" / "networks_edm2.py")
        fns = _functions_from(root / "sample_edm2.py", ["edges", "swg_guidance", "edm_sampler"],
                              {"torch": torch, "np": np})
        self.edm_sampler = fns["edm_sampler"]
        self.dit = None
        if (root / "diffusion" / "models.py").is_file():
            self.dit = _load_file("swg_reference_dit_models", root / "diffusion" / "models.py")

    def edm2_net(self, kwargs: dict, state: dict, device) -> torch.nn.Module:
        with torch.device(device):
            net = self.edm2.Precond(**kwargs)
        net.load_state_dict(state, strict=True)
        return net.eval().requires_grad_(False)

    def dit_net(self, image_size: int, state: dict, device) -> torch.nn.Module:
        with torch.device(device):
            # As its sample_dit.py builds it: windows are smaller than the model's input size.
            net = self.dit.DiT_models["DiT-XL/2"](input_size=image_size // 8, strict_img_size=False)
        net.load_state_dict(state, strict=True)
        return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------
# Helpers.

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_many(fns: dict, device, warmup: int, repeats: int) -> dict:
    """Median seconds of each function; repeats interleaved so that load drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.double() - b.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def peak_tflops(device, override) -> float:
    if override:
        return float(override)
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return float("nan")


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def edm2_inputs(net, batch: int, device, seed: int = 0):
    gen = torch.Generator(device).manual_seed(seed)
    c, r = net.img_channels, net.img_resolution
    noise = torch.randn(batch, c, r, r, device=device, generator=gen)
    idx = torch.randint(net.label_dim, (batch,), device=device, generator=gen)
    labels = torch.eye(net.label_dim, device=device)[idx]
    return noise, labels


def edm2_pair(size: str, ref: Reference, device):
    """Our Precond and the reference's, same random weights (fp32 masters, fp16 compute on CUDA)."""
    kwargs = edm2_init_kwargs(size)
    ours = random_edm2(kwargs, seed=1).float()
    state = {k: v for k, v in ours.state_dict().items()}
    theirs = ref.edm2_net(kwargs, state, device) if ref else None
    return ours.to(device), theirs


def ours_mswg_sampler(net, steps: int, weight: float = 0.2):
    from guidance import guide
    from sampling.edm import edm_sampler

    guided = guide(net, "swg", weight, window_size=40, window_steps=2, masked=True)
    return lambda noise, labels: edm_sampler(guided, noise, labels, num_steps=steps)


def ref_mswg_sampler(ref: Reference, net, steps: int, weight: float = 0.2):
    return lambda noise, labels: ref.edm_sampler(
        net, noise, labels=labels, net_neg=None, num_steps=steps, g_weight=weight, g_method="swg", swg_sizes=[40],
        swg_steps=2, g_interval=None, scale_window_guide=1)


# ----------------------------------------------------------------------------
# Sections.

@torch.no_grad()
def accuracy(ref: Reference, device, steps: int, batch: int = 4) -> dict:
    """fp16 vs fp32 (same weights and noise): denoiser relative error and PSNR of decoded images.

    The fp32 side is true fp32: TF32 matmuls and convolutions are off for this section.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _accuracy(ref, device, steps, batch)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _accuracy(ref: Reference, device, steps: int, batch: int) -> dict:
    from networks.encoders import StabilityVAEEncoder

    ours, theirs = edm2_pair("s", ref, device)
    noise, labels = edm2_inputs(ours, batch, device)
    out: dict = {"denoiser_rel_err": {}}
    for sigma in (80.0, 5.0, 0.5, 0.05):
        x = noise * sigma
        s = torch.full((batch,), sigma, device=device)
        o32, o16 = ours(x, s, labels, force_fp32=True), ours(x, s, labels)
        row = {"ours_fp16_vs_fp32": rel_err(o16, o32)}
        if theirs is not None:
            r32, r16 = theirs(x, s, labels, force_fp32=True), theirs(x, s, labels)
            row.update(ref_fp16_vs_fp32=rel_err(r16, r32), ours_fp32_vs_ref_fp32=rel_err(o32, r32),
                       ours_fp16_vs_ref_fp16=rel_err(o16, r16))
        out["denoiser_rel_err"][f"sigma={sigma:g}"] = row

    # Short M-SWG runs in both precisions, decoded by the same fp32 VAE.
    try:
        from diffusers import AutoencoderKL
    except Exception as exc:  # noqa: BLE001 - not installed, or a wheel that does not fit this torch / hub
        out["psnr"] = (f"skipped: diffusers does not import here ({type(exc).__name__}: {exc}"[:300] +
                       "); carry its wheel, see benchmarks/run_gpu_bench.sh")
        return out
    config = {k: v for k, v in json.loads(VAE_CONFIG.read_text()).items() if not k.startswith("_")}
    torch.manual_seed(0)
    encoder = StabilityVAEEncoder(vae=AutoencoderKL(**config).eval().to(device), batch_size=batch)

    def run(net, sampler_factory, fp32: bool):
        net.use_fp16 = not fp32
        try:
            return encoder.decode(sampler_factory(net)(noise, labels))
        finally:
            net.use_fp16 = True

    ours_f = lambda n: ours_mswg_sampler(n, steps)  # noqa: E731
    img = {"ours32": run(ours, ours_f, True), "ours16": run(ours, ours_f, False)}
    out["psnr_db"] = {"ours_fp16_vs_fp32": psnr(img["ours16"], img["ours32"])}
    if theirs is not None:
        ref_f = lambda n: ref_mswg_sampler(ref, n, steps)  # noqa: E731
        img.update(ref32=run(theirs, ref_f, True), ref16=run(theirs, ref_f, False))
        out["psnr_db"].update(ref_fp16_vs_fp32=psnr(img["ref16"], img["ref32"]),
                              ours_fp16_vs_ref_fp16=psnr(img["ours16"], img["ref16"]),
                              ours_fp32_vs_ref_fp32=psnr(img["ours32"], img["ref32"]))
    out["psnr_note"] = f"{steps}-step M-SWG (w=0.2, 40x40 windows), batch {batch}, random VAE decoder in fp32"
    # fp16 VAE decode: time and agreement with the fp32 decode.
    if device.type == "cuda":
        lat = torch.randn(8, 4, 64, 64, device=device)
        t32 = timed(lambda: encoder.decode(lat), device, 1, 3)
        p32 = encoder.decode(lat)
        encoder.vae.half()
        dec16 = lambda: encoder.vae.decode((lat.half() - torch.as_tensor(encoder.bias, device=device).half().view(1, -1, 1, 1))  # noqa: E731
                                            / torch.as_tensor(encoder.scale, device=device).half().view(1, -1, 1, 1)).sample
        t16 = timed(dec16, device, 1, 3)
        p16 = dec16().float().clamp(0, 1).mul(255).to(torch.uint8)
        encoder.vae.float()
        out["vae_decode"] = {"batch": 8, "fp32_s": t32, "fp16_s": t16, "psnr_fp16_vs_fp32_db": psnr(p16, p32)}
    return out


@torch.no_grad()
def edm2_speed(size: str, ref: Reference, device, batches, steps: int, warmup: int, repeats: int,
               peak: float, variants=()) -> list:
    ours, theirs = edm2_pair(size, ref, device)
    params = sum(p.numel() for p in ours.parameters())
    rows = []
    for batch in batches:
        noise, labels = edm2_inputs(ours, batch, device)
        evals = 2 * steps - 1
        row = {"model": f"EDM2-{size.upper()}", "params": params, "batch": batch, "steps_timed": steps}
        codes = {"ours": ours_mswg_sampler(ours, steps)}
        if theirs is not None:
            codes["ref"] = ref_mswg_sampler(ref, theirs, steps)
        for variant in variants:  # a variant that fails here (no compiler, ...) is reported, not fatal
            try:
                fn = _variant(ours, variant, steps)
                fn(noise, labels)  # compiles, captures graphs
                codes[f"ours+{variant}"] = fn
            except Exception as exc:  # noqa: BLE001
                row[f"ours+{variant}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        seconds = timed_many({name: (lambda fn=fn: fn(noise, labels)) for name, fn in codes.items()}, device,
                             warmup, repeats)
        for name, t in seconds.items():
            row[f"{name}_s_per_eval"] = t / evals
            row[f"{name}_img_per_s"] = batch / (t / evals * EDM2_EVALS_32)
        for variant in variants:  # > 1: the variant is faster than our default path
            if f"ours+{variant}" in seconds:
                row[f"ours+{variant}_vs_ours"] = seconds["ours"] / seconds[f"ours+{variant}"]
        if theirs is not None:
            row["speedup"] = row["ours_img_per_s"] / row["ref_img_per_s"]
        guided_eval = _one_eval(ours, noise, labels)
        flops = count_flops(guided_eval)
        row["tflop_per_eval"] = flops / 1e12
        row["mfu"] = flops / row["ours_s_per_eval"] / (peak * 1e12) if peak == peak else float("nan")
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del ours, theirs
    return rows


def _one_eval(net, noise, labels):
    from guidance import guide

    guided = guide(net, "swg", 0.2, window_size=40, window_steps=2, masked=True)
    sigma = torch.full((noise.shape[0],), 2.5, device=noise.device)
    return lambda: guided(noise * 2.5, sigma, labels)


def _variant(net, variant: str, steps: int):
    """Optional variants of our code: ``nocache`` (weights re-normalised every call), ``channels_last``
    inputs, ``compile`` (torch.compile of the U-Net), ``cudagraphs`` (compiled, ``reduce-overhead``)."""
    from guidance import guide
    from sampling.edm import edm_sampler

    if variant == "nocache":  # every weight re-normalised on every call, as the reference does
        guided = guide(net, "swg", 0.2, window_size=40, window_steps=2, masked=True)

        def run(noise, labels):
            net.use_weight_cache(False)
            try:
                return edm_sampler(guided, noise, labels, num_steps=steps)
            finally:
                net.use_weight_cache(True)
        return run
    if variant in ("compile", "cudagraphs"):  # cudagraphs: compiled and replayed as CUDA graphs
        import torch._inductor.config as inductor_config

        fast = copy.deepcopy(net)  # a copy: setting .unet on a shallow copy would change net too
        # Traced, the network skips its weight cache (networks/edm2.py: one graph per input shape);
        # inductor's freezing folds the weight normalisation into constants, the compiled form of the cache.
        inductor_config.freezing = True
        mode = "reduce-overhead" if variant == "cudagraphs" else None
        fast.unet = torch.compile(fast.unet, dynamic=False, mode=mode)
    elif variant == "channels_last":
        fast = copy.deepcopy(net).to(memory_format=torch.channels_last)
    else:
        raise SystemExit(f"error: unknown variant {variant!r}; use nocache, channels_last, compile or cudagraphs")
    guided = guide(fast, "swg", 0.2, window_size=40, window_steps=2, masked=True)
    if variant == "channels_last":
        return lambda noise, labels: edm_sampler(guided, noise.contiguous(memory_format=torch.channels_last),
                                                 labels, num_steps=steps)
    return lambda noise, labels: edm_sampler(guided, noise, labels, num_steps=steps)


@torch.no_grad()
def dit_speed(ref: Reference, device, batches, warmup: int, repeats: int, peak: float, image_size: int = 256) -> list:
    from guidance.dit import dit_guidance

    ours = random_dit(image_size, seed=2).to(device)
    state = ours.state_dict()
    theirs = ref.dit_net(image_size, state, device) if ref is not None and ref.dit is not None else None
    params = sum(p.numel() for p in ours.parameters())
    guided = dit_guidance(ours, "swg", g_scale=0.5, mask=True, window_steps=2)
    rows = []
    r = image_size // 8
    for batch in batches:
        x = torch.randn(batch, 4, r, r, device=device)
        t = torch.full((batch,), 500, device=device, dtype=torch.long)
        y = torch.arange(batch, device=device) % 1000
        row = {"model": f"DiT-XL/2 {image_size}", "params": params, "batch": batch}
        codes = {"ours": lambda: guided(x, t, y)}
        if theirs is not None:
            codes["ref"] = lambda: theirs.forward_with_crop(x, t, y, 0.5, mask=True)
            row["ours_vs_ref_rel_err"] = rel_err(codes["ours"](), codes["ref"]())
        for name, s in timed_many(codes, device, warmup, repeats).items():
            row[f"{name}_s_per_eval"] = s
            row[f"{name}_img_per_s"] = batch / (s * DIT_STEPS)
        if theirs is not None:
            row["speedup"] = row["ours_img_per_s"] / row["ref_img_per_s"]
        flops = count_flops(codes["ours"])
        row["tflop_per_eval"] = flops / 1e12
        row["mfu"] = flops / row["ours_s_per_eval"] / (peak * 1e12) if peak == peak else float("nan")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------

def markdown(result: dict) -> str:
    lines = [f"# gpu_bench: {result['device_name']}", "", result["note"], ""]
    lines += ["img/s: full runs extrapolated (EDM2 32 steps, DiT 250); s/eval: one M-SWG evaluation of the whole "
              "batch; MFU: of the card's dense fp16 peak (DiT, in fp32/TF32: of the TF32 peak, half of it).", "",
              "| model | batch | ours img/s | ref img/s | ours / ref | ours s/eval | TFLOP/eval | MFU |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["speed"]:
        extra = "".join(f" {k[:-len('_img_per_s')]}: {r[k]:.3g} img/s ({r[k[:-len('_img_per_s')] + '_vs_ours']:.2f}x);"
                        for k in r if k.startswith("ours+") and k.endswith("_img_per_s"))
        extra += "".join(f" {k[:-len('_error')]} failed: {r[k]};" for k in r if k.endswith("_error"))
        lines.append(f"| {r['model']}{extra} | {r['batch']} | {r['ours_img_per_s']:.3f} | "
                     f"{r.get('ref_img_per_s', float('nan')):.3f} | {r.get('speedup', float('nan')):.2f} | "
                     f"{r['ours_s_per_eval']:.4f} | {r['tflop_per_eval']:.2f} | {r['mfu']:.1%} |")
    if "hours_50k_edm2_s_mswg" in result:
        lines += ["", f"50,000 EDM2-S M-SWG images (32 steps, batch {result['hours_batch']}): "
                      f"{result['hours_50k_edm2_s_mswg']:.2f} h on this card (extrapolated)."]
    if result.get("accuracy"):
        lines += ["", "## fp16 vs fp32", "", "```", json.dumps(result["accuracy"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refcode", default=".refcode", help="reference checkout (with edm2/); 'none' = ours only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="edm2-s,edm2-xxl,dit-xl2")
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--steps", type=int, default=3, help="EDM sampler steps per timed run (2*steps-1 evaluations)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="", help="extra timings of ours, after everything else: "
                    "nocache,channels_last,compile,cudagraphs (at the largest batch)")
    ap.add_argument("--variants-model", default="s", help="EDM2 size the variants are timed on")
    ap.add_argument("--accuracy", type=int, default=None,
                    help="1/0: fp16 vs fp32 section on/off (default: on for CUDA; on the CPU the fp16 path is fp32)")
    ap.add_argument("--accuracy-steps", type=int, default=8, help="M-SWG sampler steps of the PSNR runs")
    ap.add_argument("--accuracy-batch", type=int, default=4)
    ap.add_argument("--peak-tflops", default=None, help="dense fp16 peak of the card (default: by its name)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--out", default="out/gpu_bench")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True  # same setting for both codes (DiT runs in fp32)
    torch.backends.cudnn.allow_tf32 = True
    ref = None if args.refcode == "none" else Reference(pathlib.Path(args.refcode))
    batches = [int(b) for b in args.batches.split(",") if b]
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:  # before any network is built
        raise SystemExit(f"error: unknown variant {unknown[0]!r}; use {', '.join(VARIANTS)}")
    peak = peak_tflops(device, args.peak_tflops)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    result = {"device_name": name, "torch": torch.__version__, "peak_tflops": peak, "speed": [],
              "args": vars(args), "threads": torch.get_num_threads(),
              "reference_commit": ref.commit if ref is not None else None}
    t_start = time.perf_counter()

    def save():
        result["seconds"] = time.perf_counter() - t_start
        load = ", load average %.2f" % os.getloadavg()[0] if device.type == "cpu" else ""
        result["note"] = (f"{name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads{load}; random "
                          f"weights at the published shapes; EDM2 in fp16 on CUDA (fp32 on CPU), DiT in fp32/TF32; "
                          f"img/s extrapolated to 32 EDM steps (63 evaluations) / 250 DiT steps; "
                          f"{result['seconds']:.0f} s in all")
        for path, text in ((out / "gpu_bench.json", json.dumps(result, indent=2) + "\n"),
                           (out / "gpu_bench.md", markdown(result))):
            tmp = path.with_name(path.name + ".tmp")  # a kill mid-write leaves the previous file whole
            tmp.write_text(text)
            os.replace(tmp, path)

    if ref is not None and min(args.steps, args.accuracy_steps) < 2:
        raise SystemExit("error: --steps and --accuracy-steps must be >= 2 with the reference: its step "
                         "formula divides by steps - 1 (give --refcode none to time ours alone)")
    for model in models:  # before any network is built
        if not (model == "dit-xl2" or (model.startswith("edm2-") and model[5:] in EDM2_SIZES)):
            raise SystemExit(f"error: unknown model {model!r}; use edm2-<{'|'.join(EDM2_SIZES)}> or dit-xl2")

    # The comparisons first, each model's rows saved as they finish; the accuracy section next; the
    # variants of our code last (compile time included), one saved row each: a time limit costs the end.
    for model in models:
        if model.startswith("edm2-"):
            rows = edm2_speed(model[5:], ref, device, batches, args.steps, args.warmup, args.repeats, peak)
        else:
            rows = dit_speed(ref, device, batches, args.warmup, args.repeats, peak / 2)  # fp32/TF32: half the fp16 peak
        for row in rows:
            print(json.dumps(row), flush=True)
        result["speed"] += rows
        if model == "edm2-s":
            best = max(rows, key=lambda r: r["batch"])
            result["hours_batch"] = best["batch"]
            result["hours_50k_edm2_s_mswg"] = 50000 / best["ours_img_per_s"] / 3600
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    if args.accuracy if args.accuracy is not None else device.type == "cuda":
        try:
            result["accuracy"] = accuracy(ref, device, steps=args.accuracy_steps, batch=args.accuracy_batch)
        except Exception as exc:  # noqa: BLE001 - reported; the variants still run
            result["accuracy"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(json.dumps(result["accuracy"], indent=2), flush=True)
        save()
    for variant in variants:
        rows = edm2_speed(args.variants_model, None, device, [max(batches)], args.steps, args.warmup,
                          args.repeats, peak, [variant])
        for row in rows:
            row["model"] += f" variant {variant}"
            print(json.dumps(row), flush=True)
        result["speed"] += rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    save()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
