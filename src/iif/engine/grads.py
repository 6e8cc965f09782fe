"""The gradient engine: per-sample gradients of a :class:`iif.engine.functional.FunctionalModel`
with ``torch.func`` (``functional_call`` + ``vmap``), target-Jacobian products, output-Hessian
(Gauss-Newton) factors and explicit Hessians for small models.

Flat vectors follow the order of ``FunctionalModel.names`` (the trainable parameters in
``named_parameters()`` order). Per-sample work runs in chunks of ``chunk_size`` samples so that
memory is bounded by ``chunk_size * rows * M`` values, never by ``N * M``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.func import grad, jacrev, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

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


def _plan(fmodel: FunctionalModel, names: Sequence[str] | None = None) -> HookPlan:
    """The hooks' layer plan for the parameters ``names`` (None: all), made once per model
    and set of names (``fmodel.hook_plans``)."""
    key = tuple(fmodel.names if names is None else names)
    if key not in fmodel.hook_plans:
        fmodel.hook_plans[key] = hook_plan(fmodel.module, key)
    return fmodel.hook_plans[key]


def _hooked(fmodel: FunctionalModel, state: ModelState, x: torch.Tensor, fn: SampleFn,
            args: tuple, chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`per_sample_jacobians` by :func:`iif.engine.hooks.hooked_jacobians`, chunk by
    chunk (streamed inputs are read one chunk at a time)."""
    for start in range(0, x.shape[0], chunk_size):
        stop = start + chunk_size
        yield start, hooked_subset_jacobians(fmodel, state, x[start:stop], fn,
                                             tuple(a[start:stop] for a in args), fmodel.names)


def hooked_subset_jacobians(fmodel: FunctionalModel, state: ModelState, x: torch.Tensor,
                            fn: SampleFn, args: tuple, names: Sequence[str]) -> torch.Tensor:
    """J (n, R, M_names): the per-sample Jacobians of the parameters ``names`` (in
    ``fmodel.names`` order), from module hooks in one batched forward of ``x`` (one chunk);
    every other parameter is held fixed."""
    def batched_fn(out, *a):
        o = model_output(out, fmodel.output)
        o = o.reshape(o.shape[0], -1)
        return vmap(lambda oi, *ai: fn(oi, *ai).reshape(-1))(o, *a)  # (n, R)

    params = {k: state.params[k] for k in names}
    fixed = {**fmodel.frozen, **state.buffers,
             **{k: v for k, v in state.params.items() if k not in params}}
    return torch.cat([jac for _, jac in hooked_jacobians(
        fmodel.module, names, params, fixed, x, batched_fn, *args, chunk_size=x.shape[0],
        plan=_plan(fmodel, names))])


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

    By double backward over the batch: column c of every H_i is the gradient of the c-th
    entries of the per-sample loss gradients summed over the samples, which sample i's loss
    alone reaches. Not forward-over-reverse (``vmap`` of ``torch.func.hessian``, see
    :func:`full_hessian`); this took 0.4-0.8 x its time for the cross-entropy with one thread
    (n = 64-10000 samples, d = 10-100 outputs).
    """

    dtype = output.dtype
    out = output.detach().double().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(task.sample_loss(out, target.detach().double()).sum(), out,
                                   create_graph=True)
        h = torch.stack(list(gradient_products(g, out, _columns(out))), dim=1)  # (n, d, d)
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
    """Explicit Hessian (M, M) of the mean training loss by double backward: row k is the
    gradient of entry k of the loss gradient; only for small models.

    Not ``torch.func.hessian`` (forward-over-reverse): on torch 2.13 it returns wrong mixed
    second derivatives through ``layer_norm`` (pytorch/pytorch#196700; 8e-3 relative on an
    MLP with LayerNorm, 6e-2 on a small GPT-2) and has no forward-mode rule for the fused CPU
    attention kernels. Measured with one thread, the row loop was the faster on models of
    M = 1500-2500 parameters and 64-256 samples per chunk (MLP 0.6 s against 1.0 s,
    LayerNorm MLP 1.7 against 5.8 s, CNN 2.6 against 3.3 s, GPT-2 11 against 25 s), slower
    only on toy problems where one backward pass per row costs more than its arithmetic (a
    GPT-2 of 206 parameters on 6 samples: 0.4 s against 0.03 s), and it holds one row at a
    time instead of M tangents.
    """
    if fmodel.num_params > max_params:
        raise InputError(
            f"curvature 'hessian' needs an explicit {fmodel.num_params}^2 matrix; models above "
            f"{max_params} parameters should use 'fisher' or 'ggn'"
        )
    flat = state.flat().detach().requires_grad_(True)
    n, m = x.shape[0], flat.numel()
    h = torch.zeros(m, m, dtype=flat.dtype, device=flat.device)
    with module_mode(fmodel.module, False), quiet_attention_fallback(), \
            second_order(HESSIAN):
        for start in range(0, n, chunk_size):
            g = loss_gradient(fmodel, flat, state.buffers, x[start : start + chunk_size],
                              targets[start : start + chunk_size], task, n,
                              check=HESSIAN if start == 0 else None)
            for k, row in enumerate(gradient_products(g, flat, _basis(m, flat))):
                h[k] += row
    return 0.5 * (h + h.T)


# ---- second derivatives by double backward ---------------------------------------------------
# what needs them, and what to use instead: the words of a refusal
HESSIAN = ("curvature 'hessian' needs", "use CurvatureSettings(kind='fisher') or kind='ggn'")
GGN_PRODUCTS = ("conjugate gradients on Gauss-Newton products need",
                "use solver 'exact' (first derivatives only) or CurvatureSettings(kind='fisher')")

_NO_DERIVATIVE = re.compile(r"derivative for (aten::\S+) is not implemented")
_ONCE = once_differentiable(lambda ctx: None).__code__


@contextlib.contextmanager
def second_order(need: tuple[str, str]) -> Iterator[None]:
    """For a block that differentiates the model twice (``need``: what needs it, and the
    remedy): gradients on (the engine may be called under ``no_grad``), attention through its
    plain kernel, and torch's refusal of a second derivative raised as one line.

    The fused CPU attention kernels of ``scaled_dot_product_attention`` have neither a double
    backward nor forward-mode derivatives; the plain one has both and gives the same values
    to round-off."""
    try:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    except (RuntimeError, NotImplementedError) as exc:
        found = _NO_DERIVATIVE.search(str(exc))
        if found is None:
            raise
        what, remedy = need
        raise InputError(f"{what} second derivatives of the model, which torch does not "
                         f"implement for {found.group(1)}; {remedy}") from None


def loss_gradient(fmodel: FunctionalModel, flat: torch.Tensor, buffers: dict[str, torch.Tensor],
                  x: torch.Tensor, targets: torch.Tensor, task: Task, n: int,
                  check: tuple[str, str] | None = None) -> torch.Tensor:
    """Gradient (M,) of the summed loss of (x, targets) / n at ``flat`` (M,), which requires
    grad, with its graph, to be differentiated again (:func:`gradient_products`). ``check``
    (what needs it, and the remedy): refuse a model whose second derivatives torch would drop
    (:func:`check_twice_differentiable`)."""
    out = fmodel(fmodel.unflatten(flat), buffers, x)
    (g,) = torch.autograd.grad(task.sample_loss(out, targets).sum() / n, flat,
                               create_graph=True)
    if check is not None:
        check_twice_differentiable(g, check)
    return g


def gradient_products(g: torch.Tensor, wrt: torch.Tensor,
                      vectors: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``d <g, u> / d wrt`` for each u (shaped like g), by one backward pass each through
    g's graph: Hessian-vector products when g is a loss gradient (:func:`loss_gradient`)."""
    for u in vectors:
        if not g.requires_grad:  # g does not depend on wrt: a zero second derivative
            yield torch.zeros_like(wrt)
            continue
        (product,) = torch.autograd.grad(g, wrt, grad_outputs=u, retain_graph=True,
                                         allow_unused=True, materialize_grads=True)
        yield product


def check_twice_differentiable(g: torch.Tensor, need: tuple[str, str]) -> None:
    """Refuse, in one line, a graph of first derivatives ``g`` (taken with ``create_graph``)
    that holds a custom ``torch.autograd.Function`` whose backward is marked
    ``@once_differentiable``: torch links the second derivative of such a backward to
    detached stand-ins, so differentiating again silently leaves it out."""
    names: list[str] = []
    seen: dict[int, object] = {}  # holds the nodes, so that no id is reused meanwhile
    stack = [g.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        cls = getattr(node, "_forward_cls", None)
        if getattr(getattr(cls, "backward", None), "__code__", None) is _ONCE:
            names.append(cls.__name__)
        stack.extend(f for f, _ in node.next_functions)
    if names:
        what, remedy = need
        raise InputError(f"{what} second derivatives of the model, which torch drops "
                         f"for {', '.join(sorted(set(names)))} (a torch.autograd.Function "
                         f"marked @once_differentiable); {remedy}")


def _columns(like: torch.Tensor) -> Iterator[torch.Tensor]:
    """For (n, d) ``like``: d tensors like it, the c-th one in column c and zero elsewhere."""
    for c in range(like.shape[1]):
        u = torch.zeros_like(like)
        u[:, c] = 1
        yield u


def _basis(m: int, like: torch.Tensor) -> Iterator[torch.Tensor]:
    """The unit vectors e_0 .. e_{m-1}, one buffer reused (each is used before the next)."""
    e = torch.zeros(m, dtype=like.dtype, device=like.device)
    for k in range(m):
        e[k] = 1
        yield e
        e[k] = 0


def mean_loss_grad(
    fmodel: FunctionalModel, state: ModelState, x: torch.Tensor, targets: torch.Tensor, task: Task
) -> torch.Tensor:
    """Gradient (M,) of the mean loss over (x, targets), in eval mode."""

    def loss(params):
        return task.sample_loss(fmodel(params, state.buffers, x), targets).mean()

    with module_mode(fmodel.module, False):
        g = grad(loss)(state.params)
    return fmodel.flatten_batched(g, lead=0).detach()
