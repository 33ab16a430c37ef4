"""torch.distributed helpers for data-parallel training launched by ``torchrun``.

``torchrun --nproc_per_node N [--nnodes M --node_rank R --rdzv_endpoint HOST:PORT] -m dcnv2.cli train ...``
sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; :func:`init_distributed` reads them
(``env://``), so single-node and multi-node runs need nothing beyond torchrun's own flags. Without those
variables everything here degrades to a single process (rank 0 of 1).
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed", "cleanup_distributed", "is_distributed", "get_rank", "get_world_size",
    "is_main_process", "barrier", "all_reduce_mean", "broadcast_int", "all_gather_object", "default_device",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(backend: Optional[str] = None, device: Optional[torch.device] = None) -> bool:
    """Joins the process group described by torchrun's environment (``env://``).

    Args:
        backend: ``"nccl"`` / ``"gloo"``; default NCCL for CUDA devices, gloo otherwise.
        device: the device this process trains on (selects the backend and the current CUDA device).

    Returns:
        True when running distributed (WORLD_SIZE > 1 or already initialised), False for a lone process.
    """
    if is_distributed():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return False
    device = device if device is not None else default_device()
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://")
    return True


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all ranks (``t`` itself when not distributed); NaN on any rank propagates."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / get_world_size()


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (``value`` itself when not distributed)."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64,
                     device=default_device() if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=src)
    return int(t.item())


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
