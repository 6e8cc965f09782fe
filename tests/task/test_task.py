"""Boundary validation of Task, Recipe and data: bad input raises InputError naming the problem."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from iif.engine.functional import FunctionalModel
from iif.errors import InputError, UserCodeError
from iif.task.task import Data, Recipe, Task, mse_loss, soft_cross_entropy


def test_input_error_is_value_error():
    assert issubclass(InputError, ValueError)


# ---- data shapes and values --------------------------------------------------------------


def test_inputs_and_labels_count_mismatch(regression_task, regression_data):
    x, y = regression_data
    with pytest.raises(InputError, match="labels of shape"):
        regression_task.validate((x, y[:-1]))


def test_classification_count_mismatch(classification_task, classification_data):
    x, y = classification_data
    with pytest.raises(ValueError, match="inputs but labels"):
        classification_task.validate((x[:-2], y))


def test_regression_targets_wrong_output_dim(regression_task, regression_data):
    x, _ = regression_data
    y = torch.zeros(x.shape[0], 3, dtype=torch.float64)  # model outputs 2 values
    with pytest.raises(ValueError, match="outputs 2"):
        regression_task.validate((x, y))


def test_classification_labels_must_be_one_dimensional(classification_task, classification_data):
    x, y = classification_data
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        classification_task.validate((x, y[:, None]))
    one_hot = torch.nn.functional.one_hot(y, 3)
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        classification_task.validate((x, one_hot))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_inputs(regression_task, regression_data, dtype):
    x, y = regression_data
    with pytest.raises(ValueError, match="floating point"):
        regression_task.validate(((x * 3).to(dtype), y))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs(regression_task, regression_data, bad):
    x, y = regression_data
    x = x.clone()
    x[4, 1] = bad
    x[7, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf") as info:
        regression_task.validate((x, y))
    assert "2 samples" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_regression_targets(regression_task, regression_data, bad):
    x, y = regression_data
    y = y.clone()
    y[0, 0] = bad
    with pytest.raises(ValueError, match="targets contain NaN"):
        regression_task.validate((x, y))


@pytest.mark.parametrize("label", [-1, 3, 10])
def test_labels_out_of_range(classification_task, classification_data, label):
    x, y = classification_data
    y = y.clone()
    y[5] = label
    with pytest.raises(ValueError, match="out of range"):
        classification_task.validate((x, y))


def test_labels_out_of_range_for_declared_num_classes(mlp_factory, classification_data):
    x, y = classification_data
    task = Task(mlp_factory(out_dim=3), "classification", num_classes=3)
    with pytest.raises(ValueError, match="out of range"):
        task.validate((x, torch.full_like(y, 3)))


def test_num_classes_must_match_model_output(mlp_factory, classification_data):
    task = Task(mlp_factory(out_dim=3), "classification", num_classes=4)
    with pytest.raises(ValueError, match="num_classes"):
        task.validate(classification_data)


@pytest.mark.parametrize("bad", [0.5, 1.25, float("nan")])
def test_non_integer_float_labels(classification_task, classification_data, bad):
    x, y = classification_data
    y = y.to(torch.float64)
    y[2] = bad
    with pytest.raises(ValueError, match="integer class indices"):
        classification_task.validate((x, y))


def test_integer_valued_float_labels_are_accepted(classification_task, classification_data):
    x, y = classification_data
    d = classification_task.validate((x, y.to(torch.float32)))
    assert d.labels.dtype == torch.int64
    assert torch.equal(d.labels, y)


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_empty_data(mlp_factory, kind):
    task = Task(mlp_factory(out_dim=3), kind)
    x = torch.zeros(0, 3, dtype=torch.float64)
    y = torch.zeros(0, dtype=torch.int64) if kind == "classification" else torch.zeros(0, 3)
    with pytest.raises(ValueError, match="empty"):
        task.validate((x, y))


def test_scalar_inputs_are_rejected(regression_task):
    with pytest.raises(ValueError, match="empty"):
        regression_task.validate((torch.tensor(1.0), torch.tensor([1.0])))


def test_error_names_the_dataset(regression_task, regression_data):
    x, y = regression_data
    with pytest.raises(ValueError, match="test data"):
        regression_task.validate((x, y[:3]), name="test data")


@pytest.mark.parametrize(
    "data",
    [
        "not data",
        (torch.zeros(3, 3),),
        (torch.zeros(3, 3), torch.zeros(3), torch.zeros(3)),
        torch.utils.data.TensorDataset(torch.zeros(3, 3)),
    ],
)
def test_data_must_be_a_pair(regression_task, data):
    with pytest.raises(ValueError, match="pair|exactly"):
        regression_task.validate(data)


@pytest.mark.parametrize("which", ["inputs", "labels"])
def test_string_arrays_are_rejected(classification_task, classification_data, which):
    x, y = classification_data
    x, y = x.numpy(), y.numpy()
    if which == "inputs":
        x = x.astype(str)
    else:
        y = np.array(["cat", "dog", "eel"])[y]
    with pytest.raises(ValueError, match="numeric"):
        classification_task.validate((x, y))


def test_object_arrays_are_rejected(regression_task):
    x = np.array([[1.0, 2.0, 3.0], [1.0, None, 2.0]], dtype=object)
    with pytest.raises(ValueError, match="numeric"):
        regression_task.validate((x, np.zeros((2, 2))))


# ---- the model ---------------------------------------------------------------------------


def test_model_without_trainable_parameters(mlp_factory):
    model = mlp_factory()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Task(model, "regression")


def test_model_must_be_a_module():
    with pytest.raises(ValueError, match="nn.Module"):
        Task(lambda x: x, "regression")  # type: ignore[arg-type]


class _Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.lin(x).detach()


class _Argmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4).double()

    def forward(self, x):
        return self.lin(x).argmax(dim=-1, keepdim=True)


class _NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        with torch.no_grad():
            return self.lin(x)


@pytest.mark.parametrize("model_cls", [_Detached, _Argmax, _NoGrad])
def test_non_differentiable_model(model_cls, regression_data):
    x, _ = regression_data
    task = Task(model_cls(), "regression")
    with pytest.raises(ValueError, match="differentiabl"):
        task.validate((x, torch.zeros(x.shape[0], 1)))


def test_non_differentiable_classifier(classification_data):
    task = Task(_Argmax(), "classification")
    with pytest.raises(ValueError, match="differentiabl"):
        task.validate(classification_data)


def test_model_cannot_run_on_input_shape(regression_task):
    x = torch.randn(5, 7, dtype=torch.float64)  # the model expects 3 features
    with pytest.raises(ValueError, match="cannot run") as info:
        regression_task.validate((x, torch.zeros(5, 2)))
    assert "(7,)" in str(info.value)


class _Returns(nn.Module):
    """A Linear whose forward returns its output wrapped as ``wrap`` says."""

    def __init__(self, wrap):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(self.lin(x))


@pytest.mark.parametrize("wrap", [
    lambda out: (out, out * 2),  # a tuple: its first element
    lambda out: [out],
    lambda out: {"logits": out, "hidden": out * 2},  # a dictionary's logits
], ids=["tuple", "list", "dict"])
def test_tuple_and_dict_outputs_are_read_as_their_logits(regression_data, wrap):
    model = _Returns(wrap)
    task = Task(model, "regression")
    task.validate(regression_data)
    fmodel = FunctionalModel(model, task.output)
    x = torch.as_tensor(regression_data[0])
    torch.testing.assert_close(fmodel.outputs(fmodel.state(), x), model.lin(x).detach())


def test_a_model_output_is_read_as_its_logits(regression_data):
    from transformers.modeling_outputs import SequenceClassifierOutput

    model = _Returns(lambda out: SequenceClassifierOutput(logits=out))
    Task(model, "regression").validate(regression_data)


@pytest.mark.parametrize(("wrap", "said"), [
    (lambda out: {"scores": out}, "the model returned a dict (keys: scores) with no tensor "
                                  "'logits'; give Task(..., output=lambda out: out[KEY])"),
    (lambda out: "text", "the model returned a str; iif reads a tensor, a ModelOutput's "
                         "logits, a dictionary's 'logits' or a tuple's first element: give "
                         "Task(..., output=fn)"),
    (lambda out: (None, out), "the model returned a tuple of 2 (first: NoneType)"),
], ids=["dict", "str", "tuple"])
def test_an_output_iif_cannot_read_is_named_with_the_remedy(regression_data, wrap, said):
    with pytest.raises(InputError, match=re.escape(said)):
        Task(_Returns(wrap), "regression").validate(regression_data)


def test_an_output_function_reads_any_output(regression_data):
    model = _Returns(lambda out: {"scores": out})
    task = Task(model, "regression", output=lambda out: out["scores"])
    task.validate(regression_data)
    x = torch.as_tensor(regression_data[0])
    fmodel = FunctionalModel(model, task.output)
    torch.testing.assert_close(fmodel.outputs(fmodel.state(), x), model.lin(x).detach())
    with pytest.raises(InputError, match="output must be a function"):
        Task(model, "regression", output="scores")
    broken = Task(model, "regression", output=lambda out: out["missing"])
    with pytest.raises(UserCodeError, match=r"calling the task's output function .* KeyError"):
        broken.validate(regression_data)


def test_validation_restores_training_flag(mlp_factory, regression_data):
    model = mlp_factory(batchnorm=True).train()
    task = Task(model, "regression")
    task.validate(regression_data)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("kind", ["regresion", "Classification", "", None])
def test_invalid_kind(mlp_factory, kind):
    with pytest.raises(ValueError, match="kind"):
        Task(mlp_factory(), kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_classes", [1, 0])
def test_invalid_num_classes(mlp_factory, num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        Task(mlp_factory(), "classification", num_classes=num_classes)


def test_num_classes_for_regression_is_rejected(mlp_factory):
    with pytest.raises(ValueError, match="num_classes"):
        Task(mlp_factory(), "regression", num_classes=3)


# ---- the recipe --------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf")])
def test_recipe_bad_lr(lr):
    with pytest.raises(ValueError, match="lr"):
        Recipe(lr=lr)


@pytest.mark.parametrize("lr", [None, "0.1"])
def test_recipe_non_numeric_lr(lr):
    with pytest.raises(ValueError, match="lr"):
        Recipe(lr=lr)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["SGD", "rmsprop", ""])
def test_recipe_bad_optimizer(name):
    with pytest.raises(ValueError, match="optimizer"):
        Recipe(optimizer=name)


def test_recipe_bad_batch_size_and_epochs():
    with pytest.raises(ValueError, match="batch_size"):
        Recipe(batch_size=0)
    with pytest.raises(ValueError, match="epochs"):
        Recipe(epochs=-1)


def test_recipe_changed_on_a_task_is_checked(regression_task):
    with pytest.raises(InputError) as made:
        Recipe(lr=0.0)
    with pytest.raises(InputError) as assigned:
        regression_task.recipe.lr = 0.0
    assert str(assigned.value) == str(made.value) == \
        "recipe lr must be a finite number > 0, got 0.0"
    assert regression_task.recipe.lr == 0.05  # the refused value is not kept
    with pytest.raises(InputError, match=r"^recipe batch_size must be an integer >= 1, got 0$"):
        regression_task.recipe.batch_size = 0


def test_a_task_recipe_must_be_a_recipe(mlp_factory):
    with pytest.raises(InputError, match=r"^recipe must be a Recipe, got dict"):
        Task(mlp_factory(), "regression", {"lr": 0.1})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "cls"),
    [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)],
)
def test_recipe_makes_named_optimizer(name, cls):
    recipe = Recipe(lr=0.3, optimizer=name, weight_decay=0.01)
    opt = recipe.make_optimizer([torch.zeros(2, requires_grad=True)])
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 0.3
    assert opt.param_groups[0]["weight_decay"] == 0.01
    assert recipe.make_optimizer([torch.zeros(2, requires_grad=True)], lr=0.7).param_groups[0][
        "lr"
    ] == 0.7


def test_recipe_callable_optimizer_gets_recipe_lr():
    def rms(tensors):
        return torch.optim.RMSprop(tensors, lr=123.0)

    recipe = Recipe(lr=0.02, optimizer=rms)
    opt = recipe.make_optimizer([torch.zeros(2, requires_grad=True)])
    assert isinstance(opt, torch.optim.RMSprop)
    assert opt.param_groups[0]["lr"] == 0.02
    assert recipe.to_dict()["optimizer"] == "rms"


# ---- happy paths -------------------------------------------------------------------------


def test_labels_become_one_hot_targets(classification_task, classification_data):
    x, y = classification_data
    d = classification_task.validate((x, y))
    assert isinstance(d, Data)
    assert d.targets.shape == (x.shape[0], 3)
    assert d.targets.dtype == torch.float64
    expected = torch.zeros(x.shape[0], 3, dtype=torch.float64)
    expected[torch.arange(x.shape[0]), y] = 1.0
    assert torch.equal(d.targets, expected)
    assert torch.equal(d.labels, y)
    assert classification_task.num_classes == 3


def test_num_classes_inferred_even_when_labels_miss_a_class(classification_task):
    x = torch.randn(4, 3, dtype=torch.float64)
    d = classification_task.validate((x, torch.tensor([0, 1, 1, 0])))
    assert d.targets.shape == (4, 3)


@pytest.mark.parametrize("form", ["tensors", "list", "numpy", "numpy32", "dataset"])
def test_accepted_input_forms(classification_task, classification_data, form):
    x, y = classification_data
    if form == "tensors":
        data = (x, y)
    elif form == "list":
        data = [x, y]
    elif form == "numpy":
        data = (x.numpy(), y.numpy())
    elif form == "numpy32":
        data = (x.numpy().astype(np.float32), y.numpy().astype(np.int32))
    else:
        data = torch.utils.data.TensorDataset(x, y)
    d = classification_task.validate(data)
    assert d.x.dtype == torch.float64  # the model's dtype
    tol = 1e-6 if form == "numpy32" else 0.0
    assert torch.allclose(d.x, x, atol=tol, rtol=0)
    assert torch.equal(d.labels, y)
    assert d.targets.sum().item() == x.shape[0]
    # validated data can be validated again
    again = classification_task.validate(d)
    assert torch.equal(again.targets, d.targets)


def test_regression_vector_targets_become_columns(mlp_factory):
    task = Task(mlp_factory(out_dim=1), "regression")
    x = np.random.default_rng(0).normal(size=(6, 3))
    y = np.arange(6)  # integers are fine for regression
    d = task.validate((x, y))
    assert d.targets.shape == (6, 1)
    assert d.targets.dtype == torch.float64
    assert torch.equal(d.targets[:, 0], torch.arange(6, dtype=torch.float64))
    assert torch.equal(d.labels, d.targets)


def test_validated_data_subset(regression_task, regression_data):
    x, y = regression_data
    d = regression_task.validate((x, y))
    assert not d.x.requires_grad
    assert len(d) == x.shape[0]
    sub = d.subset([0, 2])
    assert torch.equal(sub.x, x[[0, 2]])
    assert torch.equal(sub.targets, y[[0, 2]])


def test_losses_match_definitions():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    rho = torch.rand(5, 4, generator=gen, dtype=torch.float64)
    assert torch.allclose(mse_loss(f, rho), ((f - rho) ** 2).sum(1) / 4)
    logp = f - torch.logsumexp(f, dim=1, keepdim=True)
    assert torch.allclose(soft_cross_entropy(f, rho), -(rho * logp).sum(1))
    labels = torch.tensor([0, 3, 1, 2, 2])
    one_hot = torch.nn.functional.one_hot(labels, 4).double()
    assert torch.allclose(
        soft_cross_entropy(f, one_hot),
        torch.nn.functional.cross_entropy(f, labels, reduction="none"),
    )


def test_custom_loss_is_used(mlp_factory):
    def quartic(out, target):
        return ((out - target) ** 4).mean(-1)

    task = Task(mlp_factory(), "regression", loss=quartic, linear_in_target=False)
    f = torch.ones(2, 2, dtype=torch.float64)
    t = torch.zeros(2, 2, dtype=torch.float64)
    f[0, 0] = 2.0
    assert torch.allclose(task.sample_loss(f, t), torch.tensor([8.5, 1.0], dtype=torch.float64))
    assert task.to_dict()["custom_loss"] is True


def test_data_subset_takes_indices_masks_and_slices():
    from iif.task.task import Data

    d = Data(torch.arange(4.0)[:, None], torch.arange(4), torch.eye(4))
    assert d.subset([2, 0]).labels.tolist() == [2, 0]
    assert d.subset(np.array([True, False, True, False])).labels.tolist() == [0, 2]
    assert d.subset(torch.tensor([False, True, False, True])).labels.tolist() == [1, 3]
    assert d.subset(slice(1, 3)).labels.tolist() == [1, 2]
    with pytest.raises(ValueError, match="mask"):
        d.subset(np.array([True, False]))


def test_test_inputs_of_another_sample_shape_are_named():
    import iif

    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).double()
    task = iif.Task(model, "classification", iif.Recipe())
    x = torch.rand(20, 64, dtype=torch.float64)
    method = iif.InfluenceFunction(task, (x, torch.arange(20) % 10))
    with pytest.raises(iif.InputError) as info:
        method.attribute((torch.rand(3, 8, 8, dtype=torch.float64), torch.arange(3)))
    assert str(info.value) == ("test data inputs have the per-sample shape (8, 8), the "
                               "training inputs (64,)")


def test_integer_regression_targets_are_questioned(caplog):
    import iif

    task = iif.Task(nn.Linear(4, 1).double(), "regression", iif.Recipe())
    x = torch.rand(12, 4, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="iif"):
        data = task.validate((x, torch.arange(12) % 3), "training data")
    assert data.targets.shape == (12, 1)  # accepted: integer values are valid targets
    assert "regression targets of the training data are integers (3 distinct values)" in \
        caplog.text and "classification" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="iif"):
        task.validate((x, torch.rand(12, 1, dtype=torch.float64)), "training data")
    assert caplog.text == ""


def _loss_that_fails(output, target):
    return output[:, 7].sum(dim=0)  # index 7 of 3 outputs


def test_a_custom_loss_that_raises_is_reported_as_the_users_code(classification_task):
    task = Task(classification_task.model, "classification", loss=_loss_that_fails)
    x = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(UserCodeError) as info:
        task.sample_loss(task.model(x), torch.zeros(4, 3, dtype=torch.float64))
    text = str(info.value)
    assert text.startswith("calling the task's loss function (_loss_that_fails) failed: "
                           "IndexError")
    assert "test_task.py" in text and "bug in iif" not in text
