"""Seeded random projections: determinism, linearity, scaling and inner-product preservation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from iif.engine.projection import (
    IdentityProjector,
    ProjectionSettings,
    RandomProjector,
    make_projector,
)
from iif.errors import InputError

M = 300


def _vectors(n, m=M, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=gen, dtype=torch.float64)


def _matrix(projector):
    """The M x P matrix A, recovered by projecting the identity."""
    return projector.project(torch.eye(projector.num_params, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("block_elements", [64, 1 << 22])
def test_same_seed_same_projection(kind, block_elements):
    settings = ProjectionSettings(dim=16, kind=kind, seed=5, block_elements=block_elements)
    g = _vectors(4)
    a = RandomProjector(M, settings).project(g)
    b = RandomProjector(M, ProjectionSettings(**settings.to_dict())).project(g)
    assert a.shape == (4, 16)
    assert torch.equal(a, b)
    # Applying the same projector twice regenerates the same blocks.
    p = RandomProjector(M, settings)
    assert torch.equal(p.project(g), p.project(g))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_different_seed_different_projection(kind):
    g = _vectors(4)
    a = RandomProjector(M, ProjectionSettings(dim=16, kind=kind, seed=0)).project(g)
    b = RandomProjector(M, ProjectionSettings(dim=16, kind=kind, seed=1)).project(g)
    assert not torch.allclose(a, b)


def test_blocks_are_seeded_independently():
    settings = ProjectionSettings(dim=8, seed=3, block_elements=8 * 10)
    p = RandomProjector(M, settings)
    assert len(p.blocks) == 30
    assert p.blocks[0] == (0, 10)
    assert p.blocks[-1] == (290, 300)
    assert not torch.equal(p.block(0), p.block(1))
    assert torch.equal(p.block(7), p.block(7))


def test_uneven_last_block():
    settings = ProjectionSettings(dim=8, seed=3, block_elements=8 * 7)
    p = RandomProjector(M, settings)
    assert sum(hi - lo for lo, hi in p.blocks) == M
    assert p.blocks[-1] == (294, 300)
    a = _matrix(p)
    assert a.shape == (M, 8)


@pytest.mark.parametrize("block_elements", [8 * 7, 1 << 22])
def test_project_is_multiplication_by_the_assembled_blocks(block_elements):
    settings = ProjectionSettings(dim=8, seed=2, block_elements=block_elements)
    p = RandomProjector(M, settings, dtype=torch.float64)
    a = torch.cat([p.block(i) for i in range(len(p.blocks))])
    assert a.shape == (M, 8)
    g = _vectors(5)
    torch.testing.assert_close(p.project(g), g @ a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_project_is_linear(kind):
    p = RandomProjector(M, ProjectionSettings(dim=12, kind=kind, seed=4, block_elements=100))
    u, v = _vectors(3, seed=1), _vectors(3, seed=2)
    torch.testing.assert_close(
        p.project(2.5 * u - 0.5 * v), 2.5 * p.project(u) - 0.5 * p.project(v),
        rtol=1e-12, atol=1e-12,
    )


def test_project_keeps_leading_dimensions_and_dtype():
    p = RandomProjector(M, ProjectionSettings(dim=6, seed=1, block_elements=50))
    g = torch.randn(2, 3, M, dtype=torch.float64)
    out = p.project(g)
    assert out.shape == (2, 3, 6)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[1], p.project(g[1]), rtol=1e-12, atol=1e-12)
    assert p.project(g.float()).dtype == torch.float32


def test_rademacher_entries():
    dim = 25
    settings = ProjectionSettings(dim=dim, kind="rademacher", seed=7, block_elements=dim * 40)
    a = _matrix(RandomProjector(M, settings, dtype=torch.float64))
    assert torch.equal(a.abs(), torch.full_like(a, dim ** -0.5))
    a32 = torch.cat([RandomProjector(M, settings).block(i) for i in range(8)])
    assert a32.dtype == torch.float32
    assert torch.equal(a32.abs(), torch.full_like(a32, dim ** -0.5))
    frac_pos = float((a > 0).double().mean())
    assert 0.45 < frac_pos < 0.55
    # Rows have squared norm exactly one: diag(A A^T) = 1.
    torch.testing.assert_close((a * a).sum(1), torch.ones(M, dtype=torch.float64))


def test_gaussian_entries_have_variance_one_over_dim():
    dim = 50
    a = _matrix(RandomProjector(M, ProjectionSettings(dim=dim, seed=1)))
    assert abs(float(a.mean())) < 0.01
    assert abs(float(a.var()) * dim - 1.0) < 0.03


def _gram_error(kind, dim, u, seeds):
    """Root-mean-square relative Frobenius error of the projected Gram matrix over seeds."""
    exact = u @ u.T
    errs = []
    for seed in seeds:
        p = RandomProjector(u.shape[1], ProjectionSettings(dim=dim, kind=kind, seed=seed),
                            dtype=torch.float64)
        f = p.project(u)
        errs.append(float(torch.linalg.norm(f @ f.T - exact) ** 2 / torch.linalg.norm(exact) ** 2))
    return (sum(errs) / len(errs)) ** 0.5


def _gaussian_gram_error(u, dim):
    """Expected RMS relative error for Gaussian A: Var<A^T u, A^T v> = (<u,v>^2 + |u|^2|v|^2)/P."""
    g = u @ u.T
    sq = torch.diagonal(g)
    var = (g**2 + sq[:, None] * sq[None, :]).sum() / dim
    return float(var.sqrt() / torch.linalg.norm(g))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_inner_products_preserved_with_shrinking_error(kind):
    u = _vectors(20, seed=11)
    dims = [16, 128, 1024]
    errors = [_gram_error(kind, dim, u, seeds=range(6)) for dim in dims]
    # Johnson-Lindenstrauss: the error scales like 1/sqrt(P), a factor ~2.8 per 8x.
    for small, large in zip(errors, errors[1:], strict=False):
        assert large < small / 2
    for dim, err in zip(dims, errors, strict=True):
        expected = _gaussian_gram_error(u, dim)
        assert 0.6 * expected < err < 1.4 * expected


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_inner_products_unbiased(kind):
    u, v = _vectors(1, seed=21)[0], _vectors(1, seed=22)[0]
    exact = float(u @ v)
    estimates = []
    for seed in range(200):
        p = RandomProjector(M, ProjectionSettings(dim=8, kind=kind, seed=seed),
                            dtype=torch.float64)
        pu, pv = p.project(torch.stack([u, v]))
        estimates.append(float(pu @ pv))
    mean = sum(estimates) / len(estimates)
    # Standard error of the mean: sqrt((<u,v>^2 + |u|^2|v|^2) / P / n_seeds).
    se = ((exact**2 + float(u @ u) * float(v @ v)) / 8 / len(estimates)) ** 0.5
    assert abs(mean - exact) < 4 * se


def test_identity_projector_returns_input():
    p = make_projector(M, ProjectionSettings(dim=None), "cpu", torch.float64)
    assert isinstance(p, IdentityProjector)
    assert p.dim == M
    g = _vectors(3)
    assert torch.equal(p.project(g), g)


def test_make_projector_random():
    p = make_projector(M, ProjectionSettings(dim=10, seed=0), "cpu", torch.float64)
    assert isinstance(p, RandomProjector)
    assert p.dim == 10
    assert p.dtype == torch.float64


@pytest.mark.parametrize("size", [M - 1, M + 1])
def test_wrong_vector_size(size):
    p = RandomProjector(M, ProjectionSettings(dim=4))
    with pytest.raises(InputError, match="size"):
        p.project(torch.zeros(2, size))


def test_random_projector_needs_a_dim():
    with pytest.raises(InputError, match="dim"):
        RandomProjector(M, ProjectionSettings(dim=None))


@pytest.mark.parametrize("dim", [0, -3])
def test_invalid_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        ProjectionSettings(dim=dim)


def test_invalid_kind():
    with pytest.raises(ValueError, match="kind"):
        ProjectionSettings(dim=4, kind="sparse")  # type: ignore[arg-type]


@pytest.mark.parametrize("dim", [0, 2.5, True, "8"])
def test_projection_dim_must_be_a_positive_integer(dim):
    with pytest.raises(ValueError, match="integer"):
        ProjectionSettings(dim=dim)


# ---- Kronecker-factored projection of Linear and Conv2d layers -------------------------------
def _kron_model(batchnorm: bool = False):
    from torch import nn

    from iif.engine.functional import FunctionalModel

    torch.manual_seed(0)
    layers = [nn.Linear(6, 5)] + ([nn.BatchNorm1d(5)] if batchnorm else []) + [
        nn.Tanh(), nn.Linear(5, 3, bias=False)]
    return FunctionalModel(nn.Sequential(*layers).double())


def _two_values(out, ti):
    """Two scalars per sample: a linear and a quadratic function of its output."""
    return torch.stack([(out * ti).sum(), (out ** 2).sum()])


def _fast_and_slow(fmodel, state, x, t, p, chunk_size):
    """The Kronecker fast path's features of ``_two_values`` and the same from per-sample
    Jacobians projected one by one."""
    from iif.engine.features import projected_jacobians
    from iif.engine.grads import per_sample_jacobians

    fast = torch.cat([f for _, f in projected_jacobians(fmodel, state, x, _two_values, t,
                                                        projector=p, chunk_size=chunk_size)])
    slow = torch.cat([p.project(j) for _, j in per_sample_jacobians(
        fmodel, state, x, _two_values, t, chunk_size=chunk_size)])
    return fast, slow


def _kron(fmodel, dim, seed=0, kind="gaussian"):
    """The Kronecker projector itself, also at the model's full size (where make_projector
    would use the exact gradients instead)."""
    from iif.engine.projection import KroneckerProjector

    settings = ProjectionSettings(dim=dim, seed=seed, kind=kind, structure="kronecker")
    return KroneckerProjector(fmodel, settings, device="cpu", dtype=torch.float64)


def test_kronecker_projects_a_layer_gradient_as_a_kronecker_product():
    """A rank-one layer gradient delta [a, 1]^T maps to (A_out^T delta) (x) (A_in^T [a, 1])."""
    fmodel = _kron_model()
    p = _kron(fmodel, 24)
    gen = torch.Generator().manual_seed(1)
    delta, a = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(
        6, generator=gen, dtype=torch.float64)
    flat = torch.zeros(fmodel.num_params, dtype=torch.float64)
    flat[:30] = torch.outer(delta, a).reshape(-1)  # first layer weight, then its bias
    flat[30:35] = delta
    layer = p.layers[0]
    a_out, a_in = layer.a_out, layer.a_in
    assert (layer.weight_offset, layer.out_features, layer.in_features,
            layer.bias_offset) == (0, 5, 6, 30)
    expected = torch.kron(a_out.T @ delta, a_in.T @ torch.cat([a, torch.ones(1).double()]))
    got = p.project(flat[None])[0]
    first = a_out.shape[1] * a_in.shape[1]
    torch.testing.assert_close(got[:first], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[first:], torch.zeros(p.dim - first, dtype=torch.float64))
    assert p.dim <= 24 and p.project(torch.zeros(2, 3, fmodel.num_params).double()).shape == (
        2, 3, p.dim)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_kronecker_inner_products_are_unbiased(kind):
    fmodel = _kron_model()
    u, v = _vectors(2, m=fmodel.num_params, seed=5)
    exact = float(u @ v)
    estimates = []
    for seed in range(300):
        pu, pv = _kron(fmodel, 16, seed, kind).project(torch.stack([u, v]))
        estimates.append(float(pu @ pv))
    est = torch.tensor(estimates)
    assert abs(float(est.mean()) - exact) < 4 * float(est.std()) / len(estimates) ** 0.5


def test_kronecker_distortion_is_comparable_to_dense_at_equal_dim():
    """Relative error of squared norms: shrinks with P and stays within 3x of a dense
    projection to the same number of dimensions."""
    fmodel = _kron_model()
    u = _vectors(30, m=fmodel.num_params, seed=7)
    norms = (u * u).sum(1)

    def error(make):
        errs = [((make(seed).project(u) ** 2).sum(1) / norms - 1).pow(2).mean()
                for seed in range(20)]
        return float(torch.stack(errs).mean()) ** 0.5

    kron = {d: error(lambda s, d=d: _kron(fmodel, d, s)) for d in (4, 16, 36)}
    dense = {d: error(lambda s, d=d: RandomProjector(
        fmodel.num_params, ProjectionSettings(dim=_kron(fmodel, d).dim, seed=s),
        dtype=torch.float64)) for d in (4, 16, 36)}
    assert kron[36] < kron[16] < kron[4]
    for d in kron:
        assert kron[d] < 3 * dense[d]


def test_kronecker_projects_other_parameters_densely():
    fmodel = _kron_model(batchnorm=True)  # BatchNorm weight and bias are not Linear
    p = _kron(fmodel, 30)
    assert p.rest is not None and p.rest_index.numel() == 10
    flat = torch.zeros(fmodel.num_params, dtype=torch.float64)
    flat[p.rest_index] = torch.arange(1.0, 11.0, dtype=torch.float64)
    got = p.project(flat[None])[0]
    torch.testing.assert_close(got[-p.rest.dim:], p.rest.project(flat[p.rest_index][None])[0])
    torch.testing.assert_close(got[: -p.rest.dim], torch.zeros(p.dim - p.rest.dim).double())


def test_kronecker_needs_the_model_and_a_valid_structure():
    with pytest.raises(InputError, match="needs the model"):
        make_projector(M, ProjectionSettings(dim=8, structure="kronecker"), "cpu",
                       torch.float64)
    with pytest.raises(InputError, match="structure"):
        ProjectionSettings(dim=8, structure="sparse")
    with pytest.raises(InputError, match="below the number"):
        _kron(_kron_model(), 1)


@pytest.mark.parametrize("activation", ["tanh", "inplace-relu"])
def test_kronecker_fast_path_equals_projected_per_sample_gradients(activation):
    """Features built from layer inputs and output gradients (hooks) equal projecting the
    per-sample Jacobians, for two scalars per sample and inputs with a position dimension;
    also when an in-place activation follows a layer (it must not overwrite the recorded
    output)."""
    from torch import nn

    from iif.engine.functional import FunctionalModel

    torch.manual_seed(3)
    act = nn.Tanh() if activation == "tanh" else nn.ReLU(inplace=True)
    model = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 3)).double()
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    p = _kron(fmodel, 20, seed=2)
    assert p.all_params_in_layers
    gen = torch.Generator().manual_seed(4)
    for x in (torch.randn(7, 4, generator=gen, dtype=torch.float64),
              torch.randn(7, 5, 4, generator=gen, dtype=torch.float64)):  # positions
        t = torch.randn(7, x[0].numel() // 4 * 3, generator=gen, dtype=torch.float64)

        fast, slow = _fast_and_slow(fmodel, state, x, t, p, chunk_size=3)
        assert fast.shape == (7, 2, p.dim)
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def test_kronecker_fast_path_is_skipped_for_shared_layers():
    from torch import nn

    from iif.engine.features import _single_use_layers
    from iif.engine.functional import FunctionalModel

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 3).double()

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    fmodel = FunctionalModel(Twice())
    p = _kron(fmodel, 9)
    assert p.all_params_in_layers
    assert not _single_use_layers(fmodel, fmodel.state(), torch.zeros(2, 3).double(), p)


def test_kronecker_at_full_size_reconstructs_per_sample_gradients_exactly():
    """With square factors (P = out x (in + 1)) nothing is lost: identity factors give the
    per-sample gradient [dW | db] itself, and the seeded random factors give it back through
    their inverses, on the fast path that never forms the gradient."""
    from torch import nn

    from iif.engine.features import loss_features
    from iif.engine.functional import FunctionalModel
    from iif.engine.grads import per_sample_grads
    from iif.task.task import Task

    torch.manual_seed(4)
    model = nn.Linear(6, 5).double()
    task = Task(model, "regression")
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    t = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    grads = per_sample_grads(fmodel, state, x, t, task)  # (9, 35): weight then bias
    stacked = torch.cat([grads[:, :30].reshape(9, 5, 6), grads[:, 30:, None]], dim=2)
    p = _kron(fmodel, 35)
    a_out, a_in = p.layers[0].a_out, p.layers[0].a_in
    assert p.dim == 35 and a_out.shape == (5, 5) and a_in.shape == (7, 7)
    feats = loss_features(fmodel, state, x, t, task, p).reshape(9, 5, 7)
    back = torch.linalg.solve(a_out.T, feats) @ torch.linalg.inv(a_in)
    torch.testing.assert_close(back, stacked, rtol=1e-9, atol=1e-10)
    p.layers[0] = dataclasses.replace(p.layers[0], a_out=torch.eye(5).double(),
                                      a_in=torch.eye(7).double())
    torch.testing.assert_close(loss_features(fmodel, state, x, t, task, p).reshape(9, 5, 7),
                               stacked, rtol=1e-12, atol=1e-12)


def test_kronecker_fast_path_for_convolutions_equals_projected_per_sample_gradients():
    """Conv2d layers (stride, padding, dilation, with and without bias) enter the fast path
    through their input patches; features equal projecting the per-sample Jacobians, one copy
    at a time and for stacked copies."""
    from torch import nn

    from iif.engine.features import stacked_projected_jacobians
    from iif.engine.functional import FunctionalModel
    from iif.engine.stacked import StackedState

    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(3, 4, 2, dilation=2, bias=False), nn.Tanh(), nn.Flatten(),
        nn.Linear(16, 3)).double()
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    p = _kron(fmodel, 40, seed=3)
    assert p.all_params_in_layers
    assert [layer.patches is not None for layer in p.layers] == [True, True, False]
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 2, 7, 7, generator=gen, dtype=torch.float64)
    t = torch.randn(5, 3, generator=gen, dtype=torch.float64)

    fast, slow = _fast_and_slow(fmodel, state, x, t, p, chunk_size=2)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    copies = StackedState.stack([state, state])
    both = torch.cat([f for _, f in stacked_projected_jacobians(
        fmodel, copies.params, copies.buffers, x, _two_values, torch.stack([t, 2 * t]),
        projector=p,
        chunk_size=4)], dim=1)
    torch.testing.assert_close(both[0], slow, rtol=1e-10, atol=1e-12)


def test_kronecker_layers_name_their_module_shapes_offsets_and_factors():
    """Each KroneckerLayer of a Linear + Conv2d model says, by name, which module it is, the
    shape of its gradient matrix, where its weight and bias sit in the flat vector and the
    shapes of its factors; the projector's dim is the sum of the layers' p_out * p_in."""
    from torch import nn

    from iif.engine.functional import FunctionalModel
    from iif.engine.projection import KroneckerLayer

    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(3, 4, 2, dilation=2, bias=False), nn.Tanh(), nn.Flatten(),
        nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()
    fmodel = FunctionalModel(model)
    p = _kron(fmodel, 60, seed=1)
    offsets = dict(zip(fmodel.names, torch.tensor([0, *fmodel.sizes]).cumsum(0).tolist(),
                       strict=False))
    modules = [model[0], model[2], model[5], model[7]]
    names = ["0", "2", "5", "7"]
    assert p.all_params_in_layers and p.rest is None
    assert [layer.module for layer in p.layers] == modules
    for layer, module, name in zip(p.layers, modules, names, strict=True):
        assert isinstance(layer, KroneckerLayer)
        weight = module.weight
        assert layer.weight_offset == offsets[f"{name}.weight"]
        assert layer.out_features == weight.shape[0]
        assert layer.in_features == weight[0].numel()  # in, or in_channels x kh x kw
        assert layer.out_features * layer.in_features == weight.numel()
        has_bias = module.bias is not None
        assert layer.bias_offset == (offsets[f"{name}.bias"] if has_bias else None)
        assert layer.a_out.shape == (layer.out_features, layer.p_out)
        assert layer.a_in.shape == (layer.in_features + has_bias, layer.p_in)
        assert layer.dim == layer.p_out * layer.p_in
        if isinstance(module, nn.Conv2d):
            assert layer.patches == {"kernel_size": module.kernel_size,
                                     "dilation": module.dilation,
                                     "padding": module.padding, "stride": module.stride}
            assert layer.out_features == module.out_channels
            assert layer.in_features == (module.in_channels * module.kernel_size[0]
                                         * module.kernel_size[1])
        else:
            assert layer.patches is None
            assert (layer.out_features, layer.in_features) == (module.out_features,
                                                               module.in_features)
    assert p.dim == sum(layer.dim for layer in p.layers)
    # the first conv's 3 x (2 * 3 * 2) weight at 0, its bias at 36; the second's 4 x (3 * 2 * 2)
    assert [(lay.weight_offset, lay.out_features, lay.in_features, lay.bias_offset)
            for lay in p.layers[:2]] == [(0, 3, 12, 36), (39, 4, 12, None)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.layers[0].out_features = 7  # type: ignore[misc]


def test_kronecker_says_why_its_dim_differs_from_the_dim_asked_for(caplog):
    fmodel = _kron_model(batchnorm=True)
    with caplog.at_level("INFO", logger="iif.engine.projection"):
        p = _kron(fmodel, 30)
    assert p.dim != 30  # whole p_out x p_in blocks rarely add up to the dim asked for
    lines = [r.getMessage() for r in caplog.records if "kronecker projection" in r.getMessage()]
    assert len(lines) == 1
    shapes = ", ".join(f"{layer.p_out}x{layer.p_in}" for layer in p.layers)
    assert f"dim 30 shared by {len(p.layers) + 1} blocks" in lines[0]
    assert f"({shapes} + {p.rest.dim} other parameters) gives {p.dim} values" in lines[0]


def test_kronecker_projects_gpt2_conv1d_layers_as_their_transposed_weights():
    """GPT-2's blocks are ``transformers`` ``Conv1D`` layers (weight stored (in, out)) and its
    only Linear, the head, is tied to the token embedding: the Conv1D layers are projected as
    Kronecker layers, the fast path (hooks) equals projecting the per-sample Jacobians, and the
    tied head's weight is projected once, with the other parameters."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    from iif.engine.functional import FunctionalModel
    from iif.task.task import Task

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=13,
                                       n_positions=8, attn_implementation="eager"))
    model = model.double().eval()
    task = Task(model, "sequence")
    fmodel = FunctionalModel(model, task.output)
    state = fmodel.state()
    p = _kron(fmodel, 64, seed=1)
    conv1d = [layer for layer in p.layers if not layer.embedding]
    assert [layer.transposed for layer in conv1d] == [True] * 4  # c_attn, c_proj, c_fc, ...
    assert "lm_head.weight" not in fmodel.names and p.rest is not None
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 13, (5, 6), generator=gen)
    t = torch.randn(5, 6 * 13, generator=gen, dtype=torch.float64)

    fast, slow = _fast_and_slow(fmodel, state, x, t, p, chunk_size=2)
    assert fast.shape == (5, 2, p.dim)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_name", ["pooled", "bert", "gpt2"])
def test_kronecker_projects_embeddings_from_the_rows_their_ids_pick(model_name):
    """An nn.Embedding is a Kronecker layer: its projected gradient is built from the rows of
    A_out the sample's ids pick (none for padding_idx) and A_in^T of its output gradients,
    equal to projecting its per-sample gradient; a weight tied to another module (GPT-2's
    token embedding and head) is projected with the other parameters instead."""
    from torch import nn

    from iif.engine.functional import FunctionalModel

    torch.manual_seed(0)
    if model_name == "pooled":
        class Pooled(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(11, 5, padding_idx=0)
                self.head = nn.Linear(5, 3)

            def forward(self, ids):
                return self.head(self.emb(ids).mean(dim=1))

        model, output = Pooled().double().eval(), None
    else:
        transformers = pytest.importorskip("transformers")
        if model_name == "bert":
            cfg = transformers.BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=12,
                                          max_position_embeddings=8, num_labels=3)
            model = transformers.BertForSequenceClassification(cfg)
        else:
            cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11,
                                          n_positions=8)
            model = transformers.GPT2LMHeadModel(cfg)
        model, output = model.double().eval(), None
    fmodel = FunctionalModel(model, output)
    state = fmodel.state()
    p = _kron(fmodel, 96, seed=3)
    embeddings = [layer for layer in p.layers if layer.embedding]
    assert embeddings
    if model_name == "gpt2":  # wte is tied to lm_head: not a Kronecker layer
        assert all(layer.module is not model.transformer.wte for layer in p.layers)
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 11, (5, 6), generator=gen)
    x[1, 4:] = 0  # padding ids
    out_dim = fmodel.outputs(state, x[:1]).shape[1]
    t = torch.randn(5, out_dim, generator=gen, dtype=torch.float64)

    fast, slow = _fast_and_slow(fmodel, state, x, t, p, chunk_size=2)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
