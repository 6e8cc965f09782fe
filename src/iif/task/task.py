"""What the user supplies: a model, the kind of target, and the training recipe.

Per-sample losses are written with *continuous* targets so that a target can move along a
path from a baseline to the real label:

- regression: ``l(f, rho) = mean_j (f_j - rho_j)**2`` (``nn.MSELoss`` per sample);
- classification: ``l(f, rho) = -sum_c rho_c * log_softmax(f)_c`` (cross-entropy on soft
  targets; integer labels become one-hot vectors);
- sequence (a language model's next-token loss): the model outputs (n, T, V) logits, labels
  are (n, T) token ids with ``IGNORE`` (-100) at positions that carry no loss, and
  ``l(f, rho) = -sum_t sum_v rho_tv * log_softmax(f_t)_v``, summed over the positions; the
  targets are the one-hot rows flattened to (n, T * V), zero at ignored positions.

For all three, the path from a baseline model theta' to the real targets mixes the two losses,
``rho_k l(theta; z_i) + (1 - rho_k) lbar(theta; z_i)`` with ``lbar`` the cross-entropy (or
squared error) to theta''s predictions, which is the loss at the mixed target
``rho_k y_i + (1 - rho_k) ybar_i``: for sequences a per-token distillation to theta'
(docs/tasks.md derives it).

Both have a parameter gradient that is linear in the target, which lets the engine compute
target-Jacobian products ``J_i dy`` as exact gradient differences. A custom ``loss`` may be
given; declare ``linear_in_target=False`` if its gradient is not linear in the target and the
engine falls back to autograd for the mixed derivative.

Data validation happens here, at the boundary: every public entry point calls
:meth:`Task.validate` and gets tensors on the task's device, or an :class:`InputError` that
names the problem.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from iif.errors import InputError, UserCodeError
from iif.task.data import Data, StreamedInputs, as_pair, bound_dtype, several_inputs, to_tensor
from iif.task.inputs import Inputs, call_model, check_keywords
from iif.task.measurements import check_measurement
from iif.task.outputs import OutputFn, model_output
from iif.validation import Settings, setting

Kind = Literal["regression", "classification", "sequence"]
KINDS = ("regression", "classification", "sequence")
IGNORE = -100  # a sequence label that carries no loss (torch's ignore_index)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

log = logging.getLogger(__name__)


@dataclass
class Recipe(Settings):
    """How the model is trained; reused for unlearning and path epochs.

    ``optimizer`` is ``"sgd"``, ``"adam"``, ``"adamw"`` or a callable taking a list of
    tensors and returning a ``torch.optim.Optimizer``. The training loss is the *mean* of
    per-sample losses over a minibatch.
    """

    section = "recipe"

    lr: float = setting(0.01, gt=0, doc="learning rate")
    epochs: int = setting(10, ge=0, doc="training epochs")
    batch_size: int = setting(64, ge=1, doc="minibatch size")
    optimizer: Literal["sgd", "adam", "adamw"] | Callable[
        [list[torch.Tensor]], torch.optim.Optimizer] = setting(
        "sgd", doc="'sgd', 'adam', 'adamw' or a callable making the optimizer from a list of "
        "tensors")
    # torch's optimizers refuse negative values
    momentum: float = setting(0.0, ge=0, doc="momentum of 'sgd'")
    weight_decay: float = setting(0.0, ge=0, doc="weight decay of the built-in optimizers")

    def make_optimizer(
        self, tensors: list[torch.Tensor], lr: float | None = None
    ) -> torch.optim.Optimizer:
        lr = self.lr if lr is None else lr
        if callable(self.optimizer):
            opt = self.optimizer(tensors)
            for group in opt.param_groups:
                group["lr"] = lr
            return opt
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                tensors, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        if self.optimizer == "adam":
            return torch.optim.Adam(tensors, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(tensors, lr=lr, weight_decay=self.weight_decay)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if callable(self.optimizer):
            d["optimizer"] = getattr(self.optimizer, "__name__", "custom")
        return d


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, shape (n,) for (n, d) inputs."""
    return (output - target).pow(2).mean(dim=-1)


def soft_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy with soft (possibly unnormalised) targets, shape (n,)."""
    return -(target * torch.log_softmax(output, dim=-1)).sum(dim=-1)


def sequence_cross_entropy(output: torch.Tensor, target: torch.Tensor,
                           vocab: int) -> torch.Tensor:
    """Per-sample next-token cross-entropy summed over positions, (n,), for logits
    (n, T, V) or flattened (n, T * V) and soft targets (n, T * V) (zero rows at positions
    without a loss)."""
    logp = torch.log_softmax(output.reshape(output.shape[0], -1, vocab), dim=-1)
    return -(target.reshape(logp.shape) * logp).sum(dim=(-2, -1))


def sequence_one_hot(labels: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, T) token ids with ``IGNORE`` -> (n, T * V) one-hot targets, zero where ignored."""
    keep = labels != IGNORE
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), vocab).to(dtype)
    return (onehot * keep[..., None].to(dtype)).reshape(labels.shape[0], -1)


@dataclass
class Task:
    """A model to attribute and how it was trained.

    Args:
        model: the trained ``nn.Module``; its output for a batch is (n, d), or (n, T, V)
            logits for ``"sequence"``.
        kind: ``"regression"`` (MSE), ``"classification"`` (cross-entropy, labels 0..C-1) or
            ``"sequence"`` (next-token cross-entropy summed over positions, labels (n, T)
            token ids with ``IGNORE`` where no loss is taken).
        recipe: training recipe used for unlearning, path epochs and retraining.
        num_classes: classes (or the vocabulary size of a sequence task); inferred from the
            model output if None.
        loss: optional per-sample loss ``loss(output (n, ...), target (n, d)) -> (n,)``.
        linear_in_target: whether the loss gradient is linear in the target.
        device: where everything runs; defaults to the device of the model's parameters.
        measurement: what the scores explain on a test sample (an
            :class:`iif.task.measurements.Measurement`); None: the test loss.
        batch: for data given as a ``Dataset`` or ``DataLoader``, the function mapping one
            collated batch to ``(inputs, labels)``; None: ``(x, y)`` pairs or dictionaries
            with an input key and a label key (see :func:`iif.task.data.default_batch`).
        output: a function from what the model returns to its output tensor; None: a
            tensor, a Hugging Face ``ModelOutput``'s ``logits``, a dictionary's ``logits`` or
            a tuple's first element (:func:`iif.task.outputs.model_output`).
        label_key: the key of the labels in dictionary batches (the other array entries are
            the model's keyword inputs); None: the first of
            :data:`iif.task.data.LABEL_KEYS` present.
    """

    model: nn.Module
    kind: Kind
    recipe: Recipe = field(default_factory=Recipe)
    num_classes: int | None = None
    loss: LossFn | None = None
    linear_in_target: bool = True
    device: torch.device | str | None = None
    measurement: Any = None
    batch: Callable[[Any], tuple[Any, Any]] | None = None
    output: OutputFn | None = None
    label_key: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.kind not in KINDS:
            raise InputError(
                f"kind must be 'regression', 'classification' or 'sequence', got {self.kind!r}"
            )
        if not isinstance(self.recipe, Recipe):
            raise InputError(f"recipe must be a Recipe, got {type(self.recipe).__name__}: give "
                             f"Recipe(lr=..., epochs=..., batch_size=...)")
        if self.measurement is not None:
            self.measurement = check_measurement(self.measurement, self)
        if self.output is not None and not callable(self.output):
            raise InputError(f"output must be a function from what the model returns to its "
                             f"output tensor, got {type(self.output).__name__}")
        if self.label_key is not None and not isinstance(self.label_key, str):
            raise InputError(f"label_key must be the key of the labels in dictionary batches "
                             f"(a string), got {type(self.label_key).__name__}")
        if self.batch is not None and not callable(self.batch):
            raise InputError(f"batch must be a function of one collated batch returning "
                             f"(inputs, labels), got {type(self.batch).__name__}")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise InputError("the model has no trainable parameters (requires_grad=True)")
        if self.device is None:
            self.device = trainable[0].device
        self.device = torch.device(self.device)
        self.model.to(self.device)
        self.dtype = trainable[0].dtype
        if self.num_classes is not None and (
            self.kind == "regression" or int(self.num_classes) < 2
        ):
            raise InputError("num_classes applies to classification (or the vocabulary of a "
                             "sequence task) and must be >= 2")

    # ---- losses -------------------------------------------------------------------------
    def sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss l(f, rho), shape (n,), for outputs and targets of shape (n, d)."""
        if self.loss is not None:
            try:
                return self.loss(output, target)
            except InputError:
                raise
            except Exception as exc:  # the user's code: name it, never "a bug in iif"
                name = getattr(self.loss, "__qualname__", type(self.loss).__name__)
                raise UserCodeError(f"calling the task's loss function ({name})", exc) from exc
        if self.kind == "regression":
            return mse_loss(output, target)
        if self.kind == "sequence":
            return sequence_cross_entropy(output, target, self.num_classes)
        return soft_cross_entropy(output, target)

    def shaped(self, output: torch.Tensor) -> torch.Tensor:
        """Outputs as the model returns them: (n, T, V) for a sequence task (the engine
        holds them flattened to (n, T * V)), else unchanged."""
        if self.kind == "sequence":
            return output.reshape(output.shape[0], -1, self.num_classes)
        return output

    def measure(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What the scores explain per test sample, (n,), oriented as a loss (lower is
        better): the test loss, or the task's ``measurement`` (negated when higher is
        better), so that a negative score always marks a proponent."""
        if self.measurement is None:
            return self.sample_loss(output, target)
        return self.measurement.loss(self.shaped(output), target)

    def prediction_targets(self, output: torch.Tensor,
                           like: torch.Tensor | None = None) -> torch.Tensor:
        """Targets a model predicts for itself: outputs (regression) or probabilities; for
        a sequence task (n, T * V) probabilities, zero at the positions where ``like`` (the
        real targets) carries no loss."""
        if self.kind == "classification":
            return torch.softmax(output, dim=-1)
        if self.kind == "sequence":
            p = torch.softmax(self.shaped(output), dim=-1)
            if like is not None:
                keep = like.reshape(p.shape).sum(-1, keepdim=True) > 0
                p = p * keep.to(p.dtype)
            return p.reshape(p.shape[0], -1)
        return output

    # ---- validation ---------------------------------------------------------------------
    def validate(self, data: Any, name: str = "data", like: Data | None = None,
                 stream: bool = True) -> Data:
        """Check ``(x, y)`` (tensors, arrays, a Dataset or DataLoader: see
        :mod:`iif.task.data`) and move it to the device; ``like``: data whose per-sample input
        shape ``data`` must have (the training data); ``stream``: large inputs may stay in
        their dataset (:class:`iif.task.data.StreamedInputs`), else they are read in."""
        x, y = as_pair(data, name, self.batch, self.label_key)
        if isinstance(x, StreamedInputs) and not stream:
            x = x[:]
        if not isinstance(x, StreamedInputs):
            x = to_tensor(x, f"{name} inputs")
        y = to_tensor(y, f"{name} labels")
        _check_sizes(x, y, name, like)
        check_keywords(self.model, x.empty if isinstance(x, StreamedInputs) else x, name)
        x, out_shape = self._device_inputs(x, name)
        out_dim = math.prod(out_shape)
        if self.kind == "classification":
            labels, targets = self._class_targets(y, name, out_dim)
        elif self.kind == "sequence":
            labels, targets = self._sequence_targets(y, name, out_shape)
            _check_shifted(x, labels, name)
        else:
            labels = targets = self._regression_targets(y, name, out_dim)
        return Data(x, labels, targets)

    def _device_inputs(self, x: torch.Tensor | Inputs | StreamedInputs, name: str
                       ) -> tuple[torch.Tensor | Inputs | StreamedInputs, tuple[int, ...]]:
        """Inputs ``x`` checked (finite floating point, or integers) and on the device, with
        the shape of the model's output for one of them."""
        if several_inputs(x):
            x = self._device_several(x, name)
            return x, self._output_shape(x[:1], name)
        # integer inputs are token ids (an nn.Embedding) or codes the model converts itself:
        # they stay integers (int64, what embeddings take) when the model runs on them
        integer = not (x.is_floating_point() or x.dtype.is_complex or x.dtype == torch.bool)
        if not (x.is_floating_point() or integer):
            raise InputError(f"{name} inputs must be floating point (or integer token ids for "
                             f"a model that takes them), got {x.dtype}")
        if isinstance(x, StreamedInputs):  # checked batch by batch as they were read
            x = x.bound(self.device, self.dtype)
        else:
            if not integer and not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
                raise InputError(f"{name} inputs contain NaN or inf ({bad} samples)")
            x = x.to(self.device, torch.int64 if integer else self.dtype)
        try:
            out_shape = self._output_shape(x[:1], name)
        except InputError as exc:
            if not integer or exc.__cause__ is None:  # only the model's own exception
                raise
            raise InputError(f"{name} inputs are integers ({x.dtype}) and the model cannot run "
                             f"on them; inputs must be floating point, or integer token ids "
                             f"for a model that takes them ({exc})") from exc
        return x, out_shape

    def _device_several(self, x: Inputs | StreamedInputs, name: str
                        ) -> Inputs | StreamedInputs:
        """Each of several inputs checked and on the device: floating point (finite) as the
        model's dtype, integers (token ids, masks) as int64, booleans (masks) as they are
        (:func:`iif.task.data.bound_dtype`). Streamed ones were checked finite batch by batch
        as they were read, and are read onto the device."""
        streamed = isinstance(x, StreamedInputs)
        for key, t in (x.empty if streamed else x).named():
            what = f"{name} input {key!r}"
            if t.dtype.is_complex:
                raise InputError(f"{what} is complex ({t.dtype}); inputs must be real numbers")
            if not streamed and t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).sum())
                raise InputError(f"{what} contains NaN or inf ({bad} samples)")
        if streamed:
            return x.bound(self.device, self.dtype)
        return x.map(lambda t: t.to(self.device, bound_dtype(t.dtype, self.dtype)))

    def _class_targets(self, y: torch.Tensor, name: str,
                       out_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Class labels ``y`` checked against the model's ``out_dim`` outputs (which fix
        ``num_classes`` if unset): the labels on the device and their one-hot targets."""
        if y.is_floating_point():
            if not torch.isfinite(y).all() or not torch.equal(y, y.round()):
                raise InputError(
                    f"{name} labels must be integer class indices for classification"
                )
        if y.ndim != 1:
            raise InputError(
                f"{name} labels must have shape (n,) for classification, got {tuple(y.shape)}"
            )
        labels = y.long().to(self.device)
        n_cls = self.num_classes or out_dim
        if n_cls != out_dim:
            raise InputError(f"num_classes={n_cls} but the model outputs {out_dim} values")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_cls:
            raise InputError(
                f"{name} labels out of range: found [{lo}, {hi}], expected 0..{n_cls - 1}"
            )
        self.num_classes = n_cls
        return labels, torch.nn.functional.one_hot(labels, n_cls).to(self.dtype)

    def _regression_targets(self, y: torch.Tensor, name: str, out_dim: int) -> torch.Tensor:
        """Regression targets ``y`` as finite ``(n, out_dim)`` values on the device."""
        if not y.is_floating_point():
            if y.dim() == 1 and name == "training data" and y.numel() > 1:
                # told once per method (the training data are checked at construction)
                log.warning("the regression targets of the %s are integers (%d distinct "
                            "values); if they are class labels, use Task(model, "
                            "\"classification\")", name, int(torch.unique(y).numel()))
            y = y.to(self.dtype)
        if not torch.isfinite(y).all():
            raise InputError(f"{name} regression targets contain NaN or inf")
        labels = y.reshape(y.shape[0], -1).to(self.device, self.dtype)
        if labels.shape[1] != out_dim:
            raise InputError(
                f"{name} targets have {labels.shape[1]} values per sample but the model "
                f"outputs {out_dim}"
            )
        return labels

    def _sequence_targets(self, y: torch.Tensor, name: str,
                          out_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token labels ``y`` (n, T) against logits of shape (T, V) per sample: the labels on
        the device and their (n, T * V) one-hot targets, zero at ``IGNORE`` positions."""
        if len(out_shape) != 2:
            raise InputError(f"a sequence task's model must return (batch, positions, vocab) "
                             f"logits, got (batch, {', '.join(map(str, out_shape))})")
        positions, vocab = out_shape
        if y.is_floating_point() or y.ndim != 2 or y.shape[1] != positions:
            raise InputError(f"{name} labels must be integer token ids of shape (n, "
                             f"{positions}) (with {IGNORE} where no loss is taken), got "
                             f"{y.dtype} {tuple(y.shape)}")
        labels = y.long().to(self.device)
        used = labels[labels != IGNORE]
        if used.numel() == 0:
            raise InputError(f"{name} labels are all {IGNORE}: no position carries a loss")
        lo, hi = int(used.min()), int(used.max())
        if lo < 0 or hi >= vocab:
            raise InputError(f"{name} token labels out of range: found [{lo}, {hi}], expected "
                             f"0..{vocab - 1} or {IGNORE}")
        if (labels != IGNORE).sum(1).eq(0).any():
            raise InputError(f"{name}: some samples have no position with a loss (all "
                             f"labels {IGNORE})")
        n_voc = self.num_classes or vocab
        if n_voc != vocab:
            raise InputError(f"num_classes={n_voc} but the model outputs {vocab} logits")
        self.num_classes = vocab
        return labels, sequence_one_hot(labels, vocab, self.dtype)

    def _output_shape(self, x1: torch.Tensor | Inputs, name: str) -> tuple[int, ...]:
        # every submodule's own flag comes back (a train-mode model may hold an eval-mode
        # part, e.g. a frozen BatchNorm), not the top module's flag copied to all of them
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.enable_grad():
                returned = call_model(self.model, x1)
        except Exception as exc:  # the model rejects the input: say so at the boundary
            shape = x1.describe() if isinstance(x1, Inputs) else \
                f"of shape {tuple(x1.shape[1:])}"
            raise InputError(f"the model cannot run on {name} inputs {shape}: {exc}") from exc
        finally:
            for m, flag in flags:
                m.training = flag
        out = model_output(returned, self.output)
        if out.ndim == 0 or out.shape[0] != 1:
            raise InputError(f"the model's output has shape {tuple(out.shape)} for one sample; "
                             f"it must be (batch, outputs)"
                             + (" or (batch, positions, vocab)" if self.kind == "sequence"
                                else ""))
        if not out.requires_grad:
            raise InputError(
                "the model output does not depend differentiably on its parameters "
                "(detached tensors, no_grad or integer ops inside forward)"
            )
        return tuple(out.shape[1:])

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": type(self.model).__name__,
            "num_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "num_classes": self.num_classes,
            "recipe": self.recipe.to_dict(),
            "custom_loss": self.loss is not None,
            "measurement": "test loss" if self.measurement is None else self.measurement.name,
            "linear_in_target": self.linear_in_target,
            "device": str(self.device),
            "dtype": str(self.dtype),
        }


def _check_shifted(x: Any, y: torch.Tensor, name: str) -> None:
    """Refuse token labels equal to the input ids: the Hugging Face convention
    (``labels=input_ids``, shifted inside the model), where iif reads next-token labels.
    Streamed inputs are compared batch by batch as they are read, up to the first batch
    whose ids differ from its labels."""
    parts = x.chunks() if isinstance(x, StreamedInputs) else [x]
    lo, compared = 0, False
    for part in parts:
        ids = part.kwargs.get("input_ids") if isinstance(part, Inputs) else part
        if not (isinstance(ids, torch.Tensor) and not ids.is_floating_point()
                and ids.shape[1:] == y.shape[1:] and ids.shape[-1] > 1):
            return
        labels, lo = y[lo : lo + len(ids)], lo + len(ids)
        keep = labels != IGNORE
        if bool(keep.any()):
            if not bool((ids.to(y.device)[keep] == labels[keep]).all()):
                return
            compared = True
    if compared and lo == len(y):
        raise InputError(f"{name}: the labels equal the input ids (Hugging Face's "
                         f"labels=input_ids, shifted inside the model); a sequence task "
                         f"reads next-token labels: give iif.causal_lm_labels(input_ids, "
                         f"attention_mask)")


def _check_sizes(x: torch.Tensor | Inputs | StreamedInputs, y: torch.Tensor, name: str,
                 like: Data | None) -> None:
    """Refuse empty inputs, per-sample inputs other than ``like``'s (shapes, and the keys of
    several inputs), and labels not one per input."""
    if x.ndim == 0 or x.shape[0] == 0:
        raise InputError(f"{name} is empty: inputs have shape {tuple(x.shape)}")
    if like is not None and (several_inputs(x) or several_inputs(like.x)):
        mine, theirs = _layout(x), _layout(like.x)
        if mine != theirs:
            raise InputError(f"{name} inputs are {mine}, the training inputs {theirs}: give "
                             f"every sample the same inputs of the same shapes")
    elif like is not None and tuple(x.shape[1:]) != tuple(like.x.shape[1:]):
        raise InputError(f"{name} inputs have the per-sample shape {tuple(x.shape[1:])}, "
                         f"the training inputs {tuple(like.x.shape[1:])}")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        hint = ""
        if isinstance(x, Inputs) and y.ndim > 0 and len(x.args) == y.shape[0]:
            # a list of per-sample tensors reads as that many positional inputs
            hint = (f" (a list of {y.shape[0]} tensors is read as {y.shape[0]} inputs of each "
                    f"sample; for one tensor per sample, give torch.stack(list))")
        raise InputError(
            f"{name}: {x.shape[0]} inputs but labels of shape {tuple(y.shape)}{hint}"
        )


def _layout(x: torch.Tensor | Inputs | StreamedInputs) -> str:
    """The inputs of one sample, for comparing two data sets: their keys and shapes."""
    if several_inputs(x):
        return ", ".join(f"{k if isinstance(k, str) else f'input {k}'} {shape}"
                         for k, shape in x.sample_shapes().items())
    return f"one input of shape {tuple(x.shape[1:])}"
