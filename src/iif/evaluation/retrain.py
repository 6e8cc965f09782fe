"""Ground truth for the LDS: many small models retrained on random training subsets.

For M random subsets S_m of ``round(fraction * N)`` training samples (``random_subsets``), R
models per subset are trained from fresh initialisations with the task's recipe, and the test
losses of each model (eval mode) are averaged over the R repeats: ``losses[m, s]``
(DESIGN §3). Model (m, r) has one seed, ``model_seed(seed, m, r)``, for its initialisation
(``reinitialised``) and its minibatch order, so a model's result never depends on which other
models it was trained with.

Training is batched: B models at once as an ``iif.engine.stacked.StackedState`` (leading dimension
B) trained by ``iif.engine.stacked.fit_stacked``, one vmapped step for all of them, each model on
its own subset and in its own minibatch order. One optimizer of the recipe runs over the stacked
tensors; SGD (momentum, weight decay), Adam and AdamW are element-wise, so this equals B separate
optimizers. A custom optimizer must be element-wise too (no norms or shapes across parameters) for
that to hold; otherwise set ``batch_models=1``.

Results are cached in ``cache_dir/<key>/``, an :class:`iif.results.chunks.ChunkFolder` (the layer
under the result store too): ``subsets`` and one ``losses_XXXX`` chunk per finished chunk of
``batch_models`` models (per-model losses, rows in model order ``k = m * R + r``), each an
``.npy`` with a checksummed record carrying the key, and ``manifest.json`` describing the
cache for a reader. Every file is written atomically; a run that stops part-way resumes with
the missing chunks only, and a damaged chunk is trained again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import stack_module_state

from iif.engine.functional import FunctionalModel
from iif.engine.grads import HOOKS, gradient_route, sample_loss_fn
from iif.engine.stacked import StackedState, cumulative_batchnorm, fit_stacked, stacked_losses
from iif.engine.training import reinitialised, seeded, train
from iif.errors import InputError
from iif.evaluation.metrics import LDSResult, lds, random_subsets
from iif.io import atomic_write, jsonable
from iif.progress import progress_bar
from iif.results.chunks import ChunkFolder, FolderLock
from iif.results.runkey import (
    data_digest,
    model_structure_digest,
    settings_digest,
    software_versions,
    source_of,
    tensor_digest,
    text_digest,
)
from iif.task.data import take
from iif.task.task import Data, Task
from iif.validation import Limits, Settings, check_value, setting

log = logging.getLogger(__name__)

CACHE_FORMAT = 2


# ---- settings and result ------------------------------------------------------------------
@dataclass
class RetrainSettings(Settings):
    """How the LDS ground truth is made (each field's description: ``describe()``)."""

    section = "retrain"

    n_subsets: int = setting(100, ge=2, doc="M, the number of random training subsets")
    fraction: float = setting(0.5, gt=0, lt=1, doc="alpha: each subset holds "
                              "round(fraction * N) samples")
    repeats: int = setting(1, ge=1, doc="R, models trained per subset; their test losses are "
                           "averaged")
    seed: int = setting(0, ge=0, doc="draws the subsets and seeds every model "
                        "(model_seed(seed, m, r))")
    batch_models: int = setting(16, ge=1, doc="models trained together in one batched run "
                                "(a cache chunk)")
    epochs: int | None = setting(None, ge=0, doc="training epochs per model (None: the task "
                                 "recipe's)")

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


@dataclass
class GroundTruth:
    """Retrained-model test losses for the LDS.

    ``subsets`` (M, N) bool; ``losses`` (M, n_test) float64, the mean over the R repeats of
    each test sample's loss (eval mode); ``repeat_losses`` (M, R, n_test) the per-model losses;
    ``key`` the cache key; ``seconds`` the training time of all models (summed over runs when
    the result was resumed from a cache). ``info["trained_models"]`` counts the models trained
    by this call (0 when everything came from the cache).
    """

    subsets: np.ndarray
    losses: np.ndarray
    settings: RetrainSettings
    key: str
    seconds: float
    repeat_losses: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, scores: np.ndarray) -> LDSResult:
        """LDS of attribution ``scores`` (n_test, N) against this ground truth."""
        result = lds(scores, self.subsets, self.losses)
        result.info.update(repeats=self.settings.repeats, fraction=self.settings.fraction,
                           ground_truth_key=self.key)
        return result

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe summary (no arrays)."""
        return jsonable({"key": self.key, "settings": self.settings.to_dict(),
                         "n_train": int(self.subsets.shape[1]),
                         "n_test": int(self.losses.shape[1]), "seconds": self.seconds,
                         **self.info})


def model_seed(seed: int, m: int, r: int) -> int:
    """The seed of model (m, r): initialisation and minibatch order. A 63-bit integer that
    depends only on (seed, m, r)."""
    state = np.random.SeedSequence([int(seed), int(m), int(r)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


# ---- one model: the reference -------------------------------------------------------------
def _resolve_epochs(task: Task, epochs: int | None) -> int:
    epochs = task.recipe.epochs if epochs is None else epochs
    return check_value(epochs, int, "epochs", Limits(ge=0))


def _mask(mask: Any, n: int) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (n,):
        raise InputError(f"a subset must be a boolean mask of shape ({n},), got "
                         f"{mask.dtype} {mask.shape}")
    if not mask.any():
        raise InputError("a subset is empty")
    return mask


def train_one(task: Task, data: Any, subset_mask: Any, seed: int,
              epochs: int | None = None) -> nn.Module:
    """Train one fresh model on a subset, exactly as ``iif.engine.training.train`` does.

    The model is ``reinitialised(task.model, seed)`` trained on the samples of ``data`` where
    ``subset_mask`` (N,) is True (in their original order) with minibatch order and dropout
    seeded by ``seed``. Returns the trained copy; ``task.model`` is untouched.
    """
    return _train_one(task, data, subset_mask, seed, epochs)[0]


def _train_one(task: Task, data: Any, subset_mask: Any, seed: int,
               epochs: int | None) -> tuple[nn.Module, bool]:
    """``train_one`` and whether every epoch finished (False: training broke down)."""
    d = task.validate(data, "training data")
    mask = _mask(subset_mask, len(d))
    rows = torch.as_tensor(np.flatnonzero(mask), device=d.labels.device)
    part = Data(take(d.x, rows), d.labels[rows], d.targets[rows])  # streamed inputs stay so
    model = reinitialised(task.model, seed)
    member = dataclasses.replace(task, model=model)
    epochs = _resolve_epochs(task, epochs)
    losses = train(member, (part.x, part.labels), epochs=epochs, seed=seed, progress=False)
    return model, len(losses) == epochs


# ---- many models at once ------------------------------------------------------------------
class RetrainDiverged(InputError):
    """A retrained model produced a NaN/inf loss or parameter; ``index`` is its position in
    the batch."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index




def why_one_by_one(task: Task, data: Data) -> str | None:
    """Why B models of ``task`` cannot train or run stacked under ``vmap``, or None: BatchNorm
    with ``momentum=None``, or a forward that cannot run under ``vmap`` (data-dependent control
    flow such as a Hugging Face padding mask; the gradient route's probe on two samples of
    ``data``)."""
    if cumulative_batchnorm(task.model):
        return "BatchNorm with momentum=None (a cumulative average) cannot train under vmap"
    return why_not_vmapped(task, data)


def why_not_vmapped(task: Task, data: Data) -> str | None:
    """Why the model's forward cannot run under ``vmap`` (the gradient route's probe on two
    samples of ``data``), or None."""
    fmodel = FunctionalModel(task.model, task.output)
    if gradient_route(fmodel, fmodel.state(), data.x[:2], sample_loss_fn(task),
                      data.targets[:2]) == HOOKS:
        return fmodel.route_note
    return None


def train_batch(task: Task, data: Any, subset_masks: Any, seeds: Sequence[int],
                epochs: int | None = None) -> StackedState:
    """Train B fresh models together, model b on subset ``subset_masks[b]`` with ``seeds[b]``.

    ``subset_masks`` (B, N) bool, all rows with the same number of samples. Model b equals
    ``train_one(task, data, subset_masks[b], seeds[b], epochs)`` up to rounding: the same
    initialisation, minibatch order and optimizer steps (``iif.engine.stacked.fit_stacked`` with the
    subsets and one generator per model). Returns the models' stacked parameters, buffers
    (BatchNorm running statistics, updated per model) and ``frozen`` parameters (re-initialised
    per model too). Random layers (dropout) draw different numbers for every model
    (``vmap(randomness="different")``, seeded by ``seeds[0]``), so with dropout a model equals
    its one-by-one counterpart in distribution only, and depends on the batch. Models that
    cannot run under ``vmap`` (:func:`why_one_by_one`: BatchNorm with ``momentum=None``, a
    forward with data-dependent control flow) are trained one by one with ``train_one``.
    Raises :class:`RetrainDiverged` on a NaN/inf training loss or parameter.
    """
    d = task.validate(data, "training data")
    epochs = _resolve_epochs(task, epochs)
    if isinstance(subset_masks, torch.Tensor):
        subset_masks = subset_masks.detach().cpu().numpy()
    masks = np.asarray(subset_masks)
    seeds = [int(s) for s in seeds]
    if masks.ndim != 2 or masks.shape[0] != len(seeds) or masks.shape[0] == 0:
        raise InputError(f"subset_masks must be (B, N) with one row per seed; got shape "
                         f"{masks.shape} for {len(seeds)} seeds")
    rows = [_mask(row, len(d)) for row in masks]
    sizes = {int(row.sum()) for row in rows}
    if len(sizes) != 1:
        raise InputError(f"batched training needs subsets of one size, got sizes {sorted(sizes)}")

    alone = why_one_by_one(task, d)
    if alone is not None:
        log.info("retraining %d models one at a time: %s", len(seeds), alone)
        models = []
        for b, (row, s) in enumerate(zip(rows, seeds, strict=True)):
            model, complete = _train_one(task, d, row, s, epochs)
            if not complete:
                raise RetrainDiverged(b, "NaN/inf training loss")
            models.append(model)
        return _stack(models)

    models = [reinitialised(task.model, s) for s in seeds]
    start = _stack(models)
    index = torch.as_tensor(np.stack([np.flatnonzero(row) for row in rows]))  # (B, S)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with seeded(seeds[0], task.device):
        results = fit_stacked(task, FunctionalModel(models[0], task.output), start, d.x, d.targets,
                              epochs=epochs, generator=gens, subsets=index.to(d.x.device))
    for b, res in enumerate(results):
        if not res.finite:
            raise RetrainDiverged(b, f"NaN/inf training loss or parameter in epoch "
                                     f"{res.epochs + 1} of {epochs}")
    trained = StackedState.stack([res.state for res in results])
    trained.frozen = start.frozen
    return trained


def _stack(models: list[nn.Module]) -> StackedState:
    params, buffers = stack_module_state(models)
    names = {n for n, p in models[0].named_parameters() if p.requires_grad}
    return StackedState(
        params={k: v.detach() for k, v in params.items() if k in names},
        buffers={k: v.detach().clone() for k, v in buffers.items()},
        frozen={k: v.detach() for k, v in params.items() if k not in names},
    )


# ---- cache key --------------------------------------------------------------------------
def cache_key(task: Task, train_data: Any, test_data: Any, settings: RetrainSettings) -> str:
    """SHA-256 (hex) of everything the ground-truth losses depend on: training and test data
    (inputs and targets), the model's structure (module tree and the source of custom module
    classes, as in :mod:`iif.results.runkey`) and tensors, the recipe (a custom optimizer or loss by
    its source), the settings, the task kind, class count and dtype, and the versions."""
    train_d = task.validate(train_data, "training data")
    test_d = task.validate(test_data, "test data", stream=False)
    return _key(task, train_d, test_d, settings)


def _key(task: Task, train_d: Data, test_d: Data, settings: RetrainSettings) -> str:
    optimizer = task.recipe.optimizer
    meta = {
        "format": CACHE_FORMAT,
        "kind": task.kind,
        "num_classes": task.num_classes,
        "dtype": str(task.dtype),
        "recipe": task.recipe.to_dict(),
        "optimizer": source_of(optimizer) if callable(optimizer) else optimizer,
        "settings": settings.to_dict(),
        "versions": software_versions(),
    }
    return text_digest(" ".join([
        settings_digest(meta),
        model_structure_digest([task.model], task.loss),
        tensor_digest(list(task.model.state_dict().values())),  # its parameters and buffers
        data_digest(train_d), data_digest(test_d),
    ]))


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """What the cache holds, for a reader (the chunks' records are what counts)."""
    text = json.dumps(jsonable(manifest), indent=1, sort_keys=True).encode()
    atomic_write(folder / "manifest.json", lambda f: f.write(text))


def _chunk_name(chunk: int) -> str:
    return f"losses_{chunk:04d}"


# ---- the ground truth -------------------------------------------------------------------
def ground_truth(
    task: Task,
    train_data: Any,
    test_data: Any,
    settings: RetrainSettings | None = None,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
    ranks: tuple[int, int] = (0, 1),
) -> GroundTruth | None:
    """Retrain ``n_subsets * repeats`` models on random subsets and record their test losses.

    ``train_data`` (N samples) and ``test_data`` (n_test samples) are (inputs, labels) pairs.
    Returns subsets (M, N) and mean losses (M, n_test). With ``cache_dir``, finished chunks
    are read from ``cache_dir/<key>/`` (an :class:`iif.results.chunks.ChunkFolder`: checksummed,
    keyed records; a damaged or foreign chunk is trained again) and only missing ones are
    trained, holding the folder's lock. A diverged model (NaN/inf loss) raises
    :class:`InputError` naming its subset; nothing of its chunk is cached.
    ``ranks = (rank, world)`` with world > 1 (needs ``cache_dir``, shared by the ranks): train
    only chunks ``rank, rank + world, ...`` into the cache and return None; once every rank is
    done, a call with the default ``ranks`` reads the whole result from the cache.
    """
    rank, world = ranks
    if world > 1 and cache_dir is None:
        raise InputError("ground truth split across ranks needs a cache_dir shared by them")
    settings = RetrainSettings() if settings is None else settings
    if not isinstance(settings, RetrainSettings):
        raise InputError(f"settings must be RetrainSettings, got {type(settings).__name__}")
    start_time = time.perf_counter()
    train_d = task.validate(train_data, "training data")
    test_d = task.validate(test_data, "test data", stream=False)
    epochs = _resolve_epochs(task, settings.epochs)
    key = _key(task, train_d, test_d, settings)
    m_subsets, repeats, n_train = settings.n_subsets, settings.repeats, len(train_d)
    n_models, chunk = m_subsets * repeats, settings.batch_models
    n_chunks = math.ceil(n_models / chunk)
    bounds = [(c * chunk, min((c + 1) * chunk, n_models)) for c in range(n_chunks)]
    mine = [c for c in range(n_chunks) if c % world == rank]

    cache = None if cache_dir is None else ChunkFolder(Path(cache_dir) / key, key, lock=False)
    per_model = np.empty((n_models, len(test_d)), dtype=np.float64)
    seconds: dict[int, float] = {}
    todo = _read_cached_chunks(cache, mine, bounds, per_model, seconds)
    lock = FolderLock(cache.folder) if cache is not None and todo and world == 1 else None
    try:
        subsets = _subsets(cache, settings, n_train)
        if cache is not None and todo:
            _write_manifest(cache.folder, {
                "format": CACHE_FORMAT, "key": key, "settings": settings.to_dict(),
                "task": task.to_dict(), "epochs": epochs, "n_train": n_train,
                "n_test": len(test_d), "n_models": n_models, "chunk_size": chunk,
                "n_chunks": n_chunks})
        cached_chunks = len(mine) - len(todo)
        trained = _train_chunks(task, train_d, test_d, subsets, settings, epochs, cache,
                                _ChunkPlan(todo, bounds, per_model, seconds), progress)
    finally:
        if lock is not None:
            lock.release()

    if world > 1:
        return None
    repeat_losses = per_model.reshape(m_subsets, repeats, len(test_d))
    info = {
        "trained_models": trained,
        "cached_chunks": cached_chunks,
        "n_chunks": n_chunks,
        "epochs": epochs,
        "cache_dir": None if cache is None else str(cache.folder),
        "wall_seconds": time.perf_counter() - start_time,
    }
    if cached_chunks:
        log.info("ground truth %s: %d of %d chunks from the cache", key[:12], cached_chunks,
                 n_chunks)
    return GroundTruth(subsets=subsets, losses=repeat_losses.mean(axis=1), settings=settings,
                       key=key, seconds=float(sum(seconds.values())),
                       repeat_losses=repeat_losses, info=info)


def _read_cached_chunks(cache: ChunkFolder | None, mine: list[int],
                        bounds: list[tuple[int, int]], per_model: np.ndarray,
                        seconds: dict[int, float]) -> list[int]:
    """Fill ``per_model`` (and ``seconds``) from the valid cached chunks among ``mine``;
    a damaged chunk, or one holding NaN or inf, is discarded. Returns the chunks to train."""
    todo = []
    for c in mine:
        lo, hi = bounds[c]
        problem = "missing" if cache is None else cache.problem(_chunk_name(c),
                                                                (hi - lo, per_model.shape[1]))
        if problem is None:
            values, record = cache.read(_chunk_name(c))
            if np.all(np.isfinite(values)):
                per_model[lo:hi] = values
                seconds[c] = float(record.get("seconds") or 0.0)
                continue
            problem = "holds NaN or inf"
        if problem != "missing":
            log.warning("cache chunk %d in %s %s; retraining it", c, cache.folder, problem)
            cache.discard(_chunk_name(c))
        todo.append(c)
    return todo


@dataclass
class _ChunkPlan:
    """The chunks to train (``todo``), the model range of each chunk (``bounds``) and where
    their test losses (``per_model``, models x n_test) and seconds go."""

    todo: list[int]
    bounds: list[tuple[int, int]]
    per_model: np.ndarray
    seconds: dict[int, float]


def _train_chunks(task: Task, train_d: Data, test_d: Data, subsets: np.ndarray,
                  settings: RetrainSettings, epochs: int, cache: ChunkFolder | None,
                  plan: _ChunkPlan, progress: bool | None) -> int:
    """Train the chunks of ``plan``, writing each to ``cache`` when there is one; returns
    the number of models trained."""
    trained = 0
    # whether the trained models' forward runs copy by copy (not under vmap): probed once
    looped = bool(plan.todo) and why_not_vmapped(task, train_d) is not None
    for c in progress_bar(plan.todo, total=len(plan.todo), desc="retrain", enable=progress):
        lo, hi = plan.bounds[c]
        t0 = time.perf_counter()
        plan.per_model[lo:hi] = _train_chunk(task, train_d, test_d, subsets, settings, epochs,
                                             (lo, hi), looped)
        plan.seconds[c] = time.perf_counter() - t0
        trained += hi - lo
        if cache is not None:
            cache.write(_chunk_name(c), plan.per_model[lo:hi], seconds=plan.seconds[c])
    return trained


def _subsets(cache: ChunkFolder | None, settings: RetrainSettings, n_train: int
             ) -> np.ndarray:
    """The random subsets (M, N), from the cache when it holds them (the cached losses
    belong to them), else drawn and cached."""
    shape = (settings.n_subsets, n_train)
    if cache is not None and cache.problem("subsets", shape, dtype="bool") is None:
        return np.array(cache.read("subsets")[0])
    subsets = random_subsets(settings.n_subsets, n_train, settings.fraction, settings.seed)
    if cache is not None:
        cache.write("subsets", subsets, dtype="bool")
    return subsets


def _train_chunk(task: Task, train_d: Data, test_d: Data, subsets: np.ndarray,
                 settings: RetrainSettings, epochs: int, bounds: tuple[int, int],
                 looped: bool) -> np.ndarray:
    """Test losses (hi - lo, n_test) of models lo..hi-1 (``bounds``; model k is subset
    k // R, repeat k % R); ``looped``: their outputs are taken copy by copy, the forward
    cannot run under ``vmap``."""
    lo, hi = bounds
    repeats = settings.repeats
    pairs = [(k // repeats, k % repeats) for k in range(lo, hi)]
    seeds = [model_seed(settings.seed, m, r) for m, r in pairs]
    masks = np.stack([subsets[m] for m, _ in pairs])
    try:
        models = train_batch(task, train_d, masks, seeds, epochs)
        losses = stacked_losses(task, FunctionalModel(task.model, task.output), models, test_d.x,
                                test_d.targets, one_by_one=looped).detach().cpu().numpy()
    except RetrainDiverged as exc:
        m, r = pairs[exc.index]
        raise InputError(f"the model retrained on subset {m} (repeat {r}) diverged: {exc}; "
                         f"lower the recipe's learning rate or the epochs") from exc
    bad = ~np.isfinite(losses).all(axis=1)
    if bad.any():
        m, r = pairs[int(np.flatnonzero(bad)[0])]
        raise InputError(f"the model retrained on subset {m} (repeat {r}) diverged: NaN/inf "
                         f"test loss; lower the recipe's learning rate or the epochs")
    return losses.astype(np.float64)
