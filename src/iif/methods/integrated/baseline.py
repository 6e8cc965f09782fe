"""Baseline datasets: the targets the path starts from (DESIGN §2, step 1).

- Unlearning (paper Eq. 12-13): theta' ends a few epochs of the recipe's optimizer on
  ``L_train - L_test / lam`` (direction ``unlearn``; finds proponents) or
  ``L_train + L_test / lam`` (``reinforce``; finds opponents), from theta*. L_train is the
  mean loss over a minibatch, L_test the mean over the test sample(s) being explained. The
  baseline targets are the predictions ``f(x_i; theta')`` (probabilities for classification).
  The test-loss ascent is unbounded, so a run can diverge (NaN/inf, or a training loss that
  explodes past ``divergence_factor`` times that of a trivial predictor). It then keeps the
  last epoch that was still sound (``truncated``), or, when the first epoch already diverged,
  falls back to theta' = theta*, the influence-function baseline of Lemma 2.5; both are logged
  and counted in the result.
  Modes: the training term of each minibatch runs in the recipe's train mode (dropout,
  BatchNorm batch statistics that also move the running statistics, as training does); the
  test term is a loss of the model and is taken in eval mode (running statistics), like every
  loss and gradient of the package: a single test sample has no batch statistics.
- Self-influence (paper 3.3): each training sample i gets its own
  ``theta'_i = theta* + eta * grad l(x_i, y_i; theta*)`` and target ``f(x_i; theta'_i)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.func import vmap

from iif.engine.engine import Engine
from iif.engine.functional import FunctionalModel, ModelState, module_mode
from iif.engine.grads import per_sample_grads
from iif.engine.stacked import StackedState
from iif.engine.training import FitResult
from iif.errors import InputError
from iif.results.diagnostics import name_tests
from iif.task.task import Data, Task
from iif.validation import Settings, setting

log = logging.getLogger(__name__)


@dataclass
class BaselineSettings(Settings):
    """How baselines are made.

    mode: ``per-test`` (one unlearning per test sample, the paper's) or ``shared`` (one
        baseline that unlearns the mean loss of all test samples given together).
    lam: lambda of Eq. 12; the objective is ``L_train -/+ L_test / lam``.
    epochs, lr, batch_size: of the unlearning run (None: the recipe's).
    objective: what the unlearning ascends. ``"auto"`` (default) is ``"complement"`` for a
        classification task with the built-in cross-entropy and ``"loss"`` otherwise.
        ``"loss"`` ascends the test loss itself (paper Eq. 12): its gradient vanishes on a
        confidently correct test sample (p_y -> 1), so such a baseline hardly moves, and grows
        without bound once the sample is misclassified, so the ascent overshoots or diverges.
        ``"complement"`` minimises ``-log(1 - p_y)`` (the cross-entropy towards "any class but
        y"; for soft targets t, ``-log(1 - <t, p>)``) instead: the same direction, a gradient
        of size p_y on the logits, so it moves saturated samples at full speed and fades as the
        sample stops being predicted, bounded below by 0, so it cannot diverge. It applies to
        ``unlearn``; ``reinforce`` always descends the test loss, which is bounded.
    stop_test_loss: end unlearning early once the mean test loss reaches this value (for
        ``reinforce``: falls to it); a run that passes it is pulled back onto it. ``"chance"``
        stops ``unlearn`` at the loss of a predictor that ignores its input: ``log(C)`` for
        classification, the mean variance of the training targets for regression (a test
        sample already above it gets one step); it does not apply to ``reinforce``.
        ``"auto"`` (default): no stop for the bounded ``complement`` objective, ``"chance"``
        for ``loss``, whose unbounded ascent on a ReLU network grows its weights geometrically
        and often overflows within the first epoch.

    The defaults (lam 1, one epoch, the complement objective without a stop) were chosen on
    the tuning half of ``benchmarks/bench_quality.py`` (docs/quality.md): stopping the ascent
    early, at chance or below, gave baselines that moved too few training predictions and
    lowered LDS by 0.08.
    self_step: eta of the per-sample self-influence baselines (None: the recipe's lr).
    """

    section = "[baseline]"

    mode: Literal["per-test", "shared"] = setting(
        "per-test", doc="one unlearning per test sample, or one shared by all test samples")
    direction: Literal["unlearn", "reinforce"] = setting(
        "unlearn", doc="ascend the test loss (finds proponents) or descend it (opponents)")
    objective: Literal["auto", "complement", "loss"] = setting(
        "auto", doc="ascend the test loss (loss) or minimise -log(1 - p_y) (complement); "
        "auto: complement for the built-in cross-entropy")
    lam: float = setting(1.0, gt=0, doc="lambda of Eq. 12: the objective is "
                         "L_train -/+ L_test / lam")
    epochs: int = setting(1, ge=0, doc="epochs of the unlearning run")
    lr: float | None = setting(None, gt=0, doc="learning rate of the unlearning run (None: "
                               "the recipe's)")
    batch_size: int | None = setting(None, ge=1, doc="minibatch size of the unlearning run "
                                     "(None: the recipe's)")
    divergence_factor: float = setting(10.0, gt=0, doc="a training loss above this times a "
                                       "trivial predictor's is divergence")
    stop_test_loss: float | Literal["chance", "auto"] | None = setting(
        "auto", doc="mean test loss at which unlearning stops early (None: never; chance: "
        "that of a predictor ignoring its input; auto: chance for the loss objective)")
    self_step: float | None = setting(None, gt=0, doc="eta of the per-sample self-influence "
                                      "baselines (None: the recipe's lr)")


@dataclass
class Baseline:
    state: ModelState  # theta'
    targets: torch.Tensor  # (N, d) baseline targets ybar_i
    fell_back: bool  # unlearning diverged in its first epoch and theta' = theta* was used
    truncated: bool = False  # unlearning diverged later; theta' is the last sound epoch
    # theta' = theta* + pulled_back (theta_end - theta*): < 1 when the run passed its stop
    # level (or the divergence limit) and was pulled back onto it (see _land)
    pulled_back: float = 1.0


def mean_loss(
    task: Task, fmodel: FunctionalModel, state: ModelState, x: torch.Tensor, targets: torch.Tensor
) -> float:
    out = fmodel.outputs(state, x)
    return float(task.sample_loss(out, targets).mean())


def trivial_loss(task: Task, targets: torch.Tensor) -> float:
    """Loss of a predictor that ignores its input: the scale 'exploding' is measured against."""
    if task.kind == "classification":
        return math.log(targets.shape[1])
    if task.kind == "sequence":  # uniform over the vocabulary at every labelled position
        return float(targets.sum(1).mean()) * math.log(task.num_classes)
    return float((targets - targets.mean(0)).pow(2).mean()) or 1.0


def complement_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-log(1 - <t, softmax(z)>)`` (n,): the cross-entropy towards "any class
    but the target", computed as ``logsumexp(z) - logsumexp(z + log(1 - t))`` so that it stays
    exact for a saturated p_y (where ``1 - p_y`` rounds to 0)."""
    rest = torch.log1p(-target.clamp(max=1.0))  # log(1 - t): -inf on a one-hot target class
    return torch.logsumexp(output, dim=-1) - torch.logsumexp(output + rest, dim=-1)


def _sequence_complement(task: Task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """:func:`complement_loss` at every position of a sequence, summed (n,); positions
    without a label (zero target rows) add nothing."""
    def term(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = task.shaped(output)
        return complement_loss(logits, target.reshape(logits.shape)).sum(-1)

    return term


@dataclass
class _Objective:
    """What an unlearning run optimises and when it stops or counts as diverged."""

    sign: float  # -1: unlearn (ascend the test loss), +1: reinforce
    stop_at: float | None  # mean test loss that ends the run early
    limit: float  # a training loss above this has exploded
    # per-sample test term the run minimises (before the 1/lam weight)
    term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def stopped(self, test_loss: torch.Tensor) -> torch.Tensor:
        if self.stop_at is None:
            return torch.zeros_like(test_loss, dtype=torch.bool)
        return test_loss >= self.stop_at if self.sign < 0 else test_loss <= self.stop_at


def resolved_objective(task: Task, settings: BaselineSettings) -> str:
    """The objective ``settings.objective`` means for this task (see BaselineSettings)."""
    if settings.objective != "auto":
        return settings.objective
    builtin_ce = task.kind in ("classification", "sequence") and task.loss is None
    return "complement" if builtin_ce and settings.direction == "unlearn" else "loss"


def _objective(task: Task, fmodel: FunctionalModel, state: ModelState, train: Data,
               settings: BaselineSettings) -> _Objective:
    sign = -1.0 if settings.direction == "unlearn" else 1.0
    complement = sign < 0 and resolved_objective(task, settings) == "complement"
    target = settings.stop_test_loss
    if target == "auto":
        target = None if complement else "chance"
    if target == "chance":
        target = trivial_loss(task, train.targets) if sign < 0 else None
    before = mean_loss(task, fmodel, state, train.x, train.targets)
    limit = settings.divergence_factor * max(before, trivial_loss(task, train.targets))
    if complement:
        if task.kind not in ("classification", "sequence") or task.loss is not None:
            raise InputError("baseline objective 'complement' needs a classification or "
                             "sequence task with the built-in cross-entropy; use "
                             "objective='loss'")
        term = complement_loss if task.kind == "classification" else _sequence_complement(task)
    else:
        def term(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return sign * task.sample_loss(out, t)
    return _Objective(sign, target, limit, term)


def _soundness(task: Task, fmodel: FunctionalModel, train: Data, test: Data, goal: _Objective,
               reasons: list[str]) -> Callable[[ModelState], bool]:
    """``sound(candidate)``: False (and the reason appended) once the run has diverged. A
    candidate that has passed the stop level is sound when finite: :func:`_finish` pulls it
    back to the stop level, and only then judges its training loss."""

    def sound(candidate: ModelState) -> bool:
        after = mean_loss(task, fmodel, candidate, train.x, train.targets)
        test_after = mean_loss(task, fmodel, candidate, test.x, test.targets)
        if not (math.isfinite(after) and math.isfinite(test_after)):
            reasons.append("the loss became NaN/inf")
        elif after > goal.limit and not _passed_stop(goal, test_after):
            reasons.append(f"the training loss exploded ({after:.3g} > {goal.limit:.3g})")
        return not reasons

    return sound


def _passed_stop(goal: _Objective, test_loss: float) -> bool:
    return goal.stop_at is not None and bool(goal.stopped(torch.tensor(test_loss)))


def _between(start: ModelState, end: ModelState, alpha: float) -> ModelState:
    """The point ``start + alpha (end - start)`` of the segment between two states (buffers
    such as BatchNorm statistics are interpolated too)."""
    def mix(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: a[k] + alpha * (b[k] - a[k]) if a[k].is_floating_point() else b[k]
                for k in a}
    return ModelState(mix(start.params, end.params), mix(start.buffers, end.buffers))


def _bisect(good: Callable[[float], bool], steps: int = 30) -> float:
    """The largest alpha in [0, 1] with ``good(alpha)``, for a predicate that holds at 0 and
    fails beyond one crossing (to 2^-steps)."""
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if good(mid) else (lo, mid)
    return lo


def _land(task: Task, fmodel: FunctionalModel, start: ModelState, end: ModelState,
          train: Data, test: Data, goal: _Objective) -> tuple[ModelState, float]:
    """Pull an unlearning run that overshot back along the segment from theta* to where it
    ended: to the point whose test loss is the stop level, and, if its training loss is
    still above the divergence limit, further back to where it is not. One optimizer step on
    a single test sample can move its loss by tens of nats (the per-sample tangent kernel is
    large), so without this the stop level would only bound where the last step started.
    Returns the state and alpha (1: kept as it ended)."""
    def test_loss(alpha: float) -> float:
        return mean_loss(task, fmodel, _between(start, end, alpha), test.x, test.targets)

    def train_loss(alpha: float) -> float:
        return mean_loss(task, fmodel, _between(start, end, alpha), train.x, train.targets)

    alpha = 1.0
    # a test sample already past the stop level at theta* keeps its one step
    if _passed_stop(goal, test_loss(1.0)) and not _passed_stop(goal, test_loss(0.0)):
        alpha = _bisect(lambda a: not _passed_stop(goal, test_loss(a)))
        # the crossing itself: the first point at or beyond the stop level
        alpha = min(1.0, alpha + 2.0 ** -30)
    if not train_loss(alpha) <= goal.limit:
        top = alpha
        alpha = top * _bisect(lambda a: train_loss(top * a) <= goal.limit)
    return (end, 1.0) if alpha == 1.0 else (_between(start, end, alpha), alpha)


def _finish(task: Task, fmodel: FunctionalModel, state: ModelState, train: Data, test: Data,
            goal: _Objective, res: FitResult, reasons: list[str], rows: Any = None
            ) -> Baseline:
    """The baseline an unlearning run ``res`` from theta* = ``state`` ends at; ``rows``: the
    test rows it unlearns, named in a warning by global index (``iif.results.diagnostics``)."""
    reason = reasons[-1] if reasons else "a loss or parameter became NaN/inf"
    who = ""
    if rows is not None and not res.finite:
        who = (" for " if len(rows) == 1 else " for the one baseline of ") + name_tests(rows)
    if not res.finite and res.epochs == 0:
        log.warning("unlearning diverged in its first epoch%s (%s); falling back to the "
                    "baseline f(x; theta*)", who, reason)
        guess = task.prediction_targets(fmodel.outputs(state, train.x), train.targets)
        return Baseline(state, guess, True)
    if not res.finite:
        log.warning("unlearning diverged after %d epoch%s%s (%s); keeping the last sound epoch",
                    res.epochs, "" if res.epochs == 1 else "s", who, reason)
    end, alpha = res.state, 1.0
    if res.finite:
        end, alpha = _land(task, fmodel, state, res.state, train, test, goal)
    targets = task.prediction_targets(fmodel.outputs(end, train.x), train.targets)
    return Baseline(end, targets, False, truncated=not res.finite, pulled_back=alpha)


@dataclass
class UnlearningRun:
    """What an unlearning run of B copies from theta* needs: copy b unlearns the mean loss of
    ``tests[b]`` (test sets of one size). ``options`` are those of ``Engine.fit`` (per-copy
    ``extra``, ``stop`` and ``sound`` with the copies' test samples as ``extra_data``);
    :meth:`baselines` turns the copies' results into baselines."""

    task: Task
    fmodel: FunctionalModel
    state: ModelState
    train: Data
    tests: Sequence[Data]
    settings: BaselineSettings

    def __post_init__(self) -> None:
        self.goal = _objective(self.task, self.fmodel, self.state, self.train, self.settings)
        self.reasons: list[list[str]] = [[] for _ in self.tests]
        self.checks = [_soundness(self.task, self.fmodel, self.train, test, self.goal, why)
                       for test, why in zip(self.tests, self.reasons, strict=True)]

    def options(self) -> dict[str, Any]:
        task, fmodel, goal, lam = self.task, self.fmodel, self.goal, self.settings.lam

        def test_term(params, buffers, xb, tb):
            # The test term is a loss of the model, so it is taken in eval mode (dropout off,
            # BatchNorm on its running statistics), as every loss and gradient of the package
            # is; only the training term of the minibatch keeps the recipe's train mode. Batch
            # statistics of one test sample do not exist (BatchNorm raises), and those of a
            # group would normalise the test samples by themselves and write them into the
            # running statistics. For a model without such layers both modes are the same
            # computation. (Under vmap the flag is read when the forward is traced, so the
            # copies' training terms keep train mode.)
            with module_mode(fmodel.module, False):
                return goal.term(fmodel(params, buffers, xb), tb).mean() / lam

        def stop(params, buffers, xb, tb) -> torch.Tensor:
            # judged on the model itself, without dropout noise
            with torch.no_grad(), module_mode(fmodel.module, False):
                return goal.stopped(task.sample_loss(fmodel(params, buffers, xb), tb).mean())

        s = self.settings
        return dict(epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, extra=test_term,
                    extra_data=(torch.stack([t.x for t in self.tests]),
                                torch.stack([t.targets for t in self.tests])),
                    stop=None if goal.stop_at is None else stop,
                    sound=lambda b, candidate: self.checks[b](candidate), desc="unlearning")

    def baselines(self, results: Sequence[FitResult], rows: Sequence[Any] | None = None
                  ) -> list[Baseline]:
        """Copy b's baseline; ``rows[b]``: the test rows it unlearns, named by a warning if
        unlearning diverges (``iif.results.diagnostics``)."""
        return [_finish(self.task, self.fmodel, self.state, self.train, test, self.goal, res,
                        why, None if rows is None else rows[b])
                for b, (test, res, why) in enumerate(zip(self.tests, results, self.reasons,
                                                         strict=True))]


def unlearned_baselines(engine: Engine, tests: Sequence[Data], settings: BaselineSettings,
            generator: torch.Generator | None = None, progress: bool | None = False,
            rows: Sequence[Any] | None = None) -> list[Baseline]:
    """One baseline per copy from the engine's theta*: copy b unlearns the mean loss of
    ``tests[b]`` (test sets of one size; B = ``len(tests)`` copies, trained by
    :meth:`iif.engine.engine.Engine.fit` toward the training targets with the unlearning
    objective as its extra term and stop rule); ``rows[b]``: the rows ``tests[b]`` holds in
    the data being attributed, named by a warning if its unlearning diverges."""
    run = UnlearningRun(engine.task, engine.fmodel, engine.state, engine.train, tests, settings)
    start = engine.state if len(tests) == 1 else StackedState.repeat(engine.state, len(tests))
    results = engine.fit(start, engine.train.x, engine.train.targets, generator=generator,
                         progress=progress, **run.options())
    return run.baselines(results, rows)


def self_baseline_targets(
    task: Task,
    fmodel: FunctionalModel,
    state: ModelState,
    train: Data,
    step: float,
    chunk_size: int = 128,
) -> torch.Tensor:
    """ybar_i = f(x_i; theta* + step * grad l(x_i, y_i; theta*)), shape (N, d)."""
    names = list(state.params)

    def forward(delta: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        moved = fmodel.unflatten(delta)
        params = {k: state.params[k] + moved[k] for k in names}
        return fmodel(params, state.buffers, xi[None])[0]

    outs = []
    with torch.no_grad(), module_mode(fmodel.module, False):
        for start in range(0, len(train), chunk_size):
            sub = train.subset(slice(start, start + chunk_size))
            g = per_sample_grads(fmodel, state, sub.x, sub.targets, task, chunk_size)
            outs.append(vmap(forward)(step * g, sub.x))
    return task.prediction_targets(torch.cat(outs), train.targets)
