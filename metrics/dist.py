"""The few torch.distributed helpers the metrics need (no-ops outside torchrun).

Images are split across ranks as ``indices[rank::world_size]``; sums are
all-reduced and per-image outputs are gathered back into the original order.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

__all__ = ["rank", "world_size", "all_reduce_sum", "gather_rows", "barrier"]


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if _active() else 0


def world_size() -> int:
    return tdist.get_world_size() if _active() else 1


def barrier() -> None:
    if _active():
        tdist.barrier()


def _comm_device(t: torch.Tensor) -> torch.device:
    # NCCL needs CUDA tensors; Gloo takes CPU ones.
    if _active() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (returned as a new tensor on ``t``'s device)."""
    if not _active():
        return t
    buf = t.detach().to(_comm_device(t)).clone()
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    return buf.to(t.device)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Undo the ``[rank::world]`` split: rows of every rank, interleaved back in global order.

    Rank ``r`` holds rows ``r, r + W, r + 2W, ...`` of the global array.
    """
    if not _active():
        return t
    w = world_size()
    dev = _comm_device(t)
    n = torch.tensor([t.shape[0]], device=dev)
    counts = [torch.zeros_like(n) for _ in range(w)]
    tdist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    width = max(counts)
    padded = torch.zeros((width,) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.zeros_like(padded) for _ in range(w)]
    tdist.all_gather(parts, padded)
    total = sum(counts)
    out = torch.zeros((total,) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
    for r, (part, c) in enumerate(zip(parts, counts)):
        out[r::w][:c] = part[:c]
    return out.to(t.device)
