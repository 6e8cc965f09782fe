"""Features: projected per-sample gradients, the input of every solve and score.

For a model state theta_k and the path targets rho_k, rho_{k-1}:

- ``u_i = A^T grad_theta l(f(x_i; theta_k), rho_k)``  (curvature features),
- ``psi_i = A^T J_i (rho_k - rho_{k-1})``               (target-Jacobian products),
- ``gamma = A^T grad_theta L_test(theta_k)``            (test gradients).

Features are stored as (N, P) in the model's dtype; for the unprojected case P = M. A matrix beyond
the memory budget (``max_bytes``) is a clear error, or, inside
:func:`iif.engine.budget.spill_features_to` (a method's ``feature_dir``), memory-mapped from disk;
these decisions are the budget's (``iif.engine.budget``, behind the engine).

One model and B stacked copies: :func:`step_features` and :func:`loss_features` take a
``ModelState`` or an ``iif.engine.stacked.StackedState`` of B copies and differ only in where their
chunks come from (:func:`projected_jacobians` or :func:`stacked_projected_jacobians`), whose
values they copy unchanged. The chunk sources stay twins: the B-copy one runs the Kronecker
fast path as a function of one copy's parameters under ``vmap`` (zero probes and ``vjp``),
which at B = 1 is not bit-equal to the one-model path's hooked batched forward and
``autograd.grad`` (measured: up to 7e-16 apart in float64) and costs ``vmap``'s overhead,
and it cannot serve the per-sample-Jacobian path or shared layers; the one-model one looped
over the copies would give up the B-wide products the B-copy one exists for.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import jacrev, vmap

from iif.engine.budget import (
    DEFAULT_MAX_FEATURE_BYTES,
    grown_chunk,
    spill_folder,
)
from iif.engine.functional import (
    FunctionalModel,
    ModelState,
    module_mode,
    quiet_attention_fallback,
)
from iif.engine.grads import (
    HOOKS,
    ggn_factor,
    gradient_route,
    hooked_subset_jacobians,
    loss_and_target_jvps,
    measurement_fn,
    path_step_fn,
    per_sample_jacobians,
    sample_loss_fn,
)
from iif.engine.projection import KroneckerLayer, KroneckerProjector, Projector
from iif.errors import InputError
from iif.progress import progress_bar
from iif.task.task import Task


def _feature_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    max_bytes: int, what: str) -> torch.Tensor:
    """An uninitialised (shape) tensor for features: where the budget says
    (:func:`iif.engine.budget.spill_folder`), in memory or memory-mapped from its spill folder."""
    folder = spill_folder(shape, dtype, device, max_bytes, what)
    if folder is None:
        return torch.empty(shape, dtype=dtype, device=device)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".features-", suffix=".bin")
    try:
        os.close(fd)
        array = np.memmap(name, dtype=torch.empty((), dtype=dtype).numpy().dtype, mode="w+",
                          shape=shape)
    finally:
        os.unlink(name)  # the mapping keeps the pages; the name goes now
    return torch.from_numpy(array)


def _check_finite(block: torch.Tensor, what: str) -> None:
    # checked after projection: NaN and inf survive a random projection, and the projected
    # block is P / M times the size of the raw one. NaN and inf also survive a sum, which
    # reads the block once without a boolean copy; only a sum that overflows from finite
    # entries (|values| near the dtype's limit) needs the elementwise check.
    if bool(torch.isfinite(block.sum())):
        return
    if not bool(torch.isfinite(block).all()):
        raise InputError(
            f"{what} contain NaN or inf: the model or its loss is not finite on some samples"
        )


def projected_jacobians(
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    fn,
    *args: torch.Tensor,
    projector: Projector,
    chunk_size: int = 128,
):
    """Yield ``(start, F)`` with F (n_chunk, R, P): the projected parameter gradients of the R
    scalars ``fn(output_i, *args_i)`` per sample, finite-checked.

    A Kronecker projector of a model whose parameters all sit in ``nn.Linear`` or
    ``nn.Conv2d`` layers takes a fast path: one batched forward with hooks records each
    layer's inputs ``a_i`` (a convolution's as patches) and R backward passes give its output
    gradients ``delta_i``; the feature of a layer is then
    ``(A_out^T delta_i) (x) (A_in^T [a_i, 1])`` (summed over a convolution's positions), equal
    to projecting the per-sample gradient ``delta_i [a_i, 1]^T`` without ever forming it.
    A layer's input and output gradient may carry positions between the batch and feature
    dimensions (a sequence model's Linear sees (n, T, in)): the feature then sums over them,
    as the per-sample gradient ``sum_t delta_it [a_it, 1]^T`` does. Parameters outside the
    layers (embeddings, norms) get per-sample Jacobians of their own, projected densely
    (:func:`_rest_chunks`). Otherwise per-sample Jacobians
    (``iif.engine.grads.per_sample_jacobians``) of all parameters are projected.
    """
    fast = isinstance(projector, KroneckerProjector) and _single_use_layers(
        fmodel, state, x, projector)
    if fast:
        chunks = _kronecker_chunks(fmodel, state, x, fn, args, projector, chunk_size)
        if projector.rest is not None:
            chunks = _with_rest(chunks, fmodel, state, x, fn, args, projector, chunk_size)
        chunks = _or_dense(chunks, fmodel, state, x, fn, args, projector, chunk_size)
    else:
        chunks = ((start, projector.project(jac)) for start, jac in
                  per_sample_jacobians(fmodel, state, x, fn, *args, chunk_size=chunk_size))
    for start, feats in chunks:
        _check_finite(feats, "per-sample gradients")
        yield start, feats


def _or_dense(chunks, fmodel, state, x, fn, args, projector, chunk_size):
    """The fast path's chunks, or, if a hooked layer turns out not to run one row per sample
    (found on the first chunk, before anything is yielded), the projected per-sample
    Jacobians."""
    try:
        first = next(chunks)
    except StopIteration:
        return
    except _Unbatched:
        yield from ((start, projector.project(jac)) for start, jac in
                    per_sample_jacobians(fmodel, state, x, fn, *args, chunk_size=chunk_size))
        return
    yield first
    yield from chunks


def _single_use_layers(fmodel, state, x, projector) -> bool:
    """True when one forward calls each projected Linear or Conv2d module exactly once (no
    weight sharing), so that its hook sees the whole per-sample gradient."""
    if not projector.layers:  # nothing to hook (e.g. only a tied head): dense Jacobians
        return False
    calls = [0] * len(projector.layers)
    handles = [layer.module.register_forward_hook(
                   lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(projector.layers)]
    try:
        with torch.no_grad(), module_mode(fmodel.module, False):
            fmodel(state.params, state.buffers, x[:1])
    finally:
        for h in handles:
            h.remove()
    return all(c == 1 for c in calls)


def _with_rest(chunks, fmodel: FunctionalModel, state: ModelState, x: torch.Tensor, fn,
               args: tuple, projector: KroneckerProjector, chunk_size: int):
    """``(start, F)`` of the layers' chunks with the projected per-sample Jacobians of the
    parameters outside them appended: F (n, R, P), columns in ``projector.project``'s
    order (layers, then the rest)."""
    rest = projector.rest
    assert rest is not None
    names = [n for n in fmodel.names if n not in projector.layer_params]
    fixed = {k: v for k, v in state.params.items() if k not in names}
    free = {k: state.params[k] for k in names}

    def single(p, xi, *ai):
        out = fmodel({**fixed, **p}, state.buffers, xi.unsqueeze(0)).squeeze(0)
        return fn(out, *ai).reshape(-1)

    batched = vmap(jacrev(single), in_dims=(None, 0) + (0,) * len(args))
    hooks = gradient_route(fmodel, state, x, fn, *args) == HOOKS
    for start, feats in chunks:
        parts = []
        # the layers' chunk may be larger than a chunk of per-sample Jacobians should be
        for lo in range(start, start + feats.shape[0], chunk_size):
            hi = min(lo + chunk_size, start + feats.shape[0])
            chunk_args = tuple(a[lo:hi] for a in args)
            if hooks:  # a forward vmap cannot run: the rest's Jacobians from hooks too
                jac = hooked_subset_jacobians(fmodel, state, x[lo:hi], fn, chunk_args, names)
                parts.append(rest.project(jac.detach()))
                continue
            with module_mode(fmodel.module, False), quiet_attention_fallback():
                tree = batched(free, x[lo:hi], *chunk_args)
            jac = torch.cat([tree[n].reshape(hi - lo, feats.shape[1], -1) for n in names],
                            dim=2)  # (n, R, M_rest) in the flat vector's order
            parts.append(rest.project(jac.detach()))
        yield start, torch.cat([feats, torch.cat(parts)], dim=2)


def _fast_chunk(projector, fmodel, chunk_size: int, rows: int) -> int:
    """Samples per fast-path chunk: as many as fit the memory of a dense chunk of
    ``chunk_size`` samples (``chunk_size * rows * M`` values), the budget's
    :func:`iif.engine.budget.grown_chunk`."""
    if any(layer.patches is not None for layer in projector.layers):
        # a convolution's working set grows with its positions: keep the asked chunk
        return chunk_size
    widths = sum(layer.in_features + layer.out_features for layer in projector.layers)
    if projector.rest is not None:
        # the per-sample Jacobians of the parameters outside the layers come in chunks of
        # chunk_size and are projected at once: their memory does not grow with the chunk
        return chunk_size
    return grown_chunk(chunk_size, rows, fmodel.num_params,
                       rows * (widths + projector.dim) + widths)


class _Unbatched(Exception):
    """A hooked layer ran on inputs that do not carry one row per sample (raised before the
    first chunk is yielded: the caller then projects per-sample Jacobians instead)."""


def _kronecker_chunks(fmodel, state, x, fn, args, projector, chunk_size):

    inputs: list[torch.Tensor | None] = [None] * len(projector.layers)
    outputs: list[torch.Tensor | None] = [None] * len(projector.layers)
    rows = [0]  # samples of the chunk in flight; 0 outside this generator's own forwards
    lifted: list[int] = []

    def hook(index, layer):
        def record(module, inp, out):
            if not rows[0]:  # another forward while this generator waits (the rest's vmap)
                return None
            a = inp[0].detach()
            if layer.embedding and out.shape[0] == 1 and rows[0] > 1:
                # one row looked up for every sample (position ids (1, T), broadcast over the
                # batch): expanded here, so the gradient reaching it is per sample
                out, a = out.expand(rows[0], *out.shape[1:]), a.expand(rows[0], *a.shape[1:])
                lifted.append(index)
            elif out.shape[0] != rows[0]:
                raise _Unbatched(f"{type(module).__name__} ran on {out.shape[0]} rows")
            inputs[index] = a
            outputs[index] = out
            # the rest of the model gets a copy: an in-place activation (ReLU(inplace=True))
            # would otherwise overwrite the output whose gradient is asked for
            return out.clone()
        return record

    # parameters require grad only so that the layer outputs do; their own gradients are
    # never asked for
    params = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
    handles = [layer.module.register_forward_hook(hook(i, layer))
               for i, layer in enumerate(projector.layers)]
    step = None
    try:
        with module_mode(fmodel.module, False), torch.enable_grad():
            start = 0
            while start < x.shape[0]:
                stop = start + (step or chunk_size)
                rows[0] = min(stop, x.shape[0]) - start
                try:
                    out = fmodel(params, state.buffers, x[start:stop])
                finally:
                    rows[0] = 0
                if step is None and lifted:  # the first chunk: did expanding change it?
                    with torch.no_grad():  # rows[0] is 0: the hooks leave this forward be
                        plain = fmodel(state.params, state.buffers, x[start:stop])
                    if not torch.allclose(out, plain, rtol=1e-5, atol=1e-6):
                        raise _Unbatched("expanding a one-row lookup changed the outputs")
                values = vmap(lambda o, *a: fn(o, *a).reshape(-1))(
                    out, *(a[start:stop] for a in args))  # (n, R)
                n, r = values.shape
                if step is None:
                    step = _fast_chunk(projector, fmodel, chunk_size, r)
                # the input side of each layer's feature serves all R rows
                rights = [_input_factor(a, layer)
                          for a, layer in zip(inputs, projector.layers, strict=True)]
                feats = []
                for j in range(r):
                    deltas = torch.autograd.grad(values[:, j].sum(), outputs,
                                                 retain_graph=j < r - 1)
                    feats.append(torch.cat([
                        _layer_feature(d, right, layer)
                        for d, right, layer in zip(deltas, rights, projector.layers,
                                                   strict=True)
                    ], dim=1))
                yield start, torch.stack(feats, dim=1).detach()  # (n, R, P)
                start += n
    finally:
        for h in handles:
            h.remove()


def _input_factor(a: torch.Tensor, layer: KroneckerLayer) -> torch.Tensor:
    """``A_in^T [a, 1]`` per sample (and position): (n, ..., p_in). A convolution's input
    enters as its patches, one position per output pixel: (n, L, p_in)."""
    if layer.embedding:  # the rows of A_out the ids pick: (n, ..., p_out), 0 for padding
        left = layer.a_out[a]
        if layer.padding_idx is not None:
            left = left * (a != layer.padding_idx).unsqueeze(-1).to(left.dtype)
        return left
    inp = layer.in_features
    a_in = layer.a_in.to(a.dtype)
    if layer.patches is not None:
        a = torch.nn.functional.unfold(a, **layer.patches).transpose(1, 2)  # (n, L, in kh kw)
    right = a @ a_in[:inp]
    return right + a_in[inp] if layer.bias_offset is not None else right


def _layer_feature(delta: torch.Tensor, right: torch.Tensor,
                   layer: KroneckerLayer) -> torch.Tensor:
    """``(A_out^T delta) (x) right`` per sample, summed over any positions between the batch
    and feature dimensions (for a convolution: over output pixels); (n, p_out * p_in). For an
    embedding, ``right`` is the rows of A_out its ids pick and delta meets A_in."""
    n = delta.shape[0]
    if layer.embedding:  # ``right`` holds the rows the ids pick; dy meets A_in
        left, right = right.to(delta.dtype), delta @ layer.a_in.to(delta.dtype)
        left, right = left.reshape(n, -1, left.shape[-1]), right.reshape(n, -1, right.shape[-1])
        return torch.einsum("ntq,ntp->nqp", left, right).reshape(n, -1)
    a_out = layer.a_out.to(delta.dtype)
    if layer.patches is not None:
        delta = delta.flatten(2).transpose(1, 2)  # (n, C_out, H, W) -> (n, L, C_out)
    left = delta @ a_out  # (n, ..., p_out)
    left, right = left.reshape(n, -1, left.shape[-1]), right.reshape(n, -1, right.shape[-1])
    return torch.einsum("ntq,ntp->nqp", left, right).reshape(n, -1)


@dataclass(frozen=True)
class Bar:
    """A progress bar: shown if ``enable`` (None: as ``iif.progress`` decides), with a label."""

    enable: bool | None = None
    desc: str = "features"


def _feature_chunks(fmodel: FunctionalModel, state, x: torch.Tensor, fn, args: tuple,
                    projector: Projector, chunk_size: int, x_per_copy: bool = False):
    """``(start, F)``: F (n, R, P) from :func:`projected_jacobians` at a ModelState, (B, n, R,
    P) from :func:`stacked_projected_jacobians` at a StackedState of B copies."""
    if isinstance(state, ModelState):
        return projected_jacobians(fmodel, state, x, fn, *args, projector=projector,
                                   chunk_size=chunk_size)
    return stacked_projected_jacobians(fmodel, state.params, state.buffers, x, fn, *args,
                                       projector=projector, chunk_size=chunk_size,
                                       x_per_copy=x_per_copy)


def step_features(
    fmodel: FunctionalModel,
    state,
    x: torch.Tensor,
    rho: torch.Tensor,
    rho_prev: torch.Tensor,
    task: Task,
    projector: Projector,
    chunk_size: int = 128,
    max_bytes: int = DEFAULT_MAX_FEATURE_BYTES,
    progress: bool | None | Bar = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected ``u`` and ``psi`` from one shared forward per sample.

    At a ModelState: ``rho``, ``rho_prev`` (N, d) give u, psi (N, P) each; ``rho_prev`` (B,
    N, d), the previous targets of B paths that share this model and ``rho`` (the first step
    of stacked per-test paths), gives ``psi`` (N, B, P) from the same forward. At a
    ``iif.engine.stacked.StackedState`` of B copies (the Kronecker fast path): ``rho``, ``rho_prev``
    (B, N, d) give u, psi (B, N, P) each. ``progress``: whether to show a bar, or a
    :class:`Bar`.
    """
    bar = progress if isinstance(progress, Bar) else Bar(progress)
    n = x.shape[0]
    many = isinstance(state, ModelState) and rho_prev.dim() == 3
    rows = 1 + (rho_prev.shape[0] if many else 1)
    lead = tuple(rho.shape[:-1])  # (N,) for one model, (B, N) for B copies
    u = _feature_buffer((*lead, projector.dim), rho.dtype, x.device, max_bytes // rows,
                        "path features")
    psi = _feature_buffer((*lead, *((rows - 1,) if many else ()), projector.dim), rho.dtype,
                          x.device, max_bytes * (rows - 1) // rows, "path features")
    if many:
        fn, args = loss_and_target_jvps(task), (rho, rho_prev.transpose(0, 1))
        # per-sample Jacobians hold rows x M values per sample: keep a chunk's memory
        chunk_size = max(1, chunk_size * 2 // rows)
    else:
        fn, args = path_step_fn(task), (rho, rho_prev)
    chunks = _feature_chunks(fmodel, state, x, fn, args, projector, chunk_size)
    for start, feats in progress_bar(chunks, total=n, desc=bar.desc, enable=bar.enable,
                                     unit="samples", size=lambda item: item[1].shape[-3]):
        stop = start + feats.shape[-3]
        u[..., start:stop, :] = feats[..., 0, :]
        if many:
            psi[start:stop] = feats[:, 1:]
        else:
            psi[..., start:stop, :] = feats[..., 1, :]
    return u, psi


def loss_features(
    fmodel: FunctionalModel,
    state,
    x: torch.Tensor,
    targets: torch.Tensor,
    task: Task,
    projector: Projector,
    chunk_size: int = 128,
    max_bytes: int = DEFAULT_MAX_FEATURE_BYTES,
    what: str | Bar = "per-sample gradients",
    measure: bool = False,
) -> torch.Tensor:
    """Projected per-sample loss gradients: (n, P) at a ModelState; at a
    ``iif.engine.stacked.StackedState`` of B copies, copy b's gradients of its own samples ``x[b]``,
    ``targets[b]`` ((B, n, ...) and (B, n, d)) -> (B, n, P). ``measure``: gradients of the
    task's measurement instead (the test gradients gamma; the test loss by default).
    ``what`` names them in errors; a :class:`Bar` also shows their progress under its label."""
    out = _feature_buffer((*targets.shape[:-1], projector.dim), targets.dtype, x.device,
                          max_bytes, "gradient features")
    fn = measurement_fn(task) if measure else sample_loss_fn(task)
    chunks = _feature_chunks(fmodel, state, x, fn, (targets,), projector,
                             chunk_size, x_per_copy=True)
    bar = what if isinstance(what, Bar) else Bar(False, what)
    return _fill(out, chunks, bar.desc, bar.enable)


def function_features(
    fmodel: FunctionalModel,
    state: ModelState,
    x: torch.Tensor,
    fn,
    *args: torch.Tensor,
    projector: Projector,
    chunk_size: int = 128,
    max_bytes: int = DEFAULT_MAX_FEATURE_BYTES,
    what: str = "output gradients",
    progress: bool | None = False,
) -> torch.Tensor:
    """Projected per-sample gradients (n, P) of one scalar ``fn(output_i, *args_i)`` per
    sample (e.g. TRAK's margin), in the model's dtype; ``what`` names them in errors."""
    n = x.shape[0]
    dtype = next(iter(state.params.values())).dtype
    out = _feature_buffer((n, projector.dim), dtype, x.device, max_bytes, what)
    chunks = projected_jacobians(fmodel, state, x, fn, *args, projector=projector,
                                 chunk_size=chunk_size)
    return _fill(out, chunks, what, progress)


def _fill(out: torch.Tensor, chunks, what: str, progress: bool | None = False
          ) -> torch.Tensor:
    """``out`` (..., n, P) filled with the first scalar's features of each ``(start, F)``
    chunk, F (..., n_chunk, R, P); errors name the features ``what``."""
    size = out.shape[-2]
    try:
        for start, feats in progress_bar(chunks, total=size, desc=what, enable=progress,
                                         unit="samples", size=lambda item: item[1].shape[-3]):
            out[..., start : start + feats.shape[-3], :] = feats[..., 0, :]
    except InputError as exc:
        raise InputError(str(exc).replace("per-sample gradients", what)) from None
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
    rank: int | None = None,
) -> torch.Tensor:
    """Rows ``A^T J_i^T L_i`` (N * r, P) whose Gram matrix / N is the Gauss-Newton matrix,
    with ``L_i`` the top-``rank`` factor of the output Hessian (all d for None)."""
    n = x.shape[0]
    outputs = fmodel.outputs(state, x)
    factors = ggn_factor(task, outputs, targets, rank)  # (N, d, r)
    d = factors.shape[-1]
    rows = _feature_buffer((n, d, projector.dim), targets.dtype, x.device, max_bytes,
                           "Gauss-Newton features")

    def contracted(o: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return o @ f  # (d,): column c is <f(x), L[:, c]>, so its gradient is J^T L[:, c]

    chunks = projected_jacobians(fmodel, state, x, contracted, factors, projector=projector,
                                 chunk_size=chunk_size)
    for start, feats in chunks:
        rows[start : start + feats.shape[0]] = feats
    return rows.reshape(n * d, projector.dim)


# ---- stacked model copies ---------------------------------------------------------------------
def can_stack_features(fmodel: FunctionalModel, state: ModelState, x: torch.Tensor,
                       projector: Projector) -> bool:
    """Whether :func:`stacked_projected_jacobians` applies: a Kronecker projector of a model
    whose parameters all sit in Linear or Conv2d layers that one forward calls once each."""
    return bool(getattr(projector, "all_params_in_layers", False)) and _single_use_layers(
        fmodel, state, x, projector)


def stacked_projected_jacobians(
    fmodel: FunctionalModel,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    fn,
    *args: torch.Tensor,
    projector: Projector,
    chunk_size: int = 128,
    x_per_copy: bool = False,
):
    """:func:`projected_jacobians` for B model copies at once (``params`` and ``buffers`` with
    a leading dimension B): yields ``(start, F)`` with F (B, n_chunk, R, P).

    ``x`` (n, ...) is shared by the copies, or (B, n, ...) with ``x_per_copy``; every arg is
    (B, n, ...). The Kronecker fast path runs as one function of a copy's parameters under
    ``vmap``: each projected layer's output gets a zero probe whose vector-Jacobian products are
    the layer's output gradients, and its input is returned beside the values, so the B
    copies' features come from B-wide matrix products instead of a loop over copies.
    """
    from torch.func import vjp

    layers = projector.layers
    modules = [layer.module for layer in layers]
    shapes: list[tuple[int, ...]] = []

    def record_shapes(index):
        def hook(module, inp, out):
            shapes.append((index, tuple(out.shape[1:])))
        return hook

    first = {k: v[0] for k, v in params.items()}, {k: v[0] for k, v in buffers.items()}
    handles = [m.register_forward_hook(record_shapes(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad(), module_mode(fmodel.module, False):
            fmodel(*first, (x[0] if x_per_copy else x)[:1])
    finally:
        for h in handles:
            h.remove()
    out_shapes = dict(shapes)

    def one_copy(p, b, xc, *ac):
        def forward(probes):
            inputs: list[torch.Tensor | None] = [None] * len(modules)

            def probe(index):
                def hook(module, inp, out):
                    inputs[index] = inp[0]
                    return out + probes[index]
                return hook

            handles = [m.register_forward_hook(probe(i)) for i, m in enumerate(modules)]
            try:
                out = fmodel(p, b, xc)
            finally:
                for h in handles:
                    h.remove()
            values = vmap(lambda o, *a: fn(o, *a).reshape(-1))(out, *ac)  # (n, R)
            return values, [a.detach() for a in inputs]

        n = xc.shape[0]
        # the parameters' dtype: the inputs may be integer token ids (an nn.Embedding)
        dtype = next(iter(p.values())).dtype
        probes = [torch.zeros((n, *out_shapes[i]), dtype=dtype, device=xc.device)
                  for i in range(len(modules))]
        values, pullback, inputs = vjp(forward, probes, has_aux=True)
        rights = [_input_factor(a, layer) for a, layer in zip(inputs, layers, strict=True)]
        feats = []
        for j in range(values.shape[1]):
            cotangent = torch.zeros_like(values)
            cotangent[:, j] = 1
            (deltas,) = pullback(cotangent)
            feats.append(torch.cat([_layer_feature(d, r, layer)
                                    for d, r, layer in zip(deltas, rights, layers,
                                                           strict=True)],
                                   dim=1))
        return torch.stack(feats, dim=1)  # (n, R, P)

    batched = vmap(one_copy, in_dims=(0, 0, 0 if x_per_copy else None) + (0,) * len(args))
    copies = next(iter(params.values())).shape[0]
    n_total = x.shape[1] if x_per_copy else x.shape[0]
    step = max(1, _fast_chunk(projector, fmodel, chunk_size, 2) // copies)
    with module_mode(fmodel.module, False):
        for start in range(0, n_total, step):
            stop = start + step
            xc = x[:, start:stop] if x_per_copy else x[start:stop]
            with quiet_attention_fallback():
                feats = batched(params, buffers, xc, *(a[:, start:stop] for a in args))
            _check_finite(feats, "per-sample gradients")
            yield start, feats.detach()
