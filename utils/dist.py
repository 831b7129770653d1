"""Thin helpers around ``torch.distributed`` for torchrun launches.

Outside torchrun (no ``WORLD_SIZE`` / ``RANK`` in the environment) every helper
behaves as a single process of rank 0, so the same code runs with ``python`` or
``torchrun``.  The process group uses NCCL when CUDA is available and Gloo on
CPU.

A process that is gone (a node lost, a rank killed) makes the collectives of
the others fail: at once when its connections close, else after
``SWG_DIST_TIMEOUT`` seconds (default 1800, torch's own default; the process
group's timeout).  The helpers here turn that failure into :class:`PeerLost`,
a one-line error with the resumable exit code
(:data:`utils.preempt.EXIT_RESUMABLE`), after leaving the process group so
that the process can exit (a Gloo group abandoned mid-collective aborts the
interpreter at exit).
"""

from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as torch_dist

from utils.preempt import Stopped

__all__ = ["init", "is_initialized", "get_rank", "get_world_size", "get_local_rank", "barrier",
           "device", "all_reduce_sum", "all_reduce_max", "gather_rows", "print0", "timeout_s", "PeerLost",
           "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 1800.0


class PeerLost(Stopped):
    """Another process of the job is gone (its node lost, its rank killed); this one stops too."""


def timeout_s() -> float:
    """How long a collective waits for a silent peer: ``SWG_DIST_TIMEOUT`` seconds (default 1800)."""
    try:
        value = float(os.environ.get("SWG_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def _lost(exc: BaseException) -> PeerLost:
    """Leave the broken group and describe what happened in one line."""
    first = " ".join(str(exc).split())[:200]
    try:
        torch_dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the group is broken anyway
        pass
    return PeerLost(f"rank {_env_rank()} lost contact with the other processes of this job ({first}); "
                    f"finished outputs are kept: rerun the same command to resume")


def _env_rank() -> str:
    return os.environ.get("RANK", "0")


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
    timeout = datetime.timedelta(seconds=timeout_s())
    # torchrun's rendezvous keeps one key-value store for all restarts of the group (--max-restarts), so a
    # restarted group could read the addresses its predecessor published and fail to connect: the keys of
    # each attempt get their own prefix.
    from torch.distributed.rendezvous import rendezvous

    store, rank, world = next(rendezvous("env://", timeout=timeout))
    store = torch_dist.PrefixStore(f"swg-attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    torch_dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    atexit.register(_leave_at_exit)


def _leave_at_exit() -> None:
    """Leave the process group before the interpreter tears down, as torch asks: a group left to the C++
    destructors could abort a rank that finished after its peer ('terminate called without an active
    exception', SIGABRT, seen once in a CI run after every image was written)."""
    if is_initialized():
        try:
            torch_dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass


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
        try:
            torch_dist.barrier()
        except RuntimeError as exc:
            raise _lost(exc) from exc


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
    return _all_reduce(tensor, torch_dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks (the input for one process)."""
    if not (is_initialized() and get_world_size() > 1):
        return tensor
    return _all_reduce(tensor, torch_dist.ReduceOp.MAX)


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    buf = tensor.detach().to(_comm_device()).clone()
    try:
        torch_dist.all_reduce(buf, op=op)
    except RuntimeError as exc:
        raise _lost(exc) from exc
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
    try:
        torch_dist.all_gather(counts, n)
    except RuntimeError as exc:
        raise _lost(exc) from exc
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros((max(counts),) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.zeros_like(padded) for _ in range(w)]
    try:
        torch_dist.all_gather(parts, padded)
    except RuntimeError as exc:
        raise _lost(exc) from exc
    out = torch.zeros((sum(counts),) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
    for r, (part, c) in enumerate(zip(parts, counts)):
        out[r::w][:c] = part[:c]
    return out.to(t.device)


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushes, so progress shows up under torchrun)."""
    if get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)
