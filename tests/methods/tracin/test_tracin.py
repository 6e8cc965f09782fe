"""TracIn against independent computations.

Reference scores are computed here from the definition, ``-sum_c lr_c g_test(theta_c)^T
g_i(theta_c)``, with one plain autograd call per sample on a copy of the model, never with the
engine. Sign convention: a score > 0 means including the training sample raises the test loss.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from iif.engine.projection import ProjectionSettings, make_projector
from iif.errors import InputError
from iif.methods.tracin.checkpoints import Checkpoint, load_checkpoints, train_with_checkpoints
from iif.methods.tracin.tracin import TracIn
from iif.task.task import Recipe, Task

from ..reference import removal_drops

N_TEST = 5


def build_mlp(out_dim: int, hidden: int = 4, seed: int = 0) -> nn.Module:
    """A float64 3 -> hidden -> out_dim tanh MLP with seeded initialisation."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, out_dim)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
    return model


# ---- independent reference ------------------------------------------------------------------
def reference_grads(model: nn.Module, state, kind: str, x, y) -> torch.Tensor:
    """Per-sample loss gradients (n, M) at a checkpoint state, one autograd call per sample."""
    model = copy.deepcopy(model)
    model.load_state_dict({**state.params, **state.buffers})
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])
        if kind == "regression":
            value = ((out - y[i : i + 1]) ** 2).mean()
        else:
            value = nn.functional.cross_entropy(out, y[i : i + 1])
        grads = torch.autograd.grad(value, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def reference_tracin(model, kind, checkpoints, train, test, matrix=None) -> np.ndarray:
    """``-sum_c lr_c (A^T g_test)^T (A^T g_i)``; ``matrix`` is A (M, P), or None for A = I."""
    total = 0.0
    for c in checkpoints:
        g_train = reference_grads(model, c.state, kind, *train)
        g_test = reference_grads(model, c.state, kind, *test)
        if matrix is not None:
            g_train, g_test = g_train @ matrix, g_test @ matrix
        total = total - c.lr * (g_test @ g_train.T)
    return total.numpy()


def max_rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---- problems -------------------------------------------------------------------------------
def make_problem(kind: str, momentum: float = 0.0, epochs: int = 4):
    """A tiny trained MLP with in-memory checkpoints after every epoch, and test data."""
    gen = torch.Generator().manual_seed(11 if kind == "regression" else 12)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    xt = torch.randn(N_TEST, 3, generator=gen, dtype=torch.float64)
    if kind == "regression":
        out_dim = 2
        y = torch.randn(12, 2, generator=gen, dtype=torch.float64)
        yt = torch.randn(N_TEST, 2, generator=gen, dtype=torch.float64)
    else:
        out_dim = 3
        y = torch.arange(12) % 3
        yt = torch.tensor([0, 2, 1, 1, 0])
    recipe = Recipe(lr=0.1, epochs=epochs, batch_size=4, momentum=momentum)
    task = Task(build_mlp(out_dim=out_dim, seed=5), kind, recipe)
    checkpoints = train_with_checkpoints(task, (x, y), seed=0)
    return task, (x, y), (xt, yt), checkpoints


# ---- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["regression", "classification"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_scores_equal_explicit_sum_over_checkpoints(kind, momentum):
    task, train, test, checkpoints = make_problem(kind, momentum)
    assert [c.epoch for c in checkpoints] == [1, 2, 3, 4]
    # distinct learning rates per checkpoint: the weighting must follow each one
    checkpoints = [dataclasses.replace(c, lr=lr)
                   for c, lr in zip(checkpoints, [0.1, 0.3, 0.05, 0.2], strict=True)]
    result = TracIn(task, train, checkpoints=checkpoints, chunk_size=5).attribute(test)
    want = reference_tracin(task.model, kind, checkpoints, train, test)
    assert result.scores.shape == (N_TEST, 12)
    assert result.method == "tracin"
    assert max_rel(result.scores, want) < 1e-10
    assert result.info["checkpoints"] == 4
    assert result.info["seconds"] >= 0


def test_scores_do_not_depend_on_chunk_size():
    task, train, test, checkpoints = make_problem("classification")
    a = TracIn(task, train, checkpoints=checkpoints, chunk_size=1).attribute(test).scores
    b = TracIn(task, train, checkpoints=checkpoints, chunk_size=100).attribute(test).scores
    assert max_rel(a, b) < 1e-12


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_projected_scores_equal_explicit_projection(kind):
    task, train, test, checkpoints = make_problem(kind)
    settings = ProjectionSettings(dim=7, seed=3)
    result = TracIn(task, train, checkpoints=checkpoints, projection=settings).attribute(test)
    m = sum(p.numel() for p in task.model.parameters())
    projector = make_projector(m, settings, "cpu", torch.float64)
    matrix = projector.project(torch.eye(m, dtype=torch.float64))  # A, (M, P)
    assert matrix.shape == (m, 7)
    want = reference_tracin(task.model, kind, checkpoints, train, test, matrix)
    assert max_rel(result.scores, want) < 1e-10
    exact = reference_tracin(task.model, kind, checkpoints, train, test)
    assert max_rel(result.scores, exact) > 1e-3  # the projection did change the scores


def test_projections_narrower_than_the_model_lose_and_wider_ones_are_exact():
    task, train, test, checkpoints = make_problem("regression")
    exact = TracIn(task, train, checkpoints=checkpoints).attribute(test).scores
    errors = []
    for dim in (2, 20):  # of the model's 26 parameters: below it, a projection loses
        errors.append(np.mean([
            np.linalg.norm(TracIn(task, train, checkpoints=checkpoints,
                                  projection=ProjectionSettings(dim=dim, seed=seed)
                                  ).attribute(test).scores - exact) / np.linalg.norm(exact)
            for seed in range(8)
        ]))
    assert errors[1] < errors[0] and errors[1] > 0.1, errors
    for dim in (26, 1024):  # as wide as the model: the exact gradients (make_projector)
        wide = TracIn(task, train, checkpoints=checkpoints,
                      projection=ProjectionSettings(dim=dim)).attribute(test)
        np.testing.assert_array_equal(wide.scores, exact)
        assert wide.settings["projection_dim"] == 26


# ---- self-influence -------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [None, 9])
def test_self_influence_is_diagonal_of_train_attribution(dim):
    task, train, _, checkpoints = make_problem("classification")
    method = TracIn(task, train, checkpoints=checkpoints, projection=ProjectionSettings(dim=dim),
                    chunk_size=5)
    diagonal = np.diag(method.attribute(train).scores)
    own = method.self_influence()
    assert own.shape == (12,)
    assert np.all(own < 0)
    assert max_rel(own, diagonal) < 1e-12
    idx = [7, 0, 3]
    assert max_rel(method.self_influence(idx), diagonal[idx]) < 1e-12


# ---- orientation ----------------------------------------------------------------------------
def test_removing_top_positive_samples_lowers_test_loss():
    rng = np.random.default_rng(0)
    w = np.array([1.0, -2.0, 0.5, 0.3])

    def draw(n):
        x = np.hstack([rng.normal(size=(n, 3)), np.ones((n, 1))])
        return x, x @ w + 0.5 * rng.standard_t(3, size=n)

    (x, y), (xt, yt) = draw(60), draw(8)  # noisy test labels: no test loss is near zero
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    task = Task(model, "regression", Recipe(lr=0.05, epochs=300, batch_size=20))
    checkpoints = train_with_checkpoints(task, (x, y[:, None]), every=30, seed=0)
    assert len(checkpoints) == 10
    result = TracIn(task, (x, y[:, None]), checkpoints=checkpoints).attribute((xt, yt[:, None]))

    top, rand, bottom = removal_drops(x, y, xt, yt, result.scores, rng)
    # removing opponents (positive scores) lowers the test loss, removing proponents raises it
    assert top.mean() < min(0.0, rand.mean()) and bottom.mean() > max(0.0, rand.mean())
    assert np.mean(top < rand) > 0.5 and np.mean(rand < bottom) > 0.5


# ---- bad inputs -----------------------------------------------------------------------------
def test_missing_or_empty_checkpoints_are_rejected():
    task, train, _, _ = make_problem("regression", epochs=1)
    with pytest.raises(InputError, match="needs checkpoints"):
        TracIn(task, train)
    with pytest.raises(InputError, match="checkpoints is empty"):
        TracIn(task, train, checkpoints=[])
    with pytest.raises(InputError, match=r"checkpoints\[0\] is a dict"):
        TracIn(task, train, checkpoints=[{"epoch": 1}])


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    task, train, _, _ = make_problem("regression", epochs=1)
    other = Task(build_mlp(out_dim=2, hidden=5, seed=1), "regression", Recipe(epochs=1))
    in_memory = train_with_checkpoints(other, train)
    on_disk = train_with_checkpoints(other, train, directory=tmp_path)
    for checkpoints in (in_memory, on_disk):
        with pytest.raises(InputError, match=r"shape \(5, 3\) in the checkpoint but \(4, 3\)"):
            TracIn(task, train, checkpoints=checkpoints)
    assert issubclass(InputError, ValueError)


def test_models_are_rejected_with_a_way_out():
    task, train, _, checkpoints = make_problem("regression", epochs=1)
    with pytest.raises(InputError, match="one list per run"):
        TracIn(task, train, checkpoints=checkpoints, models=[task.model])


def test_ensemble_over_runs_is_the_mean_of_the_runs():
    task, train, test, first = make_problem("classification", epochs=2)
    twin = Task(build_mlp(out_dim=3, seed=8), "classification", task.recipe)
    second = train_with_checkpoints(twin, train, seed=1)
    singles = [TracIn(task, train, checkpoints=run).attribute(test).scores
               for run in (first, second)]
    both = TracIn(task, train, checkpoints=[first, second])
    result = both.attribute(test)
    np.testing.assert_allclose(result.scores, (singles[0] + singles[1]) / 2, rtol=1e-12)
    assert result.info["ensemble_size"] == 2 and result.settings["ensemble_size"] == 2
    np.testing.assert_array_equal(
        TracIn(task, train, checkpoints=[first]).attribute(test).scores, singles[0])
    self_singles = [TracIn(task, train, checkpoints=run).self_influence([0, 3])
                    for run in (first, second)]
    np.testing.assert_allclose(both.self_influence([0, 3]), np.mean(self_singles, axis=0),
                               rtol=1e-12)


def test_checkpoints_on_disk_give_the_same_scores(tmp_path):
    task, train, test, checkpoints = make_problem("classification", epochs=3)
    twin = Task(build_mlp(out_dim=3, seed=5), "classification", task.recipe)
    on_disk = train_with_checkpoints(twin, train, seed=0, directory=tmp_path)
    a = TracIn(task, train, checkpoints=checkpoints).attribute(test)
    b = TracIn(task, train, checkpoints=load_checkpoints(tmp_path)).attribute(test)
    c = TracIn(task, train, checkpoints=on_disk).attribute(test)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.scores, c.scores)
    assert [e["path"] for e in b.settings["checkpoints"]] == [str(p.path) for p in on_disk]


def test_a_checkpoint_listed_twice_is_refused(tmp_path):
    task, train, _, checkpoints = make_problem("regression", epochs=2)
    first, second = checkpoints
    copied = Checkpoint(3, 0.1, state=first.state.clone())
    for twice in ([first, second, first], [first, second, copied]):
        with pytest.raises(InputError, match=r"checkpoints\[2\] \(checkpoint at epoch \d\) holds "
                                             r"the same parameters and buffers as "
                                             r"checkpoints\[0\] \(checkpoint at epoch 1\)"):
            TracIn(task, train, checkpoints=twice)
    with pytest.raises(InputError, match=r"checkpoints\[1\]\[1\] .* as checkpoints\[1\]\[0\]"):
        TracIn(task, train, checkpoints=[checkpoints, [second, second]])
    # the same checkpoint in two runs of an ensemble (a shared start) is not a duplicate
    TracIn(task, train, checkpoints=[checkpoints, [copied]])

    on_disk = train_with_checkpoints(task, train, epochs=1, directory=tmp_path / "run")[0]
    (tmp_path / "run" / "same.pt").write_bytes(on_disk.path.read_bytes())
    for path in (tmp_path / "run" / ".." / "run" / on_disk.path.name, tmp_path / "run" / "same.pt"):
        with pytest.raises(InputError, match=r"checkpoints\[1\] \(checkpoint at epoch 2 .*\) "
                                             r"(is the same file|holds the same parameters)"):
            TracIn(task, train, checkpoints=[on_disk, Checkpoint(2, 0.1, path=path)])
