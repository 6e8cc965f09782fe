"""Running one attribution job across processes started by ``torchrun``.

``torchrun --nproc_per_node=N -m iif attribute ...`` (or ``--nnodes``/``--rdzv-endpoint`` for
several machines) starts N copies of the same command. Each reads RANK and WORLD_SIZE from the
environment, joins a process group (gloo on CPU, NCCL on CUDA), computes its share of the
result store's chunks (chunk i goes to rank i mod WORLD_SIZE), waits for the others, and rank 0
assembles the result. Chunks are independent and written atomically, so a job whose rank dies
keeps every finished chunk: the same command run again resumes.

IIF with a shared baseline has one path for all test samples, so it splits the training set
instead: every rank trains the same baseline and path models (seeded, identical), featurises
its block of training samples, the P x P curvature is summed with an all-reduce, and each rank
scores its own columns (:class:`Sharding`). TRAK and projected IF split the training set the
same way (their kernel or curvature all-reduced), every rank seeing every test chunk. LDS
retraining shares out its chunks of models through the cache folder (:func:`ground_truth_job`).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iif.attribution import Attribution
from iif.errors import InputError
from iif.store import ResultStore, attribute_to, fill, open_store

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


@dataclass
class Sharding:
    """This process's block of the training set and the sum over all processes."""

    rank: int
    world: int

    def rows(self, n: int) -> slice:
        size = -(-n // self.world)
        return slice(min(self.rank * size, n), min((self.rank + 1) * size, n))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor)  # sum, in place
        return tensor


def splits_training_set(method: Any) -> bool:
    """Methods whose training-set work serves every test sample split the training set
    instead of the test samples: IIF with a shared baseline, TRAK and projected IF."""
    name = getattr(method, "method", None)
    return ((name == "iif" and method.baseline.mode == "shared") or name == "trak"
            or (name == "if" and method.solver == "projected"))


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
    test = method.task.validate(job.test, "test data")
    # every rank opens the store: the manifest is written atomically with the same content,
    # and a refusal (other settings or inputs) stops every rank alike
    store = open_store(out, method, test, chunk)
    try:
        if splits_training_set(method):
            _attribute_split(store, method, test, rank, size)
        else:
            fill(store, method, test, ranks=(rank, size),
                 progress=method.progress if rank == 0 else False)
        dist.barrier()
    except RuntimeError as exc:  # a peer died or the rendezvous broke
        raise InputError(
            f"rank {rank} of {size}: the process group failed ({exc}); the finished chunks in "
            f"{out} are kept, run the same command again to resume") from None
    result = store.assemble() if rank == 0 else None  # every chunk is done
    dist.barrier()
    dist.destroy_process_group()
    return result


def _attribute_split(store: ResultStore, method: Any, test: Any, rank: int, size: int) -> None:
    """The store's unfinished chunks computed by every rank together, each on its block of
    training samples; rank 0 writes them."""
    import torch.distributed as dist

    todo = store.pending()
    dist.barrier()  # every rank has looked before rank 0 can finish a chunk
    method.sharding = Sharding(rank, size)
    block = method.sharding.rows(len(method.train))
    log.info("rank %d of %d: training samples %d..%d, %d chunk(s) of test samples", rank, size,
             block.start, block.stop - 1, len(todo))
    try:
        for lo, hi in todo:
            part = test.subset(slice(lo, hi))
            result = method.attribute((part.x, part.labels))
            if rank == 0:
                store.write(lo, hi, result)
    finally:
        method.sharding = None


def ground_truth_job(task: Any, train_data: Any, test_data: Any, settings: Any = None, *,
                     cache_dir: str | Path, progress: bool | None = None,
                     timeout_s: float = 6 * 3600):
    """:func:`iif.evaluation.ground_truth` (LDS retraining) with its chunks of models shared
    out across torchrun's ranks through ``cache_dir``; every rank returns the whole result.
    In a single process it is ``ground_truth`` with a cache."""
    from iif.evaluation.retrain import ground_truth

    rank, size = world()
    if size == 1:
        return ground_truth(task, train_data, test_data, settings, cache_dir=cache_dir,
                            progress=progress)
    import torch.distributed as dist

    _join(task.device, timeout_s)
    try:
        ground_truth(task, train_data, test_data, settings, cache_dir=cache_dir,
                     progress=progress if rank == 0 else False, ranks=(rank, size))
        dist.barrier()
    except RuntimeError as exc:
        raise InputError(
            f"rank {rank} of {size}: the process group failed ({exc}); the finished chunks in "
            f"{cache_dir} are kept, run the same command again to resume") from None
    return ground_truth(task, train_data, test_data, settings, cache_dir=cache_dir)
