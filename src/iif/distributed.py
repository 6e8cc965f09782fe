"""Running one attribution job across processes started by ``torchrun``.

``torchrun --nproc_per_node=N -m iif attribute ...`` (or ``--nnodes``/``--rdzv-endpoint`` for
several machines) starts N copies of the same command. Each reads RANK and WORLD_SIZE from the
environment, joins a process group (gloo on CPU, NCCL on CUDA), computes its share of the
result store's chunks (chunk i goes to rank i mod WORLD_SIZE), waits for the others, and rank 0
assembles the result. Chunks are independent and written atomically, so a job whose rank dies
keeps every finished chunk: the same command run again resumes.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Any

import torch

from iif.attribution import Attribution
from iif.errors import InputError
from iif.store import attribute_to

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, (0, 1) outside it."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise InputError("RANK and WORLD_SIZE must be integers") from None


def _join(device: torch.device, timeout_s: float) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def attribute_job(
    out: str | Path,
    method: Any,
    job: Any,
    *,
    chunk: int | None = None,
    timeout_s: float = 6 * 3600,
) -> Attribution | None:
    """Attribute ``job.test`` into the store ``out``; under torchrun, as one rank of many.

    Returns the assembled result on rank 0 (and in a single process), None on other ranks.
    ``timeout_s`` bounds how long a rank waits for the slowest one at the end.
    """
    rank, size = world()
    if size == 1:
        return attribute_to(out, method, job.test, chunk=chunk, progress=method.progress)
    import torch.distributed as dist

    _join(method.task.device, timeout_s)
    try:
        attribute_to(out, method, job.test, chunk=chunk, ranks=(rank, size),
                     progress=method.progress if rank == 0 else False)
        dist.barrier()
    except RuntimeError as exc:  # a peer died or the rendezvous broke
        raise InputError(
            f"rank {rank} of {size}: the process group failed ({exc}); the finished chunks in "
            f"{out} are kept, run the same command again to resume") from None
    result = None
    if rank == 0:
        result = attribute_to(out, method, job.test, chunk=chunk)  # every chunk is done
    dist.barrier()
    dist.destroy_process_group()
    return result
