"""Minibatch optimisation with the task's recipe, on a model state rather than the module.

One loop serves model training, unlearning (an extra test-loss term) and path epochs
(continuous targets). The training loss is the mean per-sample loss of each minibatch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from iif.grads import FunctionalModel, ModelState, module_mode
from iif.progress import progress_bar
from iif.task import Task

ExtraLoss = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class FitResult:
    state: ModelState  # the last sound state (see ``fit``)
    finite: bool  # False if the run broke down: NaN/inf, or an epoch that ``sound`` rejected
    losses: list[float]  # mean objective per completed epoch
    epochs: int = 0  # epochs completed and kept in ``state``


def fit(
    task: Task,
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    lr: float | None = None,
    batch_size: int | None = None,
    extra: ExtraLoss | None = None,
    stop: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], bool] | None = None,
    sound: Callable[[ModelState], bool] | None = None,
    generator: torch.Generator | None = None,
    train_mode: bool = True,
    progress: bool | None = False,
    desc: str = "train",
) -> FitResult:
    """Run ``epochs`` epochs of the recipe's optimizer from ``state`` (which is not modified).

    Each minibatch minimises ``mean_i l(f(x_i), targets_i) + extra(params, buffers)``.
    ``stop(params, buffers)``, checked after every step, ends the run early when True.
    A run that breaks down (a NaN/inf loss or parameter, or an epoch after which
    ``sound(state)`` is False) ends there and returns the state of the last good epoch
    (``state`` itself if the first one failed) with ``finite=False``.
    """
    recipe = task.recipe
    batch_size = int(batch_size or recipe.batch_size)
    work = state.clone()
    params = {k: v.requires_grad_(True) for k, v in work.params.items()}
    opt = recipe.make_optimizer(list(params.values()), lr=lr)
    n = x.shape[0]
    losses: list[float] = []
    good, done = state.clone(), 0

    def ok(candidate: ModelState) -> bool:
        return candidate.is_finite() and (sound is None or sound(candidate))

    with module_mode(fmodel.module, train_mode), torch.enable_grad():
        for _ in progress_bar(range(int(epochs)), desc=desc, enable=progress):
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
    d = task.validate(data, "training data")
    fmodel = FunctionalModel(task.model)
    gen = torch.Generator().manual_seed(seed)
    with seeded(seed, task.device):
        res = fit(task, fmodel, fmodel.state(), d.x, d.targets,
                  epochs=task.recipe.epochs if epochs is None else epochs,
                  generator=gen, progress=progress, desc="training")
    fmodel.load_into_module(res.state)
    return res.losses
