"""Thin helpers around ``torch.distributed`` for torchrun launches.

Outside torchrun (no ``WORLD_SIZE`` / ``RANK`` in the environment) every helper
behaves as a single process of rank 0, so the same code runs with ``python`` or
``torchrun``.  The process group uses NCCL when CUDA is available and Gloo on
CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist

__all__ = ["init", "is_initialized", "get_rank", "get_world_size", "get_local_rank", "barrier",
           "device", "all_reduce_sum", "gather_rows", "print0"]


def _launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init() -> None:
    """Join the torchrun process group (idempotent; a no-op without torchrun)."""
    if is_initialized() or not _launched_by_torchrun():
        return
    if int(os.environ["WORLD_SIZE"]) <= 1 and "MASTER_ADDR" not in os.environ:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(get_local_rank())
    torch_dist.init_process_group(backend=backend)


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if is_initialized() and get_world_size() > 1:
        torch_dist.barrier()


def device() -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


def _comm_device() -> torch.device:
    """NCCL communicates CUDA tensors, Gloo CPU ones."""
    if is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks, as a new tensor on ``tensor``'s device (the input for one process)."""
    if not (is_initialized() and get_world_size() > 1):
        return tensor
    buf = tensor.detach().to(_comm_device()).clone()
    torch_dist.all_reduce(buf, op=torch_dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Undo a ``[rank::world]`` split: every rank's rows, interleaved back into global order.

    Rank ``r`` holds rows ``r, r + W, r + 2W, ...``; ranks may hold different counts.
    """
    if not (is_initialized() and get_world_size() > 1):
        return t
    w, dev = get_world_size(), _comm_device()
    n = torch.tensor([t.shape[0]], device=dev)
    counts = [torch.zeros_like(n) for _ in range(w)]
    torch_dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros((max(counts),) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.zeros_like(padded) for _ in range(w)]
    torch_dist.all_gather(parts, padded)
    out = torch.zeros((sum(counts),) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
    for r, (part, c) in enumerate(zip(parts, counts)):
        out[r::w][:c] = part[:c]
    return out.to(t.device)


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushes, so progress shows up under torchrun)."""
    if get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)
