"""B copies of one model trained side by side: stacked parameters under ``torch.func.vmap``.

Per-test IIF trains, for every test sample, its own unlearning run and K path models. The copies of
a batch of test samples share the training minibatches, so one vmapped step serves all of them, and
copy b follows exactly the trajectory ``iif.engine.training.fit`` gives it alone with the same
minibatch order (tested to floating-point tolerance).

Copies end independently: a copy whose ``stop`` fires, whose loss turns NaN/inf, or whose
epoch ``sound`` rejects, is frozen at the state ``fit`` would have returned, and its
parameters are put back after every later optimizer step. Freezing needs an optimizer that
updates each element from that element's own history, which SGD (with momentum, weight decay,
Nesterov), Adam and AdamW do; ``iif.engine.engine.Engine.stacking`` refuses a custom optimizer.

Buffers (BatchNorm running statistics) are stacked like the parameters: each copy's train-mode
forwards update its own slice, exactly as ``fit`` updates the buffers of a single run, and a
frozen copy's buffers are put back with its parameters. Dropout draws a mask per copy
(``vmap(randomness="different")``), so with dropout a copy equals its separate run in
distribution only. BatchNorm with ``momentum=None`` cannot train under ``vmap``
(``Engine.stacking`` refuses it; such models run one test sample at a time).

Each copy may also have its own training samples and minibatch order (``subsets``, and a
generator per copy): the LDS ground truth (``iif.evaluation.retrain.train_batch``) trains B
fresh models this way, each equal to its one-model run (``retrain.train_one``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from iif.engine.functional import (
    FunctionalModel,
    ModelState,
    lone_samples_use_running_stats,
    module_mode,
)
from iif.engine.training import FitOptions, FitResult
from iif.task.task import Task

# extra(params, buffers, *data_b) -> scalar: the extra objective of one copy, with that copy's
# slice of ``extra_data``
StackedExtra = Callable[..., torch.Tensor]


@dataclass
class StackedState:
    """Parameters and buffers of B model copies, each tensor with a leading dimension B.

    ``frozen``: parameters with ``requires_grad=False``, stacked, when they differ between the
    copies (fresh models of ``iif.evaluation.retrain``); empty: the module's own, shared.
    They are never trained, and :meth:`member` leaves them out (a ``ModelState`` has none).
    """

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)

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
                            {k: v.detach().clone() for k, v in self.buffers.items()},
                            {k: v.detach().clone() for k, v in self.frozen.items()})


def cumulative_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm with ``momentum=None`` (a cumulative average): it reads
    its batch counter as a Python number in train mode, which ``vmap`` cannot batch."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               and m.momentum is None for m in model.modules())


def _forward(fmodel: FunctionalModel, params: dict[str, torch.Tensor],
             frozen: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
             x: torch.Tensor) -> torch.Tensor:
    """One copy's outputs; its own ``frozen`` parameters, when given, replace the module's
    (``FunctionalModel`` lets the buffers' dict, merged last, override them)."""
    return fmodel(params, {**frozen, **buffers} if frozen else buffers, x)


def stacked_outputs(
    fmodel: FunctionalModel, state: StackedState, x: torch.Tensor, chunk_size: int = 1024,
    one_by_one: bool = False,
) -> torch.Tensor:
    """Outputs (B, n, d) of every copy on the same inputs, eval mode, no gradients: under
    ``vmap``, or copy by copy with ``one_by_one`` (a forward that cannot run under ``vmap``)."""
    if one_by_one:
        def call(p, fr, buf, xb):
            return torch.stack([_forward(fmodel, *(_row(t, b) for t in (p, fr, buf)), xb)
                                for b in range(len(state))])
    else:
        call = vmap(lambda p, fr, buf, xb: _forward(fmodel, p, fr, buf, xb),
                    in_dims=(0, 0, 0, None))
    with torch.no_grad(), module_mode(fmodel.module, False):
        return torch.cat([call(state.params, state.frozen, state.buffers, x[i : i + chunk_size])
                          for i in range(0, x.shape[0], chunk_size)], dim=1)


def _row(tensors: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    return {k: v[b] for k, v in tensors.items()}


def stacked_losses(
    task: Task, fmodel: FunctionalModel, state: StackedState, x: torch.Tensor,
    targets: torch.Tensor, chunk_size: int = 1024, one_by_one: bool = False,
) -> torch.Tensor:
    """Per-sample losses (B, n) of every copy on (x, targets) (n, d), eval mode, no grads
    (``one_by_one``: see :func:`stacked_outputs`)."""
    out = stacked_outputs(fmodel, state, x, chunk_size, one_by_one)  # (B, n, d)
    copies, n = out.shape[:2]
    with torch.no_grad():
        shared = targets.unsqueeze(0).expand(copies, *targets.shape)
        return task.sample_loss(out.reshape(copies * n, -1),
                                shared.reshape(copies * n, -1)).reshape(copies, n)


def fit_stacked(
    task: Task,
    fmodel: FunctionalModel,
    state: StackedState,
    x: torch.Tensor,
    targets: torch.Tensor,
    options: FitOptions | None = None,
    subsets: torch.Tensor | None = None,
    **changes: Any,
) -> list[FitResult]:
    """``iif.engine.training.fit`` for each of the B copies in ``state``, one vmapped step for all.

    ``options`` (a :class:`~iif.engine.training.FitOptions`) and/or its fields as keywords say how
    (``progress`` and ``desc`` are ignored, ``on_epoch`` is not supported).
    ``targets``: (N, d) shared by the copies or (B, N, d), one set per copy. ``extra`` is
    called per copy as ``extra(params_b, buffers_b, *[t[b] for t in extra_data])``.
    ``stop(params, buffers)`` gets the stacked tensors and returns a (B,) bool mask;
    ``sound(b, state_b)`` judges copy b's epoch. Returns one :class:`FitResult` per copy, equal
    to what ``fit`` returns for that copy alone given the same minibatch order.

    Sample orders: by default every epoch draws one order of the N samples from
    ``generator``, shared by the copies. ``generator`` may instead be a sequence of B
    generators, copy b drawing its own order from the b-th (as ``fit`` with that generator
    would). ``subsets`` (B, S) int: copy b trains on samples ``subsets[b]`` only (as ``fit``
    on ``x[subsets[b]]``), permuted each epoch by its own or the shared generator.
    """
    o = FitOptions.of(options, changes)
    if o.on_epoch is not None:
        raise TypeError("fit_stacked does not call on_epoch")
    orders = _Orders(len(state), x.shape[0], subsets, o.generator, x.device)
    run = _StackedRun(task, fmodel, state, o)
    batch_size = int(o.batch_size or task.recipe.batch_size)
    with module_mode(fmodel.module, o.train_mode), \
            lone_samples_use_running_stats(fmodel.module), torch.enable_grad():
        for _ in range(int(o.epochs)):
            if not run.running():
                break
            order = orders.draw()  # (n,) shared, or (B, n) one row per copy
            run.begin_epoch(x.device)
            for start in range(0, order.shape[-1], batch_size):
                idx = order[..., start : start + batch_size]
                run.step(x[idx], _minibatch_targets(targets, idx), per_copy=idx.dim() == 2)
                if not run.running():
                    break
            run.end_epoch()
    return run.results()


def _minibatch_targets(targets: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The targets of minibatch ``idx`` ((k,) shared or (B, k) per copy): (k, d) or (B, k, d)."""
    if targets.dim() < 3:
        return targets[idx]
    if idx.dim() == 1:
        return targets[:, idx]
    return targets[torch.arange(targets.shape[0], device=idx.device)[:, None], idx]


class _Orders:
    """Each epoch's sample order of a ``fit_stacked`` run: (N,) shared by the copies, or
    (B, S) per copy when there are ``subsets`` or one generator per copy."""

    def __init__(self, copies: int, n: int, subsets: torch.Tensor | None,
                 generator: Any, device: torch.device):
        self.per_copy = isinstance(generator, Sequence)
        if self.per_copy and len(generator) != copies:
            raise ValueError(f"fit_stacked needs one generator per copy ({copies}), got "
                             f"{len(generator)}")
        if subsets is not None and (subsets.dim() != 2 or subsets.shape[0] != copies):
            raise ValueError(f"subsets must be (B={copies}, S) sample indices, got shape "
                             f"{tuple(subsets.shape)}")
        self.n, self.generator, self.device = n, generator, device
        self.subsets = None if subsets is None else subsets.to(device)

    def draw(self) -> torch.Tensor:
        if not self.per_copy and self.subsets is None:
            return torch.randperm(self.n, generator=self.generator).to(self.device)
        gens = self.generator if self.per_copy else [self.generator]
        size = self.n if self.subsets is None else self.subsets.shape[1]
        perms = torch.stack([torch.randperm(size, generator=g) for g in gens]).to(self.device)
        if self.subsets is None:
            return perms
        return torch.gather(self.subsets, 1, perms.expand(self.subsets.shape[0], -1))


class _StackedRun:
    """The B copies of one ``fit_stacked`` run: their stacked parameters and optimizer, and
    per copy its last sound epoch and, once it has ended (broken down, stopped or rejected),
    its result; ended copies are frozen, their parameters put back after every step."""

    def __init__(self, task: Task, fmodel: FunctionalModel, state: StackedState,
                 o: FitOptions):
        self.o = o
        copies = len(state)
        self.work = state.clone()
        self.params = {k: v.requires_grad_(True) for k, v in self.work.params.items()}
        self.opt = task.recipe.make_optimizer(list(self.params.values()), lr=o.lr)

        def copy_loss(p, fr, buf, xb, tb, *data):
            loss = task.sample_loss(_forward(fmodel, p, fr, buf, xb), tb).mean()
            if o.extra is not None:
                loss = loss + o.extra(p, buf, *data)
            return loss

        self.copy_loss = copy_loss
        self.good = [m.clone() for m in state.members()]  # each copy's last sound epoch
        self.done = [0] * copies
        self.history: list[list[float]] = [[] for _ in range(copies)]
        self.ended: list[FitResult | None] = [None] * copies
        self.held = self.work.clone()  # parameters frozen copies are put back to
        # a copy is frozen once its result is set; the mask serves the vmapped loss
        device = next(iter(self.params.values())).device
        self.frozen = torch.zeros(copies, dtype=torch.bool, device=device)
        self.total = torch.zeros(copies, dtype=torch.float64, device=device)
        self.count = 0

    def running(self) -> list[int]:
        return [b for b, r in enumerate(self.ended) if r is None]

    def freeze(self, b: int, result: FitResult) -> None:
        self.ended[b] = result
        self.frozen[b] = True
        with torch.no_grad():
            for k in self.held.params:
                self.held.params[k][b] = result.state.params[k]
            for k in self.held.buffers:
                self.held.buffers[k][b] = result.state.buffers[k]

    def restore_frozen(self) -> None:
        # slice by slice: a masked rewrite of every stacked tensor costs more than the step
        with torch.no_grad():
            for b in (b for b, r in enumerate(self.ended) if r is not None):
                for tree, keep in ((self.params, self.held.params),
                                   (self.work.buffers, self.held.buffers)):
                    for k, v in tree.items():
                        v[b] = keep[k][b]

    def ok(self, b: int, candidate: ModelState) -> bool:
        return candidate.is_finite() and (self.o.sound is None or self.o.sound(b, candidate))

    def begin_epoch(self, device: torch.device) -> None:
        self.total = torch.zeros(len(self.ended), dtype=torch.float64, device=device)
        self.count = 0

    def step(self, xb: torch.Tensor, tb: torch.Tensor, per_copy: bool = False) -> None:
        """One optimizer step of the running copies on a minibatch: ``xb`` (k, ...) shared,
        or (B, k, ...) one per copy (``per_copy``); ``tb`` (k, d) or (B, k, d)."""
        extra_data = tuple(self.o.extra_data)
        # dropout draws its own mask per copy, as separate runs would
        losses_of = vmap(self.copy_loss,
                         in_dims=(0, 0, 0, 0 if per_copy else None, 0 if tb.dim() == 3 else None)
                         + (0,) * len(extra_data), randomness="different")
        loss = losses_of(self.params, self.work.frozen, self.work.buffers, xb, tb, *extra_data)
        k = xb.shape[1] if per_copy else xb.shape[0]
        broken = ~torch.isfinite(loss.detach()) & ~self.frozen
        # one device sync per step, as fit's own finiteness check
        for b in (torch.nonzero(broken).flatten().tolist() if bool(broken.any()) else []):
            self.freeze(b, FitResult(self.good[b], False, self.history[b], self.done[b]))
        live = ~self.frozen
        self.opt.zero_grad(set_to_none=True)
        torch.where(live, loss, torch.zeros_like(loss)).sum().backward()
        self.opt.step()
        self.restore_frozen()
        self.total += torch.where(live, loss.detach(), 0.0).double() * k
        self.count += k
        if self.o.stop is not None:
            self.check_stop()

    def check_stop(self) -> None:
        """End the copies whose ``stop`` fired, with this epoch so far if it is sound."""
        with torch.no_grad():
            fired = self.o.stop(self.params, self.work.buffers) & ~self.frozen
        for b in torch.nonzero(fired).flatten().tolist():
            result = self.work.member(b).clone()
            if self.ok(b, result):
                epoch_loss = float(self.total[b]) / self.count
                self.freeze(b, FitResult(result, True, self.history[b] + [epoch_loss],
                                         self.done[b] + 1))
            else:
                self.freeze(b, FitResult(self.good[b], False, self.history[b], self.done[b]))

    def end_epoch(self) -> None:
        for b in self.running():
            result = self.work.member(b).clone()
            if not self.ok(b, result):
                self.freeze(b, FitResult(self.good[b], False, self.history[b], self.done[b]))
                continue
            self.history[b] = self.history[b] + [float(self.total[b]) / max(self.count, 1)]
            self.good[b], self.done[b] = result, self.done[b] + 1

    def results(self) -> list[FitResult]:
        return [r if r is not None else FitResult(self.good[b], True, self.history[b],
                                                  self.done[b])
                for b, r in enumerate(self.ended)]
