"""The gradient engine: the model as a pure function of its parameters, per-sample gradients
with ``torch.func`` (``functional_call`` + ``vmap``), target-Jacobian products and explicit
Hessians for small models.

Flat vectors follow the order of ``FunctionalModel.names`` (the trainable parameters in
``named_parameters()`` order). Per-sample work runs in chunks of ``chunk_size`` samples so that
memory is bounded by ``chunk_size * rows * M`` values, never by ``N * M``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

from iif.errors import InputError
from iif.task import Task

SampleFn = Callable[..., torch.Tensor]


@dataclass
class ModelState:
    """Trainable parameters and buffers of one model version (theta*, theta', theta_k...)."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    def clone(self) -> ModelState:
        return ModelState(
            {k: v.detach().clone() for k, v in self.params.items()},
            {k: v.detach().clone() for k, v in self.buffers.items()},
        )

    def flat(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params.values()])

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params.values())


@contextlib.contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Temporarily put every submodule in train or eval mode, restoring each one's flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def lone_samples_use_running_stats(module: nn.Module) -> Iterator[None]:
    """For a block of train-mode forwards: a BatchNorm layer that gets one value per channel
    (a minibatch of one sample, e.g. the last of an epoch when N % batch_size == 1) normalises
    it with its running statistics, as in eval mode, and leaves them unchanged.

    PyTorch refuses batch statistics of one value ("Expected more than 1 value per channel
    when training"); running statistics are the estimate the model has for a lone sample. Any
    other call keeps the layer's train mode exactly as PyTorch runs it (a single image of a
    BatchNorm2d still has statistics over its positions), so models without BatchNorm, and
    minibatches of two or more samples, are unaffected. Under ``vmap`` the shape seen is one
    copy's. A layer without running statistics (``track_running_stats=False``) cannot
    normalise a lone sample in any mode and still raises.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    flipped: list[nn.Module] = []

    def before(m: nn.Module, args: tuple) -> None:
        inp = args[0] if args else None
        if (m.training and m.running_mean is not None and isinstance(inp, torch.Tensor)
                and inp.dim() >= 2 and inp.numel() == inp.shape[1]):
            m.training = False
            flipped.append(m)

    def after(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if m in flipped:
            flipped.remove(m)
            m.training = True

    handles = [h for m in norms
               for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in flipped:
            m.training = True


class FunctionalModel:
    """A module called as ``f(state, x)``; the module's own tensors are never modified."""

    def __init__(self, module: nn.Module):
        self.module = module
        named = dict(module.named_parameters())
        self.names = [n for n, p in named.items() if p.requires_grad]
        if not self.names:
            raise InputError("the model has no trainable parameters (requires_grad=True)")
        self.frozen = {n: p.detach() for n, p in named.items() if not p.requires_grad}
        self.shapes = [named[n].shape for n in self.names]
        self.sizes = [named[n].numel() for n in self.names]
        self.num_params = sum(self.sizes)

    def state(self) -> ModelState:
        """A detached copy of the module's current parameters and buffers."""
        named = self.module.named_parameters()
        params = {n: p.detach().clone() for n, p in named if n in self.names}
        buffers = {n: b.detach().clone() for n, b in self.module.named_buffers()}
        return ModelState(params, buffers)

    def load_into_module(self, state: ModelState) -> None:
        with torch.no_grad():
            for n, p in self.module.named_parameters():
                if n in state.params:
                    p.copy_(state.params[n])
            for n, b in self.module.named_buffers():
                if n in state.buffers:
                    b.copy_(state.buffers[n])

    def __call__(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        out = functional_call(self.module, {**params, **self.frozen, **buffers}, (x,))
        return out.reshape(out.shape[0], -1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def flatten_batched(self, tree: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        """Concatenate per-parameter tensors with ``lead`` leading batch dims into (..., M)."""
        return torch.cat(
            [tree[n].reshape(*tree[n].shape[:lead], -1) for n in self.names], dim=lead
        )

    def outputs(self, state: ModelState, x: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
        """Model outputs (n, d) in eval mode, without gradients."""
        with torch.no_grad(), module_mode(self.module, False):
            return torch.cat(
                [self(state.params, state.buffers, x[i : i + chunk_size])
                 for i in range(0, x.shape[0], chunk_size)]
            )


def per_sample_jacobians(
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    fn: SampleFn,
    *args: torch.Tensor,
    chunk_size: int = 128,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, J)`` with J (n_chunk, R, M): the parameter gradients of each of the R
    scalars ``fn(output_i, *args_i)`` returns for sample i (R=1 when fn returns a scalar).

    One forward per sample is shared by its R backward passes (``jacrev``). Runs in eval mode
    (dropout off, BatchNorm on running statistics).
    """

    def single(params, buffers, xi, *ai):
        out = fmodel(params, buffers, xi.unsqueeze(0)).squeeze(0)
        return fn(out, *ai).reshape(-1)

    batched = vmap(jacrev(single), in_dims=(None, None, 0) + (0,) * len(args))
    with module_mode(fmodel.module, False):
        for start in range(0, x.shape[0], chunk_size):
            stop = start + chunk_size
            chunk_args = (a[start:stop] for a in args)
            tree = batched(state.params, state.buffers, x[start:stop], *chunk_args)
            yield start, fmodel.flatten_batched(tree, lead=2).detach()


def per_sample_grads(
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    targets: torch.Tensor,
    task: Task,
    chunk_size: int = 128,
) -> torch.Tensor:
    """Per-sample loss gradients (n, M) of ``l(f(x_i), targets_i)``; for small problems."""
    return torch.cat(
        [
            j[:, 0]
            for _, j in per_sample_jacobians(
                fmodel, state, x, sample_loss_fn(task), targets, chunk_size=chunk_size,
            )
        ]
    )


def sample_loss_fn(task: Task) -> SampleFn:
    """``fn(output_i, target_i) -> l(output_i, target_i)`` for one sample (unbatched)."""

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return task.sample_loss(out[None], target[None])[0]

    return loss


def loss_and_target_jvp(task: Task) -> SampleFn:
    """``fn(out, rho_k, rho_prev) -> [l(out, rho_k), <dl/drho (out, rho_k), rho_k - rho_prev>]``
    for losses whose gradient is not linear in the target: the parameter gradient of the second
    entry is the target-Jacobian product ``J_i dy`` by its autograd definition."""

    def fn(out: torch.Tensor, rho: torch.Tensor, rho_prev: torch.Tensor) -> torch.Tensor:
        def loss_of_target(r: torch.Tensor) -> torch.Tensor:
            return task.sample_loss(out[None], r[None])[0]

        value, directional = jvp(loss_of_target, (rho,), (rho - rho_prev,))
        return torch.stack([value, directional])

    return fn


def loss_and_target_difference(task: Task) -> SampleFn:
    """``fn(out, rho_k, rho_prev) -> [l(out, rho_k), l(out, rho_k) - l(out, rho_prev)]``.

    For losses whose gradient is linear in the target, the parameter gradient of the second
    entry equals ``J_i dy`` exactly (one backward pass, no mixed second derivative).
    """

    def fn(out: torch.Tensor, rho: torch.Tensor, rho_prev: torch.Tensor) -> torch.Tensor:
        pair = task.sample_loss(torch.stack([out, out]), torch.stack([rho, rho_prev]))
        return torch.stack([pair[0], pair[0] - pair[1]])

    return fn


def path_step_fn(task: Task) -> SampleFn:
    """The per-sample function whose gradients are (u_i, J_i dy) for this task's loss."""
    return loss_and_target_difference(task) if task.linear_in_target else loss_and_target_jvp(task)


def loss_and_target_jvps(task: Task) -> SampleFn:
    """``fn(out, rho, rho_prevs) -> [l(out, rho), <dl/drho (out, rho), rho - rho_prev_b>]_b``
    with ``rho_prevs`` (B, d): the gradients of B target-Jacobian products ``J_i dy_b`` and of
    the loss from one forward, for B paths that share the model and the targets ``rho``."""

    def fn(out: torch.Tensor, rho: torch.Tensor, rho_prevs: torch.Tensor) -> torch.Tensor:
        def loss_of_target(r: torch.Tensor) -> torch.Tensor:
            return task.sample_loss(out[None], r[None])[0]

        dl_drho = grad(loss_of_target)(rho)  # stays differentiable in out
        return torch.cat([loss_of_target(rho)[None], (rho - rho_prevs) @ dl_drho])

    return fn


def output_hessian_factor(task: Task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample factors L_i (n, d, d) with L_i L_i^T = d^2 l / d f^2 at (output_i, target_i).

    Used by the Gauss-Newton curvature. Negative eigenvalues (non-convex custom losses) are
    clipped to zero so that the Gauss-Newton matrix stays positive semi-definite. Computed in
    float64 and returned in the output's dtype: for a confidently classified sample the
    softmax Hessian ``p_y - p_y^2`` cancels to ``p_y (1 - p_y)``, which float32 resolves only
    down to 1 - p_y ~ 1e-7, so its eigenvectors would be rounding noise.
    """

    dtype = output.dtype
    h = vmap(hessian(sample_loss_fn(task)))(output.detach().double(), target.detach().double())
    h = 0.5 * (h + h.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(h)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(1)).to(dtype)


def ggn_factor(task: Task, output: torch.Tensor, target: torch.Tensor,
               rank: int | str | None = None) -> torch.Tensor:
    """(n, d, r): the ``rank`` columns of :func:`output_hessian_factor` with the largest
    eigenvalues (all d for None), so ``L L^T`` is the loss Hessian in output space truncated
    to its top-r directions. For a softmax cross-entropy ``diag(p) - p p^T`` has one
    dominant direction per confident sample (towards the runner-up class); ``"auto"`` keeps
    that one for the built-in cross-entropy and all d otherwise."""
    if rank == "auto":
        rank = 1 if task.kind == "classification" and task.loss is None else None
    factor = output_hessian_factor(task, output, target)  # eigh: ascending eigenvalues
    if rank is None or rank >= factor.shape[-1]:
        return factor
    return factor[..., -rank:]


def full_hessian(
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    targets: torch.Tensor,
    task: Task,
    chunk_size: int = 256,
    max_params: int = 20_000,
) -> torch.Tensor:
    """Explicit Hessian (M, M) of the mean training loss; only for small models."""
    if fmodel.num_params > max_params:
        raise InputError(
            f"curvature 'hessian' needs an explicit {fmodel.num_params}^2 matrix; models above "
            f"{max_params} parameters should use 'fisher' or 'ggn'"
        )
    flat0 = state.flat()
    n = x.shape[0]

    def chunk_loss(flat: torch.Tensor, xc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        out = fmodel(fmodel.unflatten(flat), state.buffers, xc)
        return task.sample_loss(out, tc).sum() / n

    h = torch.zeros(flat0.numel(), flat0.numel(), dtype=flat0.dtype, device=flat0.device)
    with module_mode(fmodel.module, False):
        for start in range(0, n, chunk_size):
            h += hessian(chunk_loss)(flat0, x[start : start + chunk_size],
                                     targets[start : start + chunk_size]).detach()
    return 0.5 * (h + h.T)


def mean_loss_grad(
    fmodel: FunctionalModel, state: ModelState, x: torch.Tensor, targets: torch.Tensor, task: Task
) -> torch.Tensor:
    """Gradient (M,) of the mean loss over (x, targets), in eval mode."""

    def loss(params):
        return task.sample_loss(fmodel(params, state.buffers, x), targets).mean()

    with module_mode(fmodel.module, False):
        g = grad(loss)(state.params)
    return fmodel.flatten_batched(g, lead=0).detach()
