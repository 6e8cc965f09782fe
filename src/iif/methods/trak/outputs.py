"""TRAK's model-output function as a plug-in: what is featurised, and how it weighs on the loss.

A :class:`ModelOutput` gives, for model outputs (n, d) and targets (n, d):

- ``value(outputs, targets) -> (n,)``: the scalar f whose parameter gradient is featurised;
- ``weight(outputs, targets) -> (n,)``: TRAK's Q, ``w_i = -dl_i/df_i`` (how raising f lowers
  the loss: ``1 - p_y`` for the margin);

and, with defaults that leave them out as TRAK does for classification,

- ``curvature(outputs, targets) -> (n,) | None``: ``sqrt(d^2 l / d f^2)`` scaling each
  training feature in the kernel ``(Phi^T D Phi + lambda I)^{-1}`` (None: D = I);
- ``test_weight(outputs, targets) -> (n,) | None``: the test orientation ``c_s`` (None: 1);
- ``name``: recorded with the scores (and so in the run key).

``value`` is differentiated one sample at a time: it is called with outputs and targets of
one sample as (1, d) each and must return shape (1,). :class:`Margin` (classification with
cross-entropy), :class:`SequenceMargin` (a sequence task) and :class:`Output` (one-output
regression, on the task's loss) are the defaults, chosen from the task by :func:`default_output`.
"""

from __future__ import annotations

import torch
from torch.func import grad, vmap

from iif.engine.grads import output_hessian_factor, sample_loss_fn
from iif.errors import InputError
from iif.task.measurements import labelled_margins, margin
from iif.task.task import Task


class ModelOutput:
    """Base of the model-output functions; subclasses implement ``value`` and ``weight``."""

    name = "custom"

    def value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The output function f per sample, (n, d), (n, d) -> (n,)."""
        raise NotImplementedError

    def weight(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """TRAK's Q per sample, ``-dl/df`` (n,)."""
        raise NotImplementedError

    def curvature(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """``sqrt(d^2 l / d f^2)`` per training sample (n,), or None for D = I."""
        return None

    def test_weight(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """The test orientation ``c_s`` (n,), or None for 1."""
        return None


class Margin(ModelOutput):
    """Classification with cross-entropy: f = the correct-class margin ``log p/(1 - p)``, for
    which ``l = log(1 + exp(-f))`` and ``w = 1 - p_y``; D = I and c_s = 1 as in TRAK."""

    name = "margin"

    def value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return margin(outputs, targets)

    def weight(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-margin(outputs, targets))


class Output(ModelOutput):
    """Single-output regression: f = the output itself, ``w = c = -l'(f)`` and D = l''(f)
    of the task's loss (2, 2 (y - f) and 2 (y - f) for the squared error)."""

    name = "output"

    def __init__(self, task: Task):
        self.task = task

    def value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs[..., 0]

    def weight(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -vmap(grad(sample_loss_fn(self.task)))(outputs, targets)[:, 0]

    def curvature(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return output_hessian_factor(self.task, outputs, targets)[:, 0, 0]

    def test_weight(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.weight(outputs, targets)


class SequenceMargin(ModelOutput):
    """A sequence task: f = the sum of the per-token margins over the labelled positions
    (outputs (n, T * V) flattened); ``w`` the mean of the per-token ``1 - p_y``, which is
    :class:`Margin`'s for one position (a sum of token losses has no single ``-dl/df``)."""

    name = "sequence margin"

    def __init__(self, vocab: int):
        self.vocab = vocab

    def _margins(self, outputs: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = outputs.reshape(outputs.shape[0], -1, self.vocab)
        return labelled_margins(logits, targets.reshape(logits.shape))

    def value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._margins(outputs, targets)[0].sum(-1)

    def weight(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        m, keep = self._margins(outputs, targets)
        w = torch.sigmoid(-m) * keep.to(m.dtype)
        return w.sum(-1) / keep.sum(-1).clamp_min(1).to(m.dtype)


def default_output(task: Task, outputs: int) -> ModelOutput:
    """:class:`Margin` for classification with the default cross-entropy and >= 2 classes,
    :class:`Output` for single-output regression; anything else is refused (give a
    ``model_output`` of your own)."""
    if task.kind == "regression":
        if outputs != 1:
            raise InputError(
                f"TRAK supports regression with a single output only; the model has {outputs} "
                f"outputs (attribute each output with its own single-output task)"
            )
        return Output(task)
    if task.loss is not None:
        raise InputError(
            f"TRAK's margin output function assumes the cross-entropy loss; this "
            f"{task.kind} task has a custom loss"
        )
    if task.kind == "sequence":
        return SequenceMargin(task.num_classes)
    if outputs < 2:
        raise InputError(f"TRAK classification needs >= 2 classes, got {outputs}")
    return Margin()


def check_output(model_output: object) -> ModelOutput:
    """``model_output`` if it is a :class:`ModelOutput` implementing ``value`` and ``weight``."""
    if not isinstance(model_output, ModelOutput):
        raise InputError(f"model_output must be an iif.methods.trak.outputs.ModelOutput "
                         f"(e.g. Margin() or Output(task)), got {type(model_output).__name__}")
    for part in ("value", "weight"):
        if getattr(type(model_output), part) is getattr(ModelOutput, part):
            raise InputError(f"model_output {type(model_output).__name__} does not implement "
                             f"{part}(outputs, targets)")
    return model_output
