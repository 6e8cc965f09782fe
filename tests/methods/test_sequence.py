"""Sequence tasks (a next-token loss summed over positions) against classification and
explicit autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import iif
from iif import CurvatureSettings, IntegratedInfluence, PathSettings, Recipe, Task
from iif.task.task import IGNORE

from .reference import flat_model, influence, safe_damping

V, H = 7, 6


class TinyLM(nn.Module):
    """Token embedding, a causal running mean over positions, a linear read-out: (n, T) ids
    -> (n, T, V) logits (``squeeze``: (n, V) for one position, the classification twin)."""

    def __init__(self, squeeze: bool = False):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.out = nn.Linear(H, V)
        self.squeeze = squeeze

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = torch.tanh(self.emb(ids))
        steps = torch.arange(1, ids.shape[1] + 1, dtype=e.dtype, device=e.device)
        z = self.out(e.cumsum(1) / steps[:, None])
        return z[:, 0] if self.squeeze else z


def _sequences(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and next-token labels of a noisy counting language, the last label
    ignored on every other sample."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    ids = (start + torch.arange(length + 1)) % V
    noise = torch.rand(ids.shape, generator=g) < 0.2
    ids = torch.where(noise, torch.randint(0, V, ids.shape, generator=g), ids)
    x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
    y[::2, -1] = IGNORE
    return x, y


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    x, y = _sequences(40, 3, 0)
    xt, yt = _sequences(3, 3, 1)
    task = Task(TinyLM().double(), "sequence", Recipe(lr=0.5, epochs=40, batch_size=10))
    iif.train(task, (x, y), seed=0)
    return task, x, y, xt, yt


def test_one_position_sequences_equal_classification():
    (cls, train, test), (seq, strain, stest) = _one_position_pair()
    a = IntegratedInfluence(cls, train, progress=False).attribute(test)
    b = IntegratedInfluence(seq, strain, progress=False).attribute(stest)
    assert np.abs(a.scores).max() > 1e-6
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.completeness["delta"], b.completeness["delta"])


def _token_loss(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one sample, ignored positions left out."""
    keep = labels != IGNORE
    logp = torch.log_softmax(out[0][keep], -1)
    return -logp[torch.arange(int(keep.sum())), labels[keep]].sum()


def _grads(forward, theta, x, y) -> torch.Tensor:
    rows = []
    for i in range(x.shape[0]):
        th = theta.clone().requires_grad_(True)
        rows.append(torch.autograd.grad(_token_loss(forward(th, x[i:i + 1]), y[i]), th)[0])
    return torch.stack(rows)


def test_k1_from_the_model_itself_is_the_influence_of_summed_token_losses(lm):
    task, x, y, xt, yt = lm
    theta, forward = flat_model(task.model)
    g, g_test = _grads(forward, theta, x, y), _grads(forward, theta, xt, yt)
    fisher = g.T @ g / x.shape[0]
    damping = safe_damping(fisher)
    expected = influence(fisher, damping, g_test, g)
    with torch.no_grad():
        base = torch.softmax(task.model(x), -1)
    method = IntegratedInfluence(task, (x, y), path=PathSettings(steps=1, sparse=False),
                                 curvature=CurvatureSettings(kind="fisher", damping=damping),
                                 progress=False)
    # the baseline's own predictions at every position; the task masks ignored positions
    scores = method.attribute((xt, yt), baseline_targets=base.reshape(len(x), -1)).scores
    assert np.abs(expected).max() > 1e-6
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


def test_ignored_positions_carry_no_loss_and_no_baseline_target(lm):
    task, x, y, *_ = lm
    data = task.validate((x, y))
    assert data.targets.shape == (len(x), 3 * V)
    rows = data.targets.reshape(len(x), 3, V).sum(-1)
    np.testing.assert_array_equal(rows.numpy(), (y != IGNORE).double().numpy())
    with torch.no_grad():
        out = task.model(x)
    guess = task.prediction_targets(out, data.targets).reshape(len(x), 3, V).sum(-1)
    np.testing.assert_allclose(guess.numpy(), rows.numpy(), atol=1e-12)
    # the loss sums the labelled positions only
    manual = torch.stack([_token_loss(out[i:i + 1], y[i]) for i in range(len(x))])
    np.testing.assert_allclose(task.sample_loss(out, data.targets).detach().numpy(),
                               manual.detach().numpy(), rtol=1e-12)


def test_the_default_iif_runs_on_sequences_and_adds_up(lm):
    task, x, y, xt, yt = lm
    result = IntegratedInfluence(task, (x, y), progress=False).attribute((xt, yt))
    assert result.scores.shape == (3, len(x))
    assert np.all(np.isfinite(result.scores))
    # the loss change it explains is the summed token loss's
    assert np.all(result.completeness["delta"] < 0)


@pytest.mark.parametrize("labels, match", [
    (torch.zeros(40, 2, dtype=torch.long), r"shape \(n, 3\)"),
    (torch.full((40, 3), V), "out of range"),
    (torch.full((40, 3), IGNORE), "all -100"),
    (torch.zeros(40, 3), "integer token ids"),
])
def test_sequence_labels_are_checked(lm, labels, match):
    task, x, *_ = lm
    with pytest.raises(iif.InputError, match=match):
        task.validate((x, labels))


def test_a_sequence_task_needs_position_logits():
    model = nn.Sequential(nn.Embedding(V, H), nn.Flatten(), nn.Linear(3 * H, V))
    with pytest.raises(iif.InputError, match="positions, vocab"):
        Task(model, "sequence").validate((torch.zeros(4, 3, dtype=torch.long),
                                          torch.zeros(4, 3, dtype=torch.long)))


def _one_position_pair():
    """The same trained model as a classifier and as a one-position sequence task."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (40, 1), generator=g)
    y = (3 * x[:, 0] + torch.randint(0, 2, (40,), generator=g)) % V
    xt = torch.randint(0, V, (3, 1), generator=g)
    yt = (3 * xt[:, 0]) % V
    classifier = TinyLM(squeeze=True).double()
    cls = Task(classifier, "classification", Recipe(lr=0.5, epochs=30, batch_size=10))
    iif.train(cls, (x, y), seed=0)
    sequence = TinyLM().double()
    sequence.load_state_dict(classifier.state_dict())
    seq = Task(sequence, "sequence", Recipe(lr=0.5, epochs=30, batch_size=10))
    return (cls, (x, y), (xt, yt)), (seq, (x, y[:, None]), (xt, yt[:, None]))


@pytest.mark.parametrize("method", [iif.InfluenceFunction, iif.TRAK])
def test_peer_methods_on_one_position_sequences_equal_classification(method):
    (cls, train, test), (seq, strain, stest) = _one_position_pair()
    a = method(cls, train, progress=False).attribute(test)
    b = method(seq, strain, progress=False).attribute(stest)
    assert np.abs(a.scores).max() > 1e-6
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-10, atol=1e-12)
