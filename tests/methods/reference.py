"""Independent reference computations for the method tests: explicit Hessians, Gauss-Newton
matrices and per-sample gradients from torch.autograd / torch.func, never from the engine."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev


def flat_model(model: nn.Module):
    """theta* as one vector and ``forward(theta, x)`` through torch.func.functional_call."""
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()

    def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        params = {n: q.reshape(s) for n, q, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, params, (x,))

    return theta, forward


def loss(kind: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: mean squared error over outputs, or soft cross-entropy."""
    if kind == "regression":
        return ((out - target) ** 2).mean(-1)
    return -(target * torch.log_softmax(out, -1)).sum(-1)


def targets(kind: str, y: np.ndarray, classes: int = 0) -> torch.Tensor:
    if kind == "regression":
        t = torch.as_tensor(y, dtype=torch.float64)
        return t.reshape(t.shape[0], -1)
    return nn.functional.one_hot(torch.as_tensor(y).long(), classes).double()


def sample_grads(forward, theta, kind, x, t) -> torch.Tensor:
    """Per-sample loss gradients (n, M), one autograd call per sample."""
    rows = []
    for i in range(x.shape[0]):
        th = theta.clone().requires_grad_(True)
        value = loss(kind, forward(th, x[i : i + 1]), t[i : i + 1]).sum()
        rows.append(torch.autograd.grad(value, th)[0])
    return torch.stack(rows)


def train_hessian(forward, theta, kind, x, t) -> torch.Tensor:
    h = hessian(lambda th: loss(kind, forward(th, x), t).mean())(theta)
    return 0.5 * (h + h.T)


def ggn(forward, theta, kind, x, t) -> torch.Tensor:
    """(1/N) sum_i J_i^T H_i J_i with J_i the output Jacobian, H_i the output-space Hessian."""
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for i in range(x.shape[0]):
        jac = jacrev(lambda th, xi=x[i : i + 1]: forward(th, xi)[0])(theta)  # (d, M)
        out = forward(theta, x[i : i + 1])[0].detach()
        h_out = hessian(lambda o, ti=t[i]: loss(kind, o[None], ti[None])[0])(out)
        total += jac.T @ h_out @ jac
    return total / x.shape[0]


def influence(curv, damping, g_test, g_train) -> np.ndarray:
    """-(1/N) g_test^T (C + damping I)^{-1} g_i, shape (n_test, N)."""
    eye = torch.eye(curv.shape[0], dtype=torch.float64)
    sol = torch.linalg.solve(curv + damping * eye, g_test.T)
    return (-(g_train @ sol).T / g_train.shape[0]).numpy()


def safe_damping(curv: torch.Tensor) -> float:
    """A damping that makes ``curv + damping I`` clearly positive definite."""
    eig = torch.linalg.eigvalsh(curv)
    return 1e-3 * float(eig.abs().max()) + 2.0 * max(0.0, -float(eig.min()))


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def losses(model: nn.Module, kind: str, x, y, classes: int = 0) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.as_tensor(x))
        return loss(kind, out, targets(kind, y, classes)).numpy()



class Problem:
    def __init__(self, task, x, y, xt, yt, classes=0):
        self.task, self.x, self.y, self.xt, self.yt, self.classes = task, x, y, xt, yt, classes

    @property
    def kind(self) -> str:
        return self.task.kind


def mlp(sizes: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()




def removal_drops(x, y, xt, yt, scores, rng, k: int = 8, draws: int = 20):
    """Change of each test sample's loss when least squares is refitted exactly without its k
    most positive-scored, k random (mean of ``draws``) or k most negative-scored training
    samples: three arrays (n_test,). ``y`` (N,) and ``yt`` (n_test,) are targets, ``x`` and
    ``xt`` inputs; ``scores`` (n_test, N) in the project's sign."""

    def retrained_loss(keep, s):
        theta = np.linalg.lstsq(x[keep], y[keep], rcond=None)[0]  # exact retraining
        return float((xt[s] @ theta - yt[s]) ** 2)

    everyone, drops = np.arange(len(x)), []
    for s in range(len(xt)):
        full = retrained_loss(everyone, s)
        top = np.argsort(-scores[s])[:k]
        bottom = np.argsort(scores[s])[:k]
        drops.append([
            retrained_loss(np.setdiff1d(everyone, top), s) - full,
            np.mean([retrained_loss(np.setdiff1d(everyone, rng.choice(len(x), k, replace=False)),
                                    s) - full for _ in range(draws)]),
            retrained_loss(np.setdiff1d(everyone, bottom), s) - full,
        ])
    return np.array(drops).T
