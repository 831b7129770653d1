"""The whole pipeline at the published sizes, with random weights, offline (``make real-scale``).

Weights cannot be downloaded here, but the architectures can be built: random
weights at the exact published shapes exercise every line, shape and memory peak
that the real weights would.  This script

1. writes, into a temporary ``$SWG_CACHE`` (``HF_HUB_OFFLINE=1``), the files users
   really get, at the cache paths the loaders look up:

   * EDM2 training snapshots laid out as EDM2's training loop writes them
     (``dnnlib.util.EasyDict`` with ``encoder`` = ``StabilityVAEEncoder`` with its
     constants, ``dataset_kwargs``, ``loss_fn`` and the fp16 ``ema`` network), for
     img512 XS/S/M/L/XL/XXL, img64 S and every negative the ``swg-edm2-*`` presets
     name (RT, RCT, unconditional XS);
   * DiT-XL/2 for 256 and 512 as the official plain state dict ``.pt``;
   * the SD VAE (``stabilityai/sd-vae-ft-mse`` and ``-ft-ema``) as diffusers
     folders built from ``benchmarks/sd_vae_config.json`` (configuration only);
   * Inception-v3 (FID, IS) and DINOv2 ViT-L/14 (FD-DINOv2) weight files;

2. measures each model in a fresh process (load time, seconds per denoiser
   evaluation per image plain and with M-SWG, peak RSS or CUDA memory) and prints
   one table;

3. runs the real command lines: ``sample_edm2.py`` with every ``swg-edm2-s-*``
   preset and ``--g_method none``, ``sample_dit.py`` with SWG, M-SWG, CFG and
   CFG+M-SWG at 256 and 512, ``python -m metrics ref`` on some of their images and
   ``--metrics fid,fd_dinov2,is`` of an img64 S M-SWG run against it; each command
   line in a fresh process forked from a server that has imported torch and
   diffusers once (:func:`run_cli`), its output in ``logs/`` of the work folder.

    python benchmarks/real_scale.py [--device cpu] [--sizes xs,s,xxl] [--time-sizes s] [--dit 256]
                                    [--skip-cli | --skip-table] [--keep DIR] [--json FILE]

It writes about 16 GB into a temporary folder (``$TMPDIR``; ``--keep DIR`` keeps it).

Every command line makes one image (the metrics run ten) with one sampler step:
enough to run every line (sampling, decoding, PNG writing, metrics) at the real shapes.  Numbers on
random weights are only timings and memory; the images are noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import pathlib
import resource
import runpy
import shutil
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VAE_CONFIG = pathlib.Path(__file__).with_name("sd_vae_config.json")

# EDM2's training presets (train_edm2.py): base channels and dropout per size.
EDM2_SIZES = {"xs": (128, 0.0), "s": (192, 0.0), "m": (256, 0.1), "l": (320, 0.1), "xl": (384, 0.1),
              "xxl": (448, 0.1)}
EDM2_LOSS = {512: (-0.4, 1.0), 64: (-0.8, 1.6)}  # (P_mean, P_std)


# ----------------------------------------------------------------------------
# Writing the files users get.

def edm2_init_kwargs(size: str, res: int = 512, cond: bool = True) -> dict:
    """The ``_init_kwargs`` EDM2's training loop records: the preset's network kwargs + the dataset's shape."""
    channels, dropout = EDM2_SIZES[size]
    return dict(model_channels=channels, dropout=dropout, use_fp16=True, img_resolution=64,
                img_channels=4 if res == 512 else 3, label_dim=1000 if cond else 0)


def random_edm2(init_kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """A ``Precond`` with recorded constructor arguments and random fp16 weights (no fp32 copy).

    Gains are random too (EDM2 initialises them to zero, which would make every
    guidance term vanish); Fourier buffers follow their own distributions.
    """
    from benchmarks.edm2_snapshot import make_precond

    with torch.device("meta"):
        net = make_precond(**init_kwargs)
    net = net.to_empty(device="cpu").to(torch.float16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if name.endswith("phases"):
                t.copy_(torch.rand(t.shape, generator=gen) * 2 * torch.pi)
            elif name.endswith("freqs"):
                t.copy_(torch.randn(t.shape, generator=gen) * 2 * torch.pi)
            elif t.ndim == 0:
                t.fill_(0.3 + torch.rand([], generator=gen).item())
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))
    return net.eval().requires_grad_(False)


def write_edm2_snapshot(path: pathlib.Path, size: str, res: int = 512, cond: bool = True, seed: int = 0) -> int:
    """An EDM2 training snapshot at ``path`` (fp16 ``ema``, encoder, dataset and loss records); returns #params."""
    from benchmarks.edm2_snapshot import OfficialEDM2Loss, OfficialStabilityVAEEncoder, OfficialStandardRGBEncoder
    from benchmarks.edm2_snapshot import write_edm2_pickle

    net = random_edm2(edm2_init_kwargs(size, res, cond), seed)
    n = sum(p.numel() for p in net.parameters())
    encoder = OfficialStabilityVAEEncoder() if res == 512 else OfficialStandardRGBEncoder()
    p_mean, p_std = EDM2_LOSS[res]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_edm2_pickle(path, net, encoder=encoder, loss=OfficialEDM2Loss(P_mean=p_mean, P_std=p_std),
                      use_labels=cond, copy=False)
    return n


def random_dit(image_size: int, seed: int = 0) -> torch.nn.Module:
    """DiT-XL/2 with every weight random (the official init zeroes adaLN and the output layer)."""
    from networks.dit import create_dit

    with torch.device("meta"):
        net = create_dit("DiT-XL/2", input_size=image_size // 8)
    net = net.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict(keep_vars=True).items():
            if name == "pos_embed":
                from networks.dit import sincos_pos_embed_2d
                t.copy_(sincos_pos_embed_2d(t.shape[-1], image_size // 16).reshape(t.shape))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
    return net.eval().requires_grad_(False)


def write_dit_checkpoint(path: pathlib.Path, image_size: int, seed: int = 0) -> int:
    """The released ``DiT-XL-2-{size}x{size}.pt`` layout: a plain fp32 state dict."""
    net = random_dit(image_size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return sum(p.numel() for p in net.parameters())


def write_vae_folder(folder: pathlib.Path, seed: int = 0) -> int:
    """A diffusers ``AutoencoderKL`` folder (``config.json`` + safetensors) from the kept configuration."""
    from diffusers import AutoencoderKL

    config = {k: v for k, v in json.loads(VAE_CONFIG.read_text()).items() if not k.startswith("_")}
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return sum(p.numel() for p in vae.parameters())


def random_inception_path(cache: pathlib.Path) -> pathlib.Path:
    """Where the random Inception-v3 weights go: named as such, so no sha256 in the name promises the real ones."""
    return pathlib.Path(cache) / "random-weights" / "pt_inception-random.pth"


def write_detectors(seed: int = 0) -> dict:
    """Inception-v3 (port layout) and DINOv2 ViT-L/14 (timm ``model.safetensors``, 518 px table) in the cache."""
    import safetensors.torch
    import timm

    from metrics.dinov2 import DINOV2_SOURCE
    from metrics.inception import InceptionV3
    from utils.cache import cache_dir, cache_path

    torch.manual_seed(seed)
    inc = random_inception_path(cache_dir())
    if not inc.is_file():
        inc.parent.mkdir(parents=True, exist_ok=True)
        torch.save(InceptionV3().state_dict(), inc)
    dino = cache_path(DINOV2_SOURCE)
    if not dino.is_file():
        dino.parent.mkdir(parents=True, exist_ok=True)
        model = timm.create_model("vit_large_patch14_dinov2.lvd142m", pretrained=False)
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dino))
    return {"inception": inc, "dinov2": dino}


def edm2_models(sizes) -> dict:
    """``{name: (path in the cache, size, res, cond)}`` for the table's sizes and every preset's networks."""
    from networks.zoo import MODELS
    from sampling.presets import PRESETS
    from utils.cache import cache_path

    out = {}
    for size in sizes:
        if size == "img64-s":
            out[size] = (cache_path(PRESETS["edm2-img64-s-fid"].net_pos_pkl), "s", 64, True)
        else:
            run = {"s": "raw-img512-s", "xs": "raw-img512-xs-T16", "xxl": "raw-img512-xxl",
                   "m": "raw-img512-m"}.get(size, f"raw-img512-{size}")
            out[size] = (cache_path(MODELS[run]), size, 512, True)
    for name, size, cond in (("raw-img512-s", "s", True), ("raw-img512-s-T16", "s", True),
                             ("raw-img512-xs-T16", "xs", True), ("raw-img512-xs-uncond", "xs", False)):
        out.setdefault(name, (cache_path(MODELS[name]), size, 512, cond))
    out.setdefault("img64-s", (cache_path(PRESETS["edm2-img64-s-fid"].net_pos_pkl), "s", 64, True))  # metrics run
    return out


def build_cache(sizes, log=print, dit_sizes=(256, 512)) -> dict:
    """Write every file into ``$SWG_CACHE``; return ``{name: {path, params, seconds}}``."""
    from sampling.dit_run import VAE_REPOS
    from networks.dit import PRETRAINED_DIT
    from utils.cache import cache_dir, cache_path

    built = {}
    seen = {}
    for name, (path, size, res, cond) in edm2_models(sizes).items():
        t0 = time.perf_counter()
        key = (size, res, cond)
        if path.is_file():
            pass
        elif key in seen:  # same architecture: one file, linked (the shapes are what is tested)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(seen[key], path)
        else:
            write_edm2_snapshot(path, size, res, cond)
            seen[key] = path
        built[name] = {"path": str(path), "seconds": time.perf_counter() - t0}
        log(f"  {name:22s} {path.stat().st_size / 2**20:8.0f} MiB  {built[name]['seconds']:6.1f} s")
    for size in dit_sizes:
        t0 = time.perf_counter()
        path = cache_path(PRETRAINED_DIT[size])
        if not path.is_file():
            write_dit_checkpoint(path, size)
        built[f"dit-xl2-{size}"] = {"path": str(path), "seconds": time.perf_counter() - t0}
        log(f"  dit-xl2-{size:<14d} {path.stat().st_size / 2**20:8.0f} MiB  {built[f'dit-xl2-{size}']['seconds']:6.1f} s")
    for repo in sorted(set(VAE_REPOS.values())):
        folder = cache_dir() / "hf" / repo
        if not (folder / "config.json").is_file():
            write_vae_folder(folder)
    built.update({k: {"path": str(v)} for k, v in write_detectors().items()})
    return built


# ----------------------------------------------------------------------------
# Measuring one model in its own process.

def _peak_memory(device: torch.device) -> float:
    """GiB: CUDA peak allocated on a GPU, else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child
    # would report its parent's peak (the gigabytes this script held while writing the files).
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _timed(fn, device, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(kind: str, source: str, device: str = "cpu", batch: int = 1, repeats: int = 1,
            image_size: int = 256, evaluate: bool = True) -> dict:
    """Load one network through the project's loader, time a plain and an M-SWG evaluation.

    ``evaluate=False`` only loads (the sizes whose evaluations would not fit the time budget).
    """
    from guidance import guide
    from guidance.dit import dit_guidance

    dev = torch.device(device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if kind == "edm2":
        from networks.edm2_pickle import load_checkpoint
        from utils.cache import fetch

        net = load_checkpoint(fetch(source), source=source).net.to(dev)
        load_s = time.perf_counter() - t0
        c, r = net.img_channels, net.img_resolution
        x = torch.randn(batch, c, r, r, device=dev)
        sigma = torch.full((batch,), 2.5, device=dev)
        labels = torch.eye(net.label_dim, device=dev)[torch.arange(batch) % net.label_dim] if net.label_dim else None
        plain = lambda: net(x, sigma, labels)  # noqa: E731
        guided = guide(net, "swg", 0.2, window_size=r * 5 // 8, window_steps=2, masked=True)
        swg = lambda: guided(x, sigma, labels)  # noqa: E731
    else:
        from networks.dit import load_dit
        from utils.cache import fetch

        net = load_dit("DiT-XL/2", fetch(source), input_size=image_size // 8).to(dev)
        load_s = time.perf_counter() - t0
        r = image_size // 8
        x = torch.randn(batch, 4, r, r, device=dev)
        t = torch.full((batch,), 500, device=dev, dtype=torch.long)
        y = torch.arange(batch, device=dev) % 1000
        plain = lambda: net(x, t, y)  # noqa: E731
        guided = dit_guidance(net, "swg", g_scale=0.5, mask=True, window_steps=2)
        swg = lambda: guided(x, t, y)  # noqa: E731
    params = sum(p.numel() for p in net.parameters())
    nan = float("nan")
    # Warm-up of both calls, so that first-call costs (kernel selection, the weight cache, the first read
    # of memory-mapped weights) are not timed; skipped for EDM2 networks too large for the CPU weight
    # cache (L, XL, XXL), where a first call costs no more than the next (and XXL's takes 40 s).
    warm = evaluate and (dev.type != "cpu" or kind != "edm2" or net.caches_weights_on(dev))
    with torch.inference_mode():
        if warm:
            plain()
            swg()
        plain_s = _timed(plain, dev, repeats) / batch if evaluate else nan
        swg_s = _timed(swg, dev, repeats) / batch if evaluate else nan
    return {"params": params, "load_s": load_s, "plain_s": plain_s, "mswg_s": swg_s,
            "ratio": swg_s / plain_s, "peak_gib": _peak_memory(dev), "device": str(dev), "batch": batch}


# Fresh processes, forked from a server that has imported torch, diffusers and the project once:
# each measurement and each command line has a process (and a peak memory) of its own, without
# paying Python's start-up and these imports every time (8-11 s less per command line on two cores).
PRELOAD = ["torch", "diffusers.models.autoencoders.autoencoder_kl", "timm", "scipy.linalg", "PIL.Image", "click",
           "sampling.edm2_run", "sampling.dit_run", "sampling.writer", "guidance", "metrics.api",
           "metrics.detectors", "networks.edm2_pickle", "networks.dit"]
_CONTEXT = None


def process_context():
    """The ``forkserver`` multiprocessing context (started on first use, with :data:`PRELOAD` imported)."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _CONTEXT = multiprocessing.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(PRELOAD)
        else:  # Windows: every process imports for itself
            _CONTEXT = multiprocessing.get_context("spawn")
    return _CONTEXT


def _measure_child(conn, kind, source, kwargs):
    try:
        conn.send(("ok", measure(kind, source, **kwargs)))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        import traceback
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"))
    finally:
        conn.close()


def measure_in_child(kind: str, source: str, **kwargs) -> dict:
    """:func:`measure` in a fresh process, so that its peak memory is its own."""
    ctx = process_context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure_child, args=(child, kind, source, kwargs))
    proc.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        status, value = "error", "the process ended without a result"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"measuring {source} failed (exit {proc.exitcode}): {value}")
    return value


def _cli_child(argv, log_path):
    """Run one command line as ``python argv...`` would, output to ``log_path``; exits with its code."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    os.chdir(ROOT)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(str(ROOT / argv[0]), run_name="__main__")


# ----------------------------------------------------------------------------
# Running the command lines.

def edm2_cli_runs() -> list:
    """``(name, argv)`` for every ``swg-edm2-s-*`` preset and ``--g_method none`` (one image, one step)."""
    from sampling.presets import PRESETS

    runs = []
    for name in sorted(n for n in PRESETS if n.startswith("swg-edm2-s-")):
        argv = ["--preset", name]
        if PRESETS[name].g_weight is None:
            argv += ["--g_weight", "1.2"]
        runs.append((name, argv))
    runs.append(("none", ["--net_pos_pkl", "raw-img512-s", "--g_method", "none"]))
    return runs


def dit_cli_runs(sizes=(256, 512)) -> list:
    """SWG, M-SWG, CFG and CFG+M-SWG of ``sample_dit.py`` at each size."""
    modes = {"swg": ["--crop", "1", "--g-scale", "0.5"],
             "mswg": ["--crop", "1", "--mask", "1", "--g-scale", "0.5"],
             "cfg": ["--vanila-cfg", "1", "--g-scale", "1.5"],
             "cfg-mswg": ["--cfg-crop", "1", "--mask", "1", "--g-scale", "0.3", "--crop-scale", "0.3"]}
    return [(f"dit{size}-{m}", ["--image-size", str(size)] + argv) for size in sizes for m, argv in modes.items()]


def run_cli(argv: list, log, failures: list, logs: pathlib.Path) -> float:
    """Run one command line in a fresh process; a failure is logged with its last lines and recorded."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{len(list(logs.iterdir())):02d}.log"
    t0 = time.perf_counter()
    proc = process_context().Process(target=_cli_child, args=(argv, str(log_path)))
    proc.start()
    proc.join()
    dt = time.perf_counter() - t0
    if proc.exitcode != 0:
        failures.append(" ".join(argv))
        tail = log_path.read_text()[-2000:] if log_path.is_file() else "(no output)"
        log(f"  FAILED ({proc.exitcode}) after {dt:.0f} s: {' '.join(argv)}\n{tail}")
        return float("nan")
    log(f"  {dt:6.1f} s  {' '.join(argv)}")
    return dt


def count_pngs(folder: pathlib.Path) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


# ----------------------------------------------------------------------------

def offline_env(cache: pathlib.Path) -> dict:
    """The environment of every process: the temporary cache, offline, no run logging."""
    return dict(SWG_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
                PYTHONPATH=str(ROOT),  # random Inception weights, named as such (no sha256 in the name to check):
                SWG_INCEPTION_WEIGHTS=str(random_inception_path(cache)))


def format_table(rows: list, note: str) -> str:
    head = ("| model | params | load s | plain s/step/img | M-SWG s/step/img | M-SWG/plain | peak GiB |\n"
            "|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for name, r in rows:
        lines.append(f"| {name} | {r['params'] / 1e6:.0f} M | {r['load_s']:.1f} | {r['plain_s']:.2f} | "
                     f"{r['mswg_s']:.2f} | {r['ratio']:.2f} | {r['peak_gib']:.1f} |")
    return "\n".join(lines) + "\n\n" + note


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="xs,s,m,l,xl,xxl,img64-s",
                    help="EDM2 sizes to build, load and time (img64-s = the 64 px S)")
    ap.add_argument("--time-sizes", default="xs,s,m,l,xl,xxl,img64-s",
                    help="of those, the ones whose evaluations are timed (the others are only built and loaded)")
    ap.add_argument("--dit", default="256,512", help="DiT-XL/2 image sizes")
    ap.add_argument("--skip-cli", action="store_true", help="only build, load and time")
    ap.add_argument("--skip-table", action="store_true", help="only build and run the command lines")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    sizes = [s for s in args.sizes.split(",") if s]
    timed = set(s for s in args.time_sizes.split(",") if s)
    dit_sizes = tuple(int(s) for s in args.dit.split(",") if s)
    work = pathlib.Path(args.keep) if args.keep else pathlib.Path(tempfile.mkdtemp(prefix="swg-real-"))
    cache = work / "cache"
    os.environ.update(offline_env(cache))  # before the process server starts: it and its children inherit it
    start = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        log(f"work folder {work}  (SWG_CACHE={cache}, offline)  threads {torch.get_num_threads()}")
        log("writing files:")
        built = build_cache(sizes, log, dit_sizes)
        results: dict = {"built": built, "cli": {}, "table": {}}
        failures: list = []

        log("loading and timing each model in its own process:")
        rows = []
        for name in ([] if args.skip_table else sizes):
            path = edm2_models(sizes)[name][0]
            r = measure_in_child("edm2", str(path), device=args.device, evaluate=name in timed)
            label = f"EDM2-{name.upper()}" if name != "img64-s" else "EDM2-S img64"
            rows.append((label, r))
            log(f"  {label}: {json.dumps(r)}")
        for size in ([] if args.skip_table else dit_sizes):
            path = built[f"dit-xl2-{size}"]["path"]
            r = measure_in_child("dit", path, device=args.device, image_size=size)
            rows.append((f"DiT-XL/2 {size}", r))
            log(f"  DiT-XL/2 {size}: {json.dumps(r)}")
        results["table"] = dict(rows)
        print()
        print(format_table(rows, f"(measured by {time.perf_counter() - start:.0f} s)"), flush=True)
        if not args.skip_cli:
            from sampling.presets import PRESETS

            log("command lines (each in a fresh process; its output in logs/):")
            out, logs = work / "out", work / "logs"
            for name, extra in edm2_cli_runs():
                argv = ["sample_edm2.py", *extra, "--outdir", str(out / name), "--seeds", "0", "--steps", "1",
                        "--batch", "1"]
                results["cli"][name] = run_cli(argv, log, failures, logs)
                if results["cli"][name] == results["cli"][name] and count_pngs(out / name) != 1:
                    failures.append(f"{name}: expected one PNG")
            for name, extra in dit_cli_runs(dit_sizes):
                argv = ["sample_dit.py", "--model", "DiT-XL/2", *extra, "--sample-dir", str(out / name),
                        "--seeds", "0", "--num-sampling-steps", "1", "--per-proc-batch-size", "1",
                        "--metrics", "none", "--device", args.device]
                results["cli"][name] = run_cli(argv, log, failures, logs)
                if results["cli"][name] == results["cli"][name] and count_pngs(out / name) != 1:
                    failures.append(f"{name}: expected one PNG")
            # Reference statistics from other outputs, then metrics of a fresh run against them.
            ref_imgs = out / "ref-images"
            ref_imgs.mkdir(exist_ok=True)
            for i, png in enumerate(sorted(out.rglob("*.png"))[:4]):
                shutil.copyfile(png, ref_imgs / f"{i:07d}.png")
            ref = work / "ref.pkl"
            results["cli"]["metrics-ref"] = run_cli(
                ["-m", "metrics", "ref", "--images", str(ref_imgs), "--dest", str(ref), "--metrics", "fid,fd_dinov2",
                 "--batch", "2", "--device", args.device], log, failures, logs)
            # Ten images (IS takes 10 splits) from the pixel-space img64 S with M-SWG: its command line
            # runs here, and ten 512 px VAE decodes (17 s each on two cores) are not spent on the metrics.
            argv = ["sample_edm2.py", "--net_pos_pkl", PRESETS["edm2-img64-s-fid"].net_pos_pkl, "--g_method", "swg",
                    "--g_weight", "0.2", "--swg_sizes", "40", "--scale_window_guide", "1",
                    "--outdir", str(out / "metrics"), "--seeds", "0-9", "--steps", "1", "--batch", "10",
                    "--metrics", "fid,fd_dinov2,is", "--ref_path", str(ref)]
            results["cli"]["edm2-metrics"] = run_cli(argv, log, failures, logs)
            found = list((out / "metrics").rglob("metrics*.json"))
            if found:
                results["metrics"] = json.loads(found[0].read_text())
                log(f"  metrics: {json.dumps(results['metrics'])[:300]}")
            else:
                failures.append("the metrics run wrote no metrics file")

        load = os.getloadavg()
        note = (f"device {args.device}, {torch.get_num_threads()} threads, batch 1, random weights; "
                f"load average at the end {load[0]:.2f}; total {time.perf_counter() - start:.0f} s")
        print()
        print(format_table(rows, note))
        results["note"] = note
        results["failures"] = failures
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        for f in failures:
            print(f"FAILED: {f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
