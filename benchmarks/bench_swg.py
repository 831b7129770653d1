"""Cost of an M-SWG evaluation relative to a plain evaluation of the EDM2 network (CPU by default).

Network: model_channels 128, channel_mult [1,2,3,4], num_blocks 3, attention at 16 and 8;
input 4x64x64, batch 4; windows of 40, 2 per axis.  Prints, in one run: plain eval time,
M-SWG eval time (positive + all windows in one batched call), their ratio, and the same
M-SWG eval with one window per network call.  Ideal ratio by pixel count: 1 + 4*40^2/64^2 = 2.56.

    python benchmarks/bench_swg.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from guidance import guide  # noqa: E402
from networks.edm2 import Precond  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.errors import exit_on_usage_error  # noqa: E402


def timed(fns, repeats, device):
    """Median time of each function; the functions are interleaved so load drift hits all alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


@exit_on_usage_error
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    net = Precond(img_resolution=64, img_channels=4, label_dim=1000, use_fp16=device.type == "cuda",
                  model_channels=128, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8]).eval().to(device)
    x = torch.randn(args.batch, 4, 64, 64, device=device)
    sigma = torch.full((args.batch,), 2.5, device=device)
    labels = torch.eye(1000, device=device)[torch.arange(args.batch) * 7]
    batched = guide(net, "swg", 0.2, window_size=40, window_steps=2, masked=True)
    one_by_one = guide(net, "swg", 0.2, window_size=40, window_steps=2, masked=True, max_window_batch=args.batch)

    with torch.inference_mode():
        for f in (lambda: net(x, sigma, labels), lambda: batched(x, sigma, labels)):  # warm-up
            f()
        plain, mswg, mswg_loop = timed([lambda: net(x, sigma, labels), lambda: batched(x, sigma, labels),
                                        lambda: one_by_one(x, sigma, labels)], args.repeats, device)
    print(f"device: {device}  threads: {torch.get_num_threads()}  batch: {args.batch}  repeats: {args.repeats} (median)")
    print(f"plain eval          : {plain * 1e3:9.1f} ms")
    print(f"M-SWG eval (batched): {mswg * 1e3:9.1f} ms   ratio to plain: {mswg / plain:.2f}x  (ideal 2.56x, target <= 2.6x)")
    print(f"M-SWG eval (1 window per call): {mswg_loop * 1e3:9.1f} ms   ratio to plain: {mswg_loop / plain:.2f}x")
    print(f"batched speed-up over one window per call: {mswg_loop / mswg:.2f}x")


if __name__ == "__main__":
    main()
