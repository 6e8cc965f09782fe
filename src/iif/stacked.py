"""B copies of one model trained side by side: stacked parameters under ``torch.func.vmap``.

Per-test IIF trains, for every test sample, its own unlearning run and K path models. The
copies of a batch of test samples share the training minibatches, so one vmapped step serves
all of them, and copy b follows exactly the trajectory ``iif.training.fit`` gives it alone with
the same minibatch order (tested to floating-point tolerance).

Copies end independently: a copy whose ``stop`` fires, whose loss turns NaN/inf, or whose
epoch ``sound`` rejects, is frozen at the state ``fit`` would have returned, and its
parameters are put back after every later optimizer step. Freezing needs an optimizer that
updates each element from that element's own history, which SGD (with momentum, weight decay,
Nesterov), Adam and AdamW do; :func:`can_stack` refuses a custom optimizer.

Buffers (BatchNorm running statistics) are stacked like the parameters: each copy's train-mode
forwards update its own slice, exactly as ``fit`` updates the buffers of a single run, and a
frozen copy's buffers are put back with its parameters. Dropout draws a mask per copy
(``vmap(randomness="different")``), so with dropout a copy equals its separate run in
distribution only. BatchNorm with ``momentum=None`` cannot train under ``vmap``
(:func:`can_stack` refuses it; such models run one test sample at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import vmap

from iif.functional import FunctionalModel, ModelState, lone_samples_use_running_stats, module_mode
from iif.task import Task
from iif.training import FitResult

# extra(params, buffers, *data_b) -> scalar: the extra objective of one copy, with that copy's
# slice of ``extra_data``
StackedExtra = Callable[..., torch.Tensor]


@dataclass
class StackedState:
    """Parameters and buffers of B model copies, each tensor with a leading dimension B."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    @staticmethod
    def stack(states: Sequence[ModelState]) -> StackedState:
        first = states[0]
        return StackedState(
            {k: torch.stack([s.params[k].detach() for s in states]) for k in first.params},
            {k: torch.stack([s.buffers[k].detach() for s in states]) for k in first.buffers},
        )

    @staticmethod
    def repeat(state: ModelState, copies: int) -> StackedState:
        return StackedState.stack([state] * copies)

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def member(self, b: int) -> ModelState:
        return ModelState({k: v[b] for k, v in self.params.items()},
                          {k: v[b] for k, v in self.buffers.items()})

    def members(self) -> list[ModelState]:
        return [self.member(b) for b in range(len(self))]

    def clone(self) -> StackedState:
        return StackedState({k: v.detach().clone() for k, v in self.params.items()},
                            {k: v.detach().clone() for k, v in self.buffers.items()})


def can_stack(task: Task) -> bool:
    """Whether the task's optimizer is one whose copies can be frozen independently, and the
    model can train under ``vmap``: BatchNorm with ``momentum=None`` (a cumulative average)
    reads its batch counter as a Python number in train mode, which ``vmap`` cannot batch
    (``iif.evaluation.retrain`` trains such models one by one for the same reason)."""
    cumulative = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                     and m.momentum is None for m in task.model.modules())
    return not callable(task.recipe.optimizer) and not cumulative


def stacked_outputs(
    fmodel: FunctionalModel, state: StackedState, x: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Outputs (B, n, d) of every copy on the same inputs, eval mode, no gradients."""
    call = vmap(fmodel, in_dims=(0, 0, None))
    with torch.no_grad(), module_mode(fmodel.module, False):
        return torch.cat([call(state.params, state.buffers, x[i : i + chunk_size])
                          for i in range(0, x.shape[0], chunk_size)], dim=1)


def fit_stacked(  # noqa: C901, PLR0913 (to be split)
    task: Task,
    fmodel: FunctionalModel,
    state: StackedState,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    lr: float | None = None,
    batch_size: int | None = None,
    extra: StackedExtra | None = None,
    extra_data: Sequence[torch.Tensor] = (),
    stop: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor] | None = None,
    sound: Callable[[int, ModelState], bool] | None = None,
    generator: torch.Generator | None = None,
    train_mode: bool = True,
) -> list[FitResult]:
    """``iif.training.fit`` for each of the B copies in ``state``, one vmapped step for all.

    ``targets``: (N, d) shared by the copies or (B, N, d), one set per copy. ``extra`` is
    called per copy as ``extra(params_b, buffers_b, *[t[b] for t in extra_data])``.
    ``stop(params, buffers)`` gets the stacked tensors and returns a (B,) bool mask;
    ``sound(b, state_b)`` judges copy b's epoch. Returns one :class:`FitResult` per copy, equal
    to what ``fit`` returns for that copy alone given the same minibatch order.
    """
    copies = len(state)
    batch_size = int(batch_size or task.recipe.batch_size)
    per_copy_targets = targets.dim() == 3
    work = state.clone()
    params = {k: v.requires_grad_(True) for k, v in work.params.items()}
    opt = task.recipe.make_optimizer(list(params.values()), lr=lr)
    n = x.shape[0]

    def copy_loss(p, buf, xb, tb, *data):
        loss = task.sample_loss(fmodel(p, buf, xb), tb).mean()
        if extra is not None:
            loss = loss + extra(p, buf, *data)
        return loss

    # dropout draws its own mask per copy, as separate runs would
    losses_of = vmap(copy_loss, in_dims=(0, 0, None, 0 if per_copy_targets else None)
                     + (0,) * len(extra_data), randomness="different")

    good = [m.clone() for m in state.members()]  # each copy's last sound epoch
    done = [0] * copies
    history: list[list[float]] = [[] for _ in range(copies)]
    results: list[FitResult | None] = [None] * copies
    held = work.clone()  # parameters frozen copies are put back to
    # a copy is frozen once its result is set; the mask serves the vmapped loss
    frozen = torch.zeros(copies, dtype=torch.bool, device=x.device)

    def running() -> list[int]:
        return [b for b, r in enumerate(results) if r is None]

    def freeze(b: int, result: FitResult) -> None:
        results[b] = result
        frozen[b] = True
        with torch.no_grad():
            for k in held.params:
                held.params[k][b] = result.state.params[k]
            for k in held.buffers:
                held.buffers[k][b] = result.state.buffers[k]

    def restore_frozen() -> None:
        # slice by slice: a masked rewrite of every stacked tensor costs more than the step
        with torch.no_grad():
            for b in (b for b, r in enumerate(results) if r is not None):
                for tree, keep in ((params, held.params), (work.buffers, held.buffers)):
                    for k, v in tree.items():
                        v[b] = keep[k][b]

    def current(b: int) -> ModelState:
        return work.member(b).clone()

    def ok(b: int, candidate: ModelState) -> bool:
        return candidate.is_finite() and (sound is None or sound(b, candidate))

    with module_mode(fmodel.module, train_mode), lone_samples_use_running_stats(fmodel.module), \
            torch.enable_grad():
        for _ in range(int(epochs)):
            if not running():
                break
            order = torch.randperm(n, generator=generator).to(x.device)
            total = torch.zeros(copies, dtype=torch.float64, device=x.device)
            count = 0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                tb = targets[:, idx] if per_copy_targets else targets[idx]
                loss = losses_of(params, work.buffers, x[idx], tb, *extra_data)
                broken = ~torch.isfinite(loss.detach()) & ~frozen
                # one device sync per step, as fit's own finiteness check
                for b in (torch.nonzero(broken).flatten().tolist() if bool(broken.any())
                          else []):
                    freeze(b, FitResult(good[b], False, history[b], done[b]))
                live = ~frozen
                opt.zero_grad(set_to_none=True)
                torch.where(live, loss, torch.zeros_like(loss)).sum().backward()
                opt.step()
                restore_frozen()
                total += torch.where(live, loss.detach(), 0.0).double() * len(idx)
                count += len(idx)
                if stop is not None:
                    with torch.no_grad():
                        fired = stop(params, work.buffers) & ~frozen
                    for b in torch.nonzero(fired).flatten().tolist():
                        result = current(b)
                        if ok(b, result):
                            epoch_loss = float(total[b]) / count
                            freeze(b, FitResult(result, True, history[b] + [epoch_loss],
                                                done[b] + 1))
                        else:
                            freeze(b, FitResult(good[b], False, history[b], done[b]))
                if not running():
                    break
            for b in running():
                result = current(b)
                if not ok(b, result):
                    freeze(b, FitResult(good[b], False, history[b], done[b]))
                    continue
                history[b] = history[b] + [float(total[b]) / max(count, 1)]
                good[b], done[b] = result, done[b] + 1
    return [r if r is not None else FitResult(good[b], True, history[b], done[b])
            for b, r in enumerate(results)]
