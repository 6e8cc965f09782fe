"""The run key sees state that changes the scores but is neither a weight, a buffer, the module
tree nor source code (iif.results.runkey: ``model behaviour`` and ``custom functions``): plain
tensor and list attributes, globals a forward reads, closure values of a measurement, a loss or
an optimizer. Each was once changed between a killed run and its resume, and the resume mixed
the rows of two models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import iif
from iif import FunctionMeasurement, InfluenceFunction, IntegratedInfluence, PathSettings, Task
from iif.errors import InputError
from iif.results.runkey import callable_digest, method_key, run_key
from iif.results.store import attribute_to

SHIFT = 0.0  # a module-level global that Hidden.forward reads


class Hidden(nn.Module):
    """An MLP whose forward reads a plain tensor attribute, a list attribute and a global."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lin1, self.lin2 = nn.Linear(3, 5).double(), nn.Linear(5, 3).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        self.scale = torch.tensor(2.0, dtype=torch.float64)  # not a parameter nor a buffer
        self.offsets = [0.0, 0.0, 0.0]

    def forward(self, x):
        out = self.lin2(torch.tanh(self.lin1(x))) * self.scale
        return out + torch.tensor(self.offsets, dtype=x.dtype) + SHIFT


def _data(n: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _keys(task, method=InfluenceFunction):
    m = method(task, _data(), progress=False)
    test = task.validate(_data(4, seed=1), "test data")
    return run_key(m, test), method_key(m)


def _changed(task, change, method=InfluenceFunction) -> tuple[list[str], list[str]]:
    """The parts of run_key and method_key that ``change()`` changes."""
    before = _keys(task, method)
    change()
    after = _keys(task, method)
    return [a.differences(b.parts) for a, b in zip(before, after, strict=True)]


def test_a_plain_tensor_attribute_is_in_the_key():
    model = Hidden()
    diffs = _changed(Task(model, "classification"), lambda: setattr(model, "scale",
                                                                    torch.tensor(3.0)))
    assert diffs == [["model behaviour"], ["model behaviour"]]


def test_a_list_attribute_is_in_the_key():
    model = Hidden()
    diffs = _changed(Task(model, "classification"),
                     lambda: model.offsets.__setitem__(1, 0.5))
    assert diffs == [["model behaviour"], ["model behaviour"]]


def test_a_global_read_by_forward_is_in_the_key(monkeypatch):
    diffs = _changed(Task(Hidden(), "classification"),
                     lambda: monkeypatch.setitem(globals(), "SHIFT", 0.25))
    assert diffs == [["model behaviour"], ["model behaviour"]]


def test_a_measurement_closure_value_is_in_the_key():
    which = [1]

    def logit(outputs, targets):
        return outputs[:, which[0]]

    task = Task(Hidden(), "classification",
                measurement=FunctionMeasurement(logit, "logit", higher_is_better=True))
    diffs = _changed(task, lambda: which.__setitem__(0, 2))
    assert diffs == [["custom functions"], ["custom functions"]]


def test_a_closure_value_counts_even_where_the_probe_agrees():
    """Outputs on the probe cannot tell: the captured value is digested itself."""
    threshold = [1e9]

    def clipped(outputs, targets):
        return outputs[:, 0].clamp(max=threshold[0])

    before = callable_digest(clipped)
    threshold[0] = 1e8  # no probe output comes near either bound
    assert callable_digest(clipped) != before


def test_a_custom_loss_closure_value_is_in_the_key():
    weight = {"w": 1.0}

    def loss(output, target):
        return weight["w"] * -(target * torch.log_softmax(output, -1)).sum(-1)

    task = Task(Hidden(), "classification", loss=loss)
    diffs = _changed(task, lambda: weight.__setitem__("w", 2.0))
    assert diffs == [["custom functions"], ["custom functions"]]


def test_an_optimizer_lambda_closure_value_is_in_the_key():
    momentum = 0.9

    def recipe():
        return iif.Recipe(lr=0.1, epochs=1, batch_size=4,
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum))

    task = Task(Hidden(), "classification", recipe())

    def change():
        nonlocal momentum
        momentum = 0.5

    diffs = _changed(task, change, lambda t, d, **kw: IntegratedInfluence(
        t, d, path=PathSettings(steps=2), **kw))
    assert diffs == [["custom functions"], ["custom functions"]]


def test_the_key_is_deterministic_and_probing_changes_nothing():
    model = Hidden()
    model.train()
    model.lin1.eval()  # a mixed mode must come back as it was
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    task = Task(model, "classification")
    keys = _keys(task)
    assert all("model behaviour" in k.parts for k in keys)  # the models were probed
    assert keys == _keys(task)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    rng = torch.get_rng_state()
    _keys(task)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe's seeding is forked


def test_batchnorm_running_statistics_are_not_updated_by_probing():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run, _ = _keys(Task(model, "classification"))
    assert "model behaviour" in run.parts
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and model[1].training


def test_the_probe_reads_only_its_streamed_rows(monkeypatch):
    from iif.task.data import Streamed, StreamedInputs

    x, y = _data(40)
    task = Task(Hidden(), "classification")
    method = InfluenceFunction(task, Streamed(torch.utils.data.TensorDataset(x, y)),
                               progress=False)
    reads: list[int] = []
    original = StreamedInputs._read
    monkeypatch.setattr(StreamedInputs, "_read",
                        lambda self, rows: reads.append(len(rows)) or original(self, rows))
    from iif.results.runkey import behaviour_digest

    streamed = behaviour_digest(method)
    assert reads == [8]
    assert streamed == behaviour_digest(InfluenceFunction(task, (x, y), progress=False))


def test_a_resume_with_a_changed_tensor_attribute_is_refused(tmp_path):
    model = Hidden()
    task = Task(model, "classification")
    x, y = _data()

    def method():
        return IntegratedInfluence(task, (x, y), path=PathSettings(steps=2), progress=False)

    first = attribute_to(tmp_path, method(), _data(4, seed=1), chunk=2)
    model.scale = torch.tensor(3.0, dtype=torch.float64)
    with pytest.raises(InputError, match="different model behaviour"):
        attribute_to(tmp_path, method(), _data(4, seed=1), chunk=2)
    model.scale = torch.tensor(2.0, dtype=torch.float64)  # the same run again: resumed
    again = attribute_to(tmp_path, method(), _data(4, seed=1), chunk=2)
    np.testing.assert_array_equal(again.scores, first.scores)


def test_a_folder_whose_key_lacks_new_parts_is_refused_with_the_reason(tmp_path):
    """A folder written before the key recorded behaviour and custom functions is refused as
    such, not as if the user had changed them."""
    task = Task(Hidden(), "classification")

    def method():
        return IntegratedInfluence(task, _data(), path=PathSettings(steps=2), progress=False)

    attribute_to(tmp_path, method(), _data(4, seed=1), chunk=2)
    manifest = tmp_path / "manifest.json"
    old = json.loads(manifest.read_text())
    for part in ("model behaviour", "custom functions"):
        del old["parts"][part]
    manifest.write_text(json.dumps(old))
    with pytest.raises(InputError) as err:
        attribute_to(tmp_path, method(), _data(4, seed=1), chunk=2)
    assert ("custom functions (not recorded: written by an earlier version of iif)"
            in str(err.value))
