"""LDS ground truth under ``torchrun``: the retrained models shared out across ranks.

A script started by ``torchrun --nproc_per_node=N script.py`` calls :func:`ground_truth_job`
on every rank; each rank retrains its share of the chunks of models (chunk i goes to rank
i mod N) into the common cache folder, waits for the others, and every rank returns the whole
result. Joining the process group and telling a peer's failure from the rank's own error come
from :mod:`iif.runs.distributed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iif.errors import InputError
from iif.runs.distributed import (
    PEER_TIMEOUT_S,
    WORK_TIMEOUT_S,
    _collective_failure,
    _join,
    world,
)

__all__ = ["ground_truth_job"]


def ground_truth_job(task: Any, train_data: Any, test_data: Any, settings: Any = None, *,
                     cache_dir: str | Path, progress: bool | None = None,
                     peer_timeout_s: float = PEER_TIMEOUT_S,
                     timeout_s: float = WORK_TIMEOUT_S):
    """:func:`iif.evaluation.ground_truth` (LDS retraining) with its chunks of models shared
    out across torchrun's ranks through ``cache_dir``; every rank returns the whole result.
    In a single process it is ``ground_truth`` with a cache."""
    from iif.evaluation.retrain import ground_truth

    rank, size = world()
    if size == 1:
        return ground_truth(task, train_data, test_data, settings, cache_dir=cache_dir,
                            progress=progress)
    import torch.distributed as dist

    group = _join(task.device, peer_timeout_s, timeout_s)
    try:
        ground_truth(task, train_data, test_data, settings, cache_dir=cache_dir,
                     progress=progress if rank == 0 else False, ranks=(rank, size))
        dist.barrier(group=group)
    except RuntimeError as exc:
        if not _collective_failure(exc):
            raise
        raise InputError(
            f"rank {rank} of {size}: the process group failed ({exc}); the finished chunks in "
            f"{cache_dir} are kept, run the same command again to resume") from None
    return ground_truth(task, train_data, test_data, settings, cache_dir=cache_dir)
