"""Minibatch optimisation with the task's recipe, on a model state rather than the module.

One loop serves model training, unlearning (an extra test-loss term) and path epochs
(continuous targets). The training loss is the mean per-sample loss of each minibatch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from iif.engine.functional import (
    FunctionalModel,
    ModelState,
    lone_samples_use_running_stats,
    module_mode,
)
from iif.errors import InputError
from iif.progress import progress_bar
from iif.task.data import take
from iif.task.task import Data, Task

log = logging.getLogger(__name__)

ExtraLoss = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class FitResult:
    state: ModelState  # the last sound state (see ``fit``)
    finite: bool  # False if the run broke down: NaN/inf, or an epoch that ``sound`` rejected
    losses: list[float]  # mean objective per completed epoch
    epochs: int = 0  # epochs completed and kept in ``state``


@dataclass
class FitOptions:
    """How :func:`fit` (and ``iif.engine.stacked.fit_stacked``) train; see :func:`fit`. ``extra``,
    ``stop`` and ``sound`` take the forms each function documents; ``extra_data`` and a
    ``generator`` sequence (one per copy) are ``fit_stacked``'s only, ``on_epoch``,
    ``progress`` and ``desc`` ``fit``'s only."""

    epochs: int
    lr: float | None = None
    batch_size: int | None = None
    extra: Callable[..., torch.Tensor] | None = None
    extra_data: Sequence[torch.Tensor] = ()
    stop: Callable[..., Any] | None = None
    sound: Callable[..., bool] | None = None
    on_epoch: Callable[[int, ModelState], None] | None = None
    generator: torch.Generator | Sequence[torch.Generator] | None = None
    train_mode: bool = True
    progress: bool | None = False
    desc: str = "train"

    @classmethod
    def of(cls, options: FitOptions | None, changes: dict[str, Any]) -> FitOptions:
        """``options`` (None: the defaults, ``epochs`` among ``changes``) with ``changes``."""
        return cls(**changes) if options is None else dataclasses.replace(options, **changes)


def fit(
    task: Task,
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    targets: torch.Tensor,
    options: FitOptions | None = None,
    **changes: Any,
) -> FitResult:
    """Run ``epochs`` epochs of the recipe's optimizer from ``state`` (which is not modified).
``options`` (a :class:`FitOptions`) and/or its fields as keywords (``changes``) say how.

    Each minibatch minimises ``mean_i l(f(x_i), targets_i) + extra(params, buffers)``.
    ``stop(params, buffers)``, checked after every step, ends the run early when True.
    A run that breaks down (a NaN/inf loss or parameter, or an epoch after which
    ``sound(state)`` is False) ends there and returns the state of the last good epoch
    (``state`` itself if the first one failed) with ``finite=False``.
    ``on_epoch(epoch, state)`` is called after every completed, sound epoch (epoch counts
    from 1) with a copy of the state, e.g. to record checkpoints.

    Modes and buffers: the minibatch loss runs in train mode (``train_mode``; dropout on, BatchNorm
    on batch statistics) as the recipe trains, and each train-mode forward updates the run's own
    copy of the buffers (BatchNorm running statistics) as PyTorch would the module's; the returned
    state carries them, ``state`` and the module are never modified. A minibatch of one sample is
    normalised with the running statistics and leaves them as they are
    (``iif.engine.functional.lone_samples_use_running_stats``). ``extra`` chooses its own mode: the
    unlearning test term is an eval-mode loss (``iif.methods.integrated.baseline``).
    """
    o = FitOptions.of(options, changes)
    extra, stop, sound, generator = o.extra, o.stop, o.sound, o.generator
    batch_size = int(o.batch_size or task.recipe.batch_size)
    work = state.clone()
    params = {k: v.requires_grad_(True) for k, v in work.params.items()}
    opt = task.recipe.make_optimizer(list(params.values()), lr=o.lr)
    n = x.shape[0]
    losses: list[float] = []
    good, done = state.clone(), 0

    def ok(candidate: ModelState) -> bool:
        return candidate.is_finite() and (sound is None or sound(candidate))

    with module_mode(fmodel.module, o.train_mode), \
            lone_samples_use_running_stats(fmodel.module), torch.enable_grad():
        for _ in progress_bar(range(int(o.epochs)), total=int(o.epochs), desc=o.desc,
                              enable=o.progress):
            order = torch.randperm(n, generator=generator).to(x.device)
            total, count = 0.0, 0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                out = fmodel(params, work.buffers, x[idx])
                loss = task.sample_loss(out, targets[idx]).mean()
                if extra is not None:
                    loss = loss + extra(params, work.buffers)
                if not bool(torch.isfinite(loss)):
                    return FitResult(good, False, losses, done)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
                if stop is not None and stop(params, work.buffers):
                    result = _detached(work)
                    if not ok(result):
                        return FitResult(good, False, losses, done)
                    losses.append(total / count)
                    return FitResult(result, True, losses, done + 1)
            result = _detached(work)
            if not ok(result):
                return FitResult(good, False, losses, done)
            losses.append(total / max(count, 1))
            good, done = result.clone(), done + 1
            if o.on_epoch is not None:
                o.on_epoch(done, good.clone())
    return FitResult(good, True, losses, done)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG (dropout) for a block, restoring the caller's RNG state after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _detached(state: ModelState) -> ModelState:
    return ModelState({k: v.detach() for k, v in state.params.items()}, state.buffers)


def train(
    task: Task,
    data,
    *,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> list[float]:
    """Train ``task.model`` in place with its recipe on ``data`` = (inputs, labels).

    Returns the mean training loss of each epoch.
    """
    epochs = task.recipe.epochs if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise InputError(f"epochs must be an integer >= 0, got {epochs!r}")
    d = task.validate(data, "training data")
    fmodel = FunctionalModel(task.model, task.output)
    gen = torch.Generator().manual_seed(seed)
    with seeded(seed, task.device):
        res = fit(task, fmodel, fmodel.state(), d.x, d.targets, epochs=epochs,
                  generator=gen, progress=progress, desc="training")
    if not res.finite:
        log.warning("training broke down (NaN/inf) in epoch %d of %d; the model keeps the "
                    "last finite epoch", res.epochs + 1, epochs)
    fmodel.load_into_module(res.state)
    return res.losses


def reinitialised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with fresh parameters: every submodule's ``reset_parameters``
    under ``seed``. Raises when a trainable parameter has no module that can reset it."""
    fresh = copy.deepcopy(model)
    covered: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
                covered.update(id(p) for p in module.parameters(recurse=False))
    missing = [n for n, p in fresh.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise InputError(
            f"cannot re-initialise parameters {missing[:3]} (no reset_parameters); pass "
            f"independently trained models instead"
        )
    return fresh


def train_ensemble(
    task: Task,
    data,
    n_models: int,
    *,
    subset: str = "full",
    seed: int = 0,
    progress: bool | None = None,
) -> list[torch.nn.Module]:
    """Train ``n_models`` independent copies of ``task.model`` with the task's recipe.

    ``subset="full"``: each on all of ``data`` from its own initialisation and minibatch
    order; ``"half"``: each on its own random half (as TRAK does). Model k is seeded with
    ``seed + k``; ``task.model`` itself is left untouched.
    """
    if subset not in ("full", "half"):
        raise InputError(f"subset must be 'full' or 'half', got {subset!r}")
    if isinstance(n_models, bool) or int(n_models) < 1:
        raise InputError(f"n_models must be >= 1, got {n_models!r}")
    d = task.validate(data, "training data")
    models = []
    for k in progress_bar(range(int(n_models)), total=int(n_models), desc="ensemble",
                          enable=progress):
        model = reinitialised(task.model, seed + k)
        member = dataclasses.replace(task, model=model)
        part = d
        if subset == "half":
            gen = torch.Generator().manual_seed(seed + k)
            half = torch.randperm(len(d), generator=gen)[: len(d) // 2].to(d.x.device)
            part = Data(take(d.x, half), d.labels[half], d.targets[half])  # streamed stays so
        train(member, (part.x, part.labels), seed=seed + k, progress=progress)
        models.append(model)
    return models
