"""What a score explains on a test sample: the measurement.

By default every method explains the test loss. A :class:`Measurement` explains something
else about the trained model's output on a test sample: a class margin, one logit, the
log-probability of a target sequence (a generated answer), or any function of the output.

A measurement gives ``value(outputs, targets) -> (n,)`` for outputs of shape (n, ...) and the
test sample's targets (n, d) (one-hot rows for classification, flattened one-hot rows for a
sequence task, zero where no loss is taken), and says whether higher is better. The methods
attribute it oriented as a loss, ``m = -value`` when higher is better, so the sign convention
stays the same for every measurement: a negative score marks a proponent (including the
training sample makes the measurement better), a positive score an opponent. IIF's
completeness then compares the scores with the change of ``m`` from theta' to theta*.

``value`` is differentiated one sample at a time (called with one sample as a batch of one),
like the loss. A method evaluates it once on a few samples when it is built
(:func:`check_values`): a value of another shape, or one without a gradient to the outputs, is
refused there. An exception raised by a user's measurement (a :class:`FunctionMeasurement`'s
function, or ``value`` of a class defined outside iif) becomes a
:class:`~iif.errors.UserCodeError` naming the measurement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from iif.errors import InputError, UserCodeError

log = logging.getLogger(__name__)


class Task(Protocol):
    """What a measurement reads of its task (``iif.task.task.Task``, which imports this
    module): the kind of problem and its per-sample loss."""

    kind: str

    def sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

__all__ = ["FunctionMeasurement", "LogProb", "Logit", "Margin", "Measurement", "TestLoss",
           "check_measurement", "check_values"]


class Measurement:
    """Base of the measurements: subclasses set ``name`` and ``higher_is_better`` and
    implement ``value``."""

    name = "custom"
    higher_is_better = True

    def value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The measured value per sample, (n, ...), (n, d) -> (n,)."""
        raise NotImplementedError

    def evaluate(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:meth:`value`, an exception of the user's code in it raised as a
        :class:`~iif.errors.UserCodeError` that names this measurement."""
        if not self._users_code():
            return self.value(outputs, targets)
        try:
            return self.value(outputs, targets)
        except InputError:
            raise
        except Exception as exc:
            raise UserCodeError(self._call_text(), exc) from exc

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The value oriented as a loss (lower is better), (n,)."""
        v = self.evaluate(outputs, targets)
        return -v if self.higher_is_better else v

    def applies(self, task: Task) -> str | None:
        """Why this measurement does not apply to ``task`` (None: it does)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def _users_code(self) -> bool:
        """Whether ``value`` is the user's code (a class defined outside iif)."""
        return not getattr(type(self).value, "__module__", "").startswith("iif.")

    def _call_text(self) -> str:
        return f"calling value() of the measurement {self.name!r} ({type(self).__name__})"


class TestLoss(Measurement):
    """The task's own per-sample loss: the default, spelled out."""

    name = "test loss"
    higher_is_better = False
    __test__ = False  # not a test class, whatever its name

    def __init__(self, task: Task | None = None):
        self.task = task

    def value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.task is None:
            raise InputError("TestLoss needs its task; give Task(..., measurement=TestLoss())")
        return self.task.sample_loss(outputs, targets)


def margin(output: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """The correct-class margin ``log p_y - log(1 - p_y)``, computed stably from logits as
    ``z_y - logsumexp_{c != y} z_c``. Shapes (..., C) -> (...)."""
    true = (output * onehot).sum(-1)
    others = output.masked_fill(onehot > 0.5, float("-inf"))
    return true - torch.logsumexp(others, dim=-1)


def labelled_margins(logits: torch.Tensor, onehot: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`margin` at every position (..., C) -> (...), zero where the target row is zero
    (a position without a label); and the mask of labelled positions."""
    keep = onehot.sum(-1) > 0
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    return torch.where(keep, margin(logits, onehot), zero), keep


def _log_probs(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last axis and the targets in its shape."""
    logp = torch.log_softmax(outputs, dim=-1)
    return logp, targets.reshape(logp.shape)


class LogProb(Measurement):
    """The log-probability the model gives the target: ``log p_y`` for classification,
    ``sum_t log p(y_t | y_<t)`` over the positions with a label for a sequence (the
    log-likelihood of a generated answer when the prompt's positions are ignored). For the
    built-in cross-entropy it equals minus the test loss."""

    name = "log-probability"

    def value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp, t = _log_probs(outputs, targets)
        return (t * logp).flatten(1).sum(1)

    def applies(self, task: Task) -> str | None:
        return None if task.kind != "regression" else "LogProb needs class or token outputs"


class Margin(Measurement):
    """The correct-class margin ``log p_y - log(1 - p_y) = z_y - logsumexp_{c != y} z_c``
    (TRAK's output function); for a sequence, summed over the labelled positions."""

    name = "margin"

    def value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        margins, _ = labelled_margins(outputs, targets.reshape(outputs.shape))
        return margins.reshape(outputs.shape[0], -1).sum(1)

    def applies(self, task: Task) -> str | None:
        return None if task.kind != "regression" else "Margin needs class or token outputs"


class Logit(Measurement):
    """One output of the model: ``outputs[:, index]`` (a class logit, or one regression
    output), or for ``index=None`` the logit of the sample's own class."""

    higher_is_better = True

    def __init__(self, index: int | None = None):
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)
                                  or index < 0):
            raise InputError(f"Logit index must be an integer >= 0 or None, got {index!r}")
        self.index = index
        self.name = "logit of the label" if index is None else f"logit {index}"

    def value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return (outputs * targets.reshape(outputs.shape)).sum(-1)
        return outputs[:, self.index]

    def applies(self, task: Task) -> str | None:
        if task.kind == "sequence":
            return "Logit applies to (n, d) outputs; use LogProb or Margin for a sequence"
        if self.index is None and task.kind != "classification":
            return "Logit() of the label needs a classification task; give Logit(index)"
        return None


class FunctionMeasurement(Measurement):
    """A measurement from a function ``fn(outputs, targets) -> (n,)``."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str,
                 higher_is_better: bool):
        self.fn, self.name, self.higher_is_better = fn, name, bool(higher_is_better)

    def value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.fn(outputs, targets)

    def _users_code(self) -> bool:
        return True

    def _call_text(self) -> str:
        fn = getattr(self.fn, "__name__", type(self.fn).__name__)
        return f"calling the measurement function {self.name!r} ({fn})"


def check_measurement(measurement: object, task: Task) -> Measurement:
    """``measurement`` if it is a :class:`Measurement` that implements ``value`` and applies
    to ``task`` (a :class:`TestLoss` is bound to it)."""
    if not isinstance(measurement, Measurement):
        raise InputError(f"measurement must be an iif.task.measurements.Measurement "
                         f"(e.g. Margin(), LogProb(), Logit(3)), got "
                         f"{type(measurement).__name__}")
    if type(measurement).value is Measurement.value:
        raise InputError(f"measurement {type(measurement).__name__} does not implement "
                         f"value(outputs, targets)")
    why = measurement.applies(task)
    if why is not None:
        raise InputError(f"measurement {measurement.name!r} does not apply to this "
                         f"{task.kind} task: {why}")
    if isinstance(measurement, TestLoss) and measurement.task is None:
        measurement.task = task
    return measurement


def check_values(measurement: Measurement, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Evaluate ``measurement`` once on the model's ``outputs`` (n, ...) for a few samples and
    their ``targets`` (n, d), and refuse a value that is not a tensor of shape (n,) or that has
    no gradient to the outputs (every score would be zero: the methods differentiate it through
    the outputs). A gradient that is zero on these samples only gets a warning: a clamped or
    piecewise measurement may be flat on some samples and not on others."""
    leaf = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        value = measurement.evaluate(leaf, targets)
    what = f"measurement {measurement.name!r}"
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{what} must return a torch tensor of shape (n,), got "
                         f"{type(value).__name__}")
    n = leaf.shape[0]
    if tuple(value.shape) != (n,):
        shape = tuple(value.shape)
        got = (f"({', '.join(['n', *map(str, shape[1:])])})" if shape and shape[0] == n
               else f"{shape} for {n} samples")
        raise InputError(f"{what} must return one value per test sample, shape (n,), got {got}")
    grad = None
    if value.requires_grad:
        (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    if grad is None:
        raise InputError(f"{what} returned a value that does not depend differentiably on the "
                         f"model's outputs (detached, computed under torch.no_grad, through "
                         f"numpy or with integer operations), so every score would be zero; "
                         f"compute it from the outputs with differentiable torch operations")
    if not bool((grad != 0).any()):
        log.warning("%s has a zero gradient with respect to the model's outputs on all %d "
                    "sample(s) checked; test samples where it is flat get zero scores", what, n)
