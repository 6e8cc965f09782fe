"""Features: projected per-sample gradients, the input of every solve and score.

For a model state theta_k and the path targets rho_k, rho_{k-1}:

- ``u_i = A^T grad_theta l(f(x_i; theta_k), rho_k)``  (curvature features),
- ``psi_i = A^T J_i (rho_k - rho_{k-1})``               (target-Jacobian products),
- ``gamma = A^T grad_theta L_test(theta_k)``            (test gradients).

Features are stored as (N, P) in the model's dtype; for the unprojected case P = M, and a
memory budget turns an N x M request that would not fit into a clear error.
"""

from __future__ import annotations

import torch

from iif.errors import InputError
from iif.grads import (
    FunctionalModel,
    ModelState,
    output_hessian_factor,
    path_step_fn,
    per_sample_jacobians,
)
from iif.progress import progress_bar
from iif.projection import Projector
from iif.task import Task

DEFAULT_MAX_FEATURE_BYTES = 4 << 30


def _check_budget(rows: int, dim: int, dtype: torch.dtype, max_bytes: int, what: str) -> None:
    need = rows * dim * torch.empty((), dtype=dtype).element_size()
    if need > max_bytes:
        raise InputError(
            f"{what} would take {need / 2**30:.1f} GiB ({rows} x {dim}); use a projection "
            f"(ProjectionSettings(dim=...)) or raise max_feature_bytes"
        )


def _check_finite(block: torch.Tensor, what: str) -> None:
    # checked after projection: NaN and inf survive a random projection, and the projected
    # block is P / M times the size of the raw one
    if not bool(torch.isfinite(block).all()):
        raise InputError(
            f"{what} contain NaN or inf: the model or its loss is not finite on some samples"
        )


def step_features(
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    rho: torch.Tensor,
    rho_prev: torch.Tensor,
    task: Task,
    projector: Projector,
    chunk_size: int = 128,
    max_bytes: int = DEFAULT_MAX_FEATURE_BYTES,
    progress: bool | None = None,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected ``u`` and ``psi``, each (N, P), from one shared forward per sample."""
    n = x.shape[0]
    _check_budget(2 * n, projector.dim, rho.dtype, max_bytes, "path features")
    u = torch.empty(n, projector.dim, dtype=rho.dtype, device=x.device)
    psi = torch.empty_like(u)
    chunks = per_sample_jacobians(
        fmodel, state, x, path_step_fn(task), rho, rho_prev, chunk_size=chunk_size
    )
    for start, jac in progress_bar(chunks, total=-(-n // chunk_size), desc=desc, enable=progress):
        feats = projector.project(jac)  # (n_chunk, 2, P)
        _check_finite(feats, "per-sample gradients")
        u[start : start + feats.shape[0]] = feats[:, 0]
        psi[start : start + feats.shape[0]] = feats[:, 1]
    return u, psi


def loss_features(
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    targets: torch.Tensor,
    task: Task,
    projector: Projector,
    chunk_size: int = 128,
    max_bytes: int = DEFAULT_MAX_FEATURE_BYTES,
    what: str = "per-sample gradients",
) -> torch.Tensor:
    """Projected per-sample loss gradients (n, P), e.g. the test gradients gamma. ``what``
    names them in errors."""
    n = x.shape[0]
    _check_budget(n, projector.dim, targets.dtype, max_bytes, "gradient features")
    out = torch.empty(n, projector.dim, dtype=targets.dtype, device=x.device)

    def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return task.sample_loss(o[None], t[None])[0]

    for start, jac in per_sample_jacobians(fmodel, state, x, loss, targets, chunk_size=chunk_size):
        feats = projector.project(jac[:, 0])
        _check_finite(feats, what)
        out[start : start + jac.shape[0]] = feats
    return out


def ggn_features(
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    targets: torch.Tensor,
    task: Task,
    projector: Projector,
    chunk_size: int = 128,
    max_bytes: int = DEFAULT_MAX_FEATURE_BYTES,
) -> torch.Tensor:
    """Rows ``A^T J_i^T L_i`` (N * d, P) whose Gram matrix / N is the Gauss-Newton matrix."""
    n = x.shape[0]
    outputs = fmodel.outputs(state, x)
    factors = output_hessian_factor(task, outputs, targets)  # (N, d, d)
    d = factors.shape[-1]
    _check_budget(n * d, projector.dim, targets.dtype, max_bytes, "Gauss-Newton features")
    rows = torch.empty(n, d, projector.dim, dtype=targets.dtype, device=x.device)

    def contracted(o: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return o @ f  # (d,): column c is <f(x), L[:, c]>, so its gradient is J^T L[:, c]

    chunks = per_sample_jacobians(fmodel, state, x, contracted, factors, chunk_size=chunk_size)
    for start, jac in chunks:
        feats = projector.project(jac)
        _check_finite(feats, "output Jacobians")
        rows[start : start + jac.shape[0]] = feats
    return rows.reshape(n * d, projector.dim)
