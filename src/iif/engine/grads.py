"""The gradient engine: per-sample gradients of a :class:`iif.engine.functional.FunctionalModel`
with ``torch.func`` (``functional_call`` + ``vmap``), target-Jacobian products, output-Hessian
(Gauss-Newton) factors and explicit Hessians for small models.

Flat vectors follow the order of ``FunctionalModel.names`` (the trainable parameters in
``named_parameters()`` order). Per-sample work runs in chunks of ``chunk_size`` samples so that
memory is bounded by ``chunk_size * rows * M`` values, never by ``N * M``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch.func import grad, hessian, jacrev, jvp, vmap

from iif.engine.functional import (
    FunctionalModel,
    ModelState,
    module_mode,
    quiet_attention_fallback,
)
from iif.engine.hooks import HookPlan, hook_plan, hooked_jacobians
from iif.errors import InputError, exception_text
from iif.task.outputs import model_output
from iif.task.task import Task

log = logging.getLogger(__name__)

SampleFn = Callable[..., torch.Tensor]


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

    Runs in eval mode (dropout off, BatchNorm on running statistics), by the route
    :func:`gradient_route` chose for the model: under ``vmap`` (one forward per sample shared
    by its R backward passes, ``jacrev``), or, for a forward that cannot run there, from module
    hooks in batched forwards (:mod:`iif.engine.hooks`). Both give the same gradients.
    """
    if gradient_route(fmodel, state, x, fn, *args) == HOOKS:
        yield from _hooked(fmodel, state, x, fn, args, chunk_size)
        return
    batched = _vmapped(fmodel, fn, len(args))
    with module_mode(fmodel.module, False):
        for start in range(0, x.shape[0], chunk_size):
            stop = start + chunk_size
            chunk_args = (a[start:stop] for a in args)
            with quiet_attention_fallback():  # never across the yield: the caller runs there
                tree = batched(state.params, state.buffers, x[start:stop], *chunk_args)
            yield start, fmodel.flatten_batched(tree, lead=2).detach()


VMAP, HOOKS = "vmap", "hooks"


def _vmapped(fmodel: FunctionalModel, fn: SampleFn, n_args: int) -> Callable:
    def single(params, buffers, xi, *ai):
        out = fmodel(params, buffers, xi.unsqueeze(0)).squeeze(0)
        return fn(out, *ai).reshape(-1)

    return vmap(jacrev(single), in_dims=(None, None, 0) + (0,) * n_args)


def gradient_route(fmodel: FunctionalModel, state: ModelState, x: torch.Tensor,
                   fn: SampleFn | None = None, *args: torch.Tensor) -> str:
    """``"vmap"`` or ``"hooks"``: how this model's per-sample gradients are taken, decided
    once per :class:`FunctionalModel` (``fmodel.route``; set it to choose) by running the
    ``vmap`` route on two samples. A forward that cannot run under ``vmap`` (data-dependent
    control flow such as a padding mask, recurrent layers) takes module hooks instead; the
    choice is said in one INFO line, never by showing torch's error."""
    if fmodel.route is None:
        k = min(2, x.shape[0])
        if fn is None:
            fn, args = _output_sum, ()
        try:
            with module_mode(fmodel.module, False), quiet_attention_fallback():
                _vmapped(fmodel, fn, len(args))(state.params, state.buffers, x[:k],
                                                 *(a[:k] for a in args))
            fmodel.route = VMAP
        except Exception as exc:  # noqa: BLE001 (any failure under vmap: the hooks need none)
            # a forward that fails without vmap too is the model's own failure: say that one
            with torch.no_grad(), module_mode(fmodel.module, False):
                fmodel(state.params, state.buffers, x[:k])
            fmodel.route = HOOKS
            fmodel.route_note = (f"the model's forward cannot run under torch.func.vmap "
                                 f"({type(exc).__name__})")
            log.debug("vmap probe: %s", exception_text(exc))
            plan = _plan(fmodel)
            log.info("per-sample gradients from module hooks in batched forwards: %s; %s",
                     fmodel.route_note, plan.summary())
    return fmodel.route


def _output_sum(out: torch.Tensor) -> torch.Tensor:
    return out.sum()


def _plan(fmodel: FunctionalModel) -> HookPlan:
    if fmodel.hook_plan is None:
        fmodel.hook_plan = hook_plan(fmodel.module, fmodel.names)
    return fmodel.hook_plan


def _hooked(fmodel: FunctionalModel, state: ModelState, x: torch.Tensor, fn: SampleFn,
            args: tuple, chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`per_sample_jacobians` by :func:`iif.engine.hooks.hooked_jacobians`, chunk by
    chunk (streamed inputs are read one chunk at a time)."""
    def batched_fn(out, *a):
        o = model_output(out, fmodel.output)
        o = o.reshape(o.shape[0], -1)
        return vmap(lambda oi, *ai: fn(oi, *ai).reshape(-1))(o, *a)  # (n, R)

    buffers = {**fmodel.frozen, **state.buffers}
    for start in range(0, x.shape[0], chunk_size):
        stop = start + chunk_size
        xc = x[start:stop]
        for _, jac in hooked_jacobians(fmodel.module, fmodel.names, state.params, buffers, xc,
                                       batched_fn, *(a[start:stop] for a in args),
                                       chunk_size=xc.shape[0], plan=_plan(fmodel)):
            yield start, jac


def per_sample_grads(
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    targets: torch.Tensor,
    task: Task,
    chunk_size: int = 128,
    measure: bool = False,
) -> torch.Tensor:
    """Per-sample loss gradients (n, M) of ``l(f(x_i), targets_i)`` (``measure``: of the
    task's measurement); for small problems."""
    fn = measurement_fn(task) if measure else sample_loss_fn(task)
    return torch.cat([j[:, 0] for _, j in per_sample_jacobians(fmodel, state, x, fn, targets,
                                                               chunk_size=chunk_size)])


def sample_loss_fn(task: Task) -> SampleFn:
    """``fn(output_i, target_i) -> l(output_i, target_i)`` for one sample (unbatched)."""

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return task.sample_loss(out[None], target[None])[0]

    return loss


def measurement_fn(task: Task) -> SampleFn:
    """``fn(output_i, target_i) -> m`` for one sample (unbatched): what the scores explain on
    a test sample, oriented as a loss (:meth:`iif.task.task.Task.measure`)."""

    def measure(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return task.measure(out[None], target[None])[0]

    return measure


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
    with module_mode(fmodel.module, False), quiet_attention_fallback():
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
