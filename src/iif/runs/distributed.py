"""Running one attribution job across processes started by ``torchrun``.

``torchrun --nproc_per_node=N -m iif attribute ...`` (or ``--nnodes``/``--rdzv-endpoint`` for
several machines) starts N copies of the same command. Each reads RANK and WORLD_SIZE from the
environment, joins a process group (gloo on CPU, NCCL on CUDA), computes its share of the
result store's chunks (chunk i goes to rank i mod WORLD_SIZE), waits for the others, and rank 0
assembles the result. Chunks are independent and written atomically, so a job whose rank dies
keeps every finished chunk: the same command run again resumes.

A method whose training-set work serves every test sample (``method.shards_training_set()``:
IIF with a shared baseline, TRAK, projected IF) splits the training set instead, within
``method.sharded(Sharding(...))``: every rank featurises its block of training samples (IIF
with a shared baseline trains the same seeded baseline and path models on every rank), the
P x P curvature or TRAK kernel is summed with an all-reduce, and each rank scores its own
columns (:class:`Sharding`), every rank seeing every test chunk. LDS
retraining shares out its chunks of models through the cache folder
(``iif_paper.lds_job.ground_truth_job``, in the paper's harness beside the library).

Before anything is written the ranks agree on the run key (:mod:`iif.results.runkey`): every rank
digests its own model, data and settings and the digests are all-gathered, so a task function
that builds a different model (or data, or settings) on some rank stops every rank with a
message naming the differing part and ranks. Rank 0 holds the result store's lock for the job.
A rank waits at most ``peer_timeout_s`` (default :data:`PEER_TIMEOUT_S`, ``--peer-timeout``)
for its peers to join; once joined, collective operations wait up to ``timeout_s`` for the
slowest rank.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iif.errors import InputError
from iif.results.attribution import Attribution
from iif.results.diagnostics import index_offset
from iif.results.runkey import RunKey, run_key
from iif.results.store import ResultStore, attribute_to, fill, open_store

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 300.0  # joining: a missing peer fails the job within minutes
WORK_TIMEOUT_S = 6 * 3600.0  # collectives: ranks may finish their shares hours apart


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, (0, 1) outside it. Values no launcher
    sets (WORLD_SIZE below 1, RANK outside 0..WORLD_SIZE-1) raise :class:`InputError` at
    once: no peer could ever join such a rank, so waiting for them would only time out."""
    launch = "launch with torchrun, which sets both, or unset both to run in one process"
    rank_text, size_text = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    try:
        rank, size = int(rank_text), int(size_text)
    except ValueError:
        raise InputError(f"RANK={rank_text!r} and WORLD_SIZE={size_text!r} must be integers; "
                         f"{launch}") from None
    if size < 1:
        raise InputError(f"WORLD_SIZE={size}: it must be at least 1 (the number of processes); "
                         f"{launch}")
    if not 0 <= rank < size:
        given = f"WORLD_SIZE={size}" if "WORLD_SIZE" in os.environ else "WORLD_SIZE unset (1)"
        raise InputError(f"RANK={rank} with {given}: RANK must be in 0..WORLD_SIZE-1; "
                         f"{launch}")
    return rank, size


def _join(device: torch.device, peer_timeout_s: float, timeout_s: float) -> Any:
    """Join the job's process group, waiting at most ``peer_timeout_s`` for the peers; return
    a group whose collectives wait up to ``timeout_s`` (None: the default group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return None
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank, size = world()
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=peer_timeout_s))
    except (RuntimeError, ValueError) as exc:  # DistStoreError, DistNetworkError, bad env
        raise InputError(
            f"rank {rank} of {size}: the other processes did not join within "
            f"{peer_timeout_s:g} s ({str(exc).splitlines()[0]}); start every rank (torchrun "
            f"does), check MASTER_ADDR/MASTER_PORT, or raise --peer-timeout") from None
    return dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def agree_on_key(key: RunKey, rank: int, size: int, group: Any = None) -> None:
    """Raise :class:`InputError` on every rank unless all ranks hold the same run key; the
    message names the parts that differ and the ranks whose part differs from rank 0's."""
    import torch.distributed as dist

    keys: list[Any] = [None] * size
    dist.all_gather_object(keys, dict(key.parts), group=group)
    reference = RunKey(keys[0])
    differing: dict[str, list[int]] = {}
    for other_rank, parts in enumerate(keys[1:], start=1):
        for name in reference.differences(parts):
            differing.setdefault(name, []).append(other_rank)
    if differing:
        what = "; ".join(f"{name} (ranks {', '.join(map(str, ranks))} differ from rank 0)"
                         for name, ranks in differing.items())
        raise InputError(f"rank {rank} of {size}: the ranks do not attribute the same run: "
                         f"{what}; the task function must build the same model, data and "
                         f"settings on every rank (seed it); nothing was written")


@dataclass
class Sharding:
    """This process's block of the training set and the sum over all processes."""

    rank: int
    world: int
    group: Any = None  # the process group of the sum (None: the default group)

    def rows(self, n: int) -> slice:
        size = -(-n // self.world)
        return slice(min(self.rank * size, n), min((self.rank + 1) * size, n))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.group)  # sum, in place
        return tensor


def _collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came from torch.distributed (a peer died, the rendezvous broke), not
    from the computation a rank was doing."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    where = f"torch{os.sep}distributed{os.sep}"
    tb = exc.__traceback__
    while tb is not None:
        if where in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False



def attribute_job(
    out: str | Path,
    method: Any,
    job: Any,
    *,
    chunk: int | None = None,
    force: bool = False,
    peer_timeout_s: float = PEER_TIMEOUT_S,
    timeout_s: float = WORK_TIMEOUT_S,
) -> Attribution | None:
    """Attribute ``job.test`` into the store ``out``; under torchrun, as one rank of many.

    Returns the assembled result on rank 0 (and in a single process), None on other ranks.
    ``force`` replaces results of another run in ``out`` (see :mod:`iif.results.store`).
    ``peer_timeout_s`` bounds the wait for the other ranks to join, ``timeout_s`` the wait
    for the slowest rank in the collectives.
    """
    rank, size = world()
    if size == 1:
        return attribute_to(out, method, job.test, chunk=chunk, progress=method.progress,
                            force=force)
    import torch.distributed as dist

    group = _join(method.task.device, peer_timeout_s, timeout_s)
    test = method.validate_test(job.test)
    try:
        key = run_key(method, test)
        agree_on_key(key, rank, size, group)
        # rank 0 claims and locks the folder first; a refusal stops every rank alike
        store, refusal = None, [None]
        if rank == 0:
            try:
                store = open_store(out, method, test, chunk, force=force, key=key)
            except InputError as exc:
                refusal = [str(exc)]
        dist.broadcast_object_list(refusal, src=0, group=group)
        if refusal[0] is not None:
            raise InputError(refusal[0] if rank == 0 else f"rank {rank}: {refusal[0]}")
        if rank != 0:
            store = open_store(out, method, test, chunk, key=key, lock=False)
        try:
            if method.shards_training_set():
                _attribute_split(store, method, test, rank, size, group)
            else:
                fill(store, method, test, ranks=(rank, size),
                     progress=method.progress if rank == 0 else False)
            dist.barrier(group=group)
            result = store.assemble() if rank == 0 else None  # every chunk is done
            dist.barrier(group=group)
        finally:
            store.close()
    except RuntimeError as exc:
        if not _collective_failure(exc):  # e.g. the user's model raising in its forward
            raise
        raise InputError(
            f"rank {rank} of {size}: the process group failed ({exc}); the finished chunks in "
            f"{out} are kept, run the same command again to resume") from None
    finally:
        dist.destroy_process_group()
    return result


def _attribute_split(store: ResultStore, method: Any, test: Any, rank: int, size: int,
                     group: Any = None) -> None:
    """The store's unfinished chunks computed by every rank together, each on its block of
    training samples; rank 0 writes them."""
    import torch.distributed as dist

    todo = store.pending()
    dist.barrier(group=group)  # every rank has looked before rank 0 can finish a chunk
    sharding = Sharding(rank, size, group)
    block = sharding.rows(len(method.train))
    log.info("rank %d of %d: training samples %d..%d, %d chunk(s) of test samples", rank, size,
             block.start, block.stop - 1, len(todo))
    with method.sharded(sharding):
        for lo, hi in todo:
            part = test.subset(slice(lo, hi))
            with index_offset(lo):  # warnings name test samples by global index
                result = method.attribute((part.x, part.labels))
            if rank == 0:
                store.write(lo, hi, result)

