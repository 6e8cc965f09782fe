"""Per-sample gradients from module hooks against a plain autograd loop, in float64.

The reference differentiates each sample's value on the module itself, one sample per forward,
with ``torch.autograd.grad`` (no ``torch.func``), flattened in ``FunctionalModel.names`` order.
"""

from __future__ import annotations

import ast
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from iif.engine import hooks
from iif.engine.functional import FunctionalModel
from iif.engine.hooks import hook_plan, hooked_jacobians
from iif.errors import InputError

RTOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the models are tiny: more threads only contend with the other processes on the machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, every parameter and running statistic drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.6)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen,
                                                 dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen,
                                               dtype=torch.float64) + 0.5)
    return model


def _sample(inputs, i: int):
    if isinstance(inputs, torch.Tensor):
        return (inputs[i : i + 1],), {}
    if isinstance(inputs, dict):
        return (), {k: v[i : i + 1] for k, v in inputs.items()}
    return tuple(v[i : i + 1] for v in inputs), {}


def _reference(model, names, inputs, fn, *args) -> torch.Tensor:
    """(N, R, M): each sample alone through the module in eval mode, one autograd.grad per
    value."""
    model = copy.deepcopy(model).eval()
    params = [model.get_parameter(n) for n in names]
    first = inputs if isinstance(inputs, torch.Tensor) else next(iter(
        inputs.values() if isinstance(inputs, dict) else inputs))
    rows = []
    for i in range(first.shape[0]):
        pos, kw = _sample(inputs, i)
        values = fn(model(*pos, **kw), *(a[i : i + 1] for a in args)).reshape(-1)
        rows.append(torch.stack([
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, params, retain_graph=True)])
            for v in values]))
    return torch.stack(rows)


def _hooked(model, inputs, fn, *args, chunk_size=4, params=None, buffers=None, check=True):
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    plan = hook_plan(model, fmodel.names)
    chunks = list(hooked_jacobians(model, fmodel.names, params or state.params,
                                   buffers or state.buffers, inputs, fn, *args,
                                   chunk_size=chunk_size, plan=plan, check=check))
    starts = [s for s, _ in chunks]
    assert starts == list(range(0, len(starts) * chunk_size, chunk_size))
    return torch.cat([j for _, j in chunks]), plan


def _agree(model, inputs, fn, *args, chunk_size=4):
    jac, plan = _hooked(model, inputs, fn, *args, chunk_size=chunk_size)
    ref = _reference(model, FunctionalModel(model).names, inputs, fn, *args)
    assert jac.shape == ref.shape
    assert float((jac - ref).norm()) <= RTOL * float(ref.norm()), plan.summary()
    return plan


def _squared(out, y):
    return ((out - y) ** 2).sum(-1)


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- models ------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Conv1d (stride, padding, dilation; even kernel with 'same' and groups), Conv2d (stride,
    padding, dilation; 'valid' with groups), BatchNorm, a Linear head; two positional inputs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2)
        self.c1s = nn.Conv1d(4, 4, 4, padding="same", groups=2)
        self.c2 = nn.Conv2d(1, 4, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.bn = nn.BatchNorm2d(4)
        self.c2v = nn.Conv2d(4, 6, 2, padding="valid", groups=2, bias=False)
        self.bn1 = nn.BatchNorm1d(10)
        self.head = nn.Linear(10, 3)

    def forward(self, seq, img):
        a = torch.tanh(self.c1s(torch.tanh(self.c1(seq)))).mean(-1)
        b = torch.tanh(self.c2v(torch.tanh(self.bn(self.c2(img))))).mean((-2, -1))
        return self.head(self.bn1(torch.cat([a, b], 1)))


class Residual(nn.Module):
    """A residual block written with in-place operations on hooked layers' outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        return self.head(torch.tanh(self.relu(out)).mean((-2, -1)))


class Bag(nn.Module):
    """Embeddings (one with padding_idx, one scaling by index counts), mean pooling, Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.freq = nn.Embedding(11, 4, scale_grad_by_freq=True)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids) + self.freq(ids)).mean(1))


class TiedTwice(nn.Module):
    """An embedding tied to the output Linear, and a Linear called twice per forward."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.mid = nn.Linear(5, 5)
        self.out = nn.Linear(5, 9, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.mid(self.emb(ids).mean(1)))
        return self.out(torch.tanh(self.mid(h)))


class Norms(nn.Module):
    """LayerNorms over one and over two trailing dimensions (one without bias) on sequences;
    a ReLU with inplace=True right after a hooked layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 6)
        self.ln = nn.LayerNorm(6)
        self.ln2 = nn.LayerNorm((2, 6), bias=False)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):  # (n, 2, 3)
        h = self.ln2(torch.tanh(self.ln(self.lin(x))))
        return self.head(F.relu(self.mid(h), inplace=True)).sum(1)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class Peek(nn.Module):
    """Reads a Linear's weight outside that Linear's forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)) + torch.tanh(x @ self.lin.weight.T) ** 2)


class SequenceFirst(nn.Module):
    """A Linear applied to (T, n, d): its dim 0 is not the batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (n, 3, 2)
        return self.head(torch.tanh(self.lin(x.transpose(0, 1))).mean(0))


class Positions(nn.Module):
    """Position embeddings looked up with (1, T) ids; ``pooled`` sums them over dim 0 first,
    which expanding that call over the batch would change."""

    def __init__(self, pooled: bool = False):
        super().__init__()
        self.pooled = pooled
        self.tok = nn.Embedding(7, 4)
        self.pos = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, ids):
        pos = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))
        if self.pooled:
            pos = pos.sum(0)
        return self.head(torch.tanh(self.tok(ids) + pos).mean(1))


# ---- agreement with the autograd loop ----------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 100])
def test_mlp_with_batchnorm(mlp_factory, regression_data, chunk_size):
    x, y = regression_data
    plan = _agree(mlp_factory(batchnorm=True), x, _squared, y, chunk_size=chunk_size)
    assert plan.route == "hooks"
    assert set(plan.hooked.values()) == {("linear",), ("batchnorm",)}


def test_two_values_per_sample(mlp_factory, regression_data):
    x, y = regression_data

    def two(out, target):
        return torch.stack([_squared(out, target), torch.sin(out).prod(-1)], 1)

    jac, _ = _hooked(mlp_factory(), x, two, y)
    assert jac.shape[1] == 2
    _agree(mlp_factory(), x, two, y)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_convolutions_and_batchnorm():
    gen = _gen()
    inputs = (torch.randn(7, 2, 9, generator=gen, dtype=torch.float64),
              torch.randn(7, 1, 6, 7, generator=gen, dtype=torch.float64))
    y = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    plan = _agree(_seeded(ConvNet()), inputs, _squared, y)
    assert plan.rest == []
    kinds = {k for ks in plan.hooked.values() for k in ks}
    assert kinds == {"conv1d", "conv2d", "batchnorm", "linear"}


def test_in_place_operations_after_hooked_layers():
    x = torch.randn(5, 3, 4, 4, generator=_gen(), dtype=torch.float64)
    plan = _agree(_seeded(Residual()), x, lambda out: out.sum(-1))
    assert plan.rest == []


def test_embeddings_padding_and_counts():
    ids = torch.randint(0, 11, (9, 6), generator=_gen())
    ids[:, -2:] = 0  # padding at the end of every sample, and counts above one
    ids[2, :4] = 3
    plan = _agree(_seeded(Bag()), ids, lambda out: torch.sin(out).sum(-1))
    assert plan.hooked == {"emb.weight": ("embedding",), "freq.weight": ("embedding",),
                           "head.weight": ("linear",), "head.bias": ("linear",)}


def test_tied_weights_and_a_layer_called_twice():
    model = _seeded(TiedTwice())
    ids = torch.randint(0, 9, (6, 4), generator=_gen())
    targets = torch.randint(0, 9, (6,), generator=_gen(2))
    plan = _agree(model, ids, lambda out, t: F.cross_entropy(out, t, reduction="none"), targets)
    assert plan.names == ["emb.weight", "mid.weight", "mid.bias"]
    assert plan.hooked["emb.weight"] == ("embedding", "linear")
    assert plan.rest == []


def test_layernorm_on_sequences():
    x = torch.randn(7, 2, 3, generator=_gen(), dtype=torch.float64)
    plan = _agree(_seeded(Norms()), x, lambda out: (out**3).sum(-1))
    assert plan.hooked["ln2.weight"] == ("layernorm",) and plan.rest == []


def test_recurrent_parameters_take_the_loop():
    x = torch.randn(6, 4, 3, generator=_gen(), dtype=torch.float64)
    plan = _agree(_seeded(Recurrent()), x, lambda out: torch.stack([out.sum(-1), out[:, 0]], 1))
    assert plan.route == "hooks+loop"
    assert plan.rest == [n for n, _ in Recurrent().named_parameters() if n.startswith("gru.")]
    assert "per-sample loop for 4" in plan.summary()


def _lm_loss(out, ids):
    logits = out.logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none")
    return torch.stack([loss.reshape(ids.shape[0], -1).mean(1), out.logits[:, -1, 0]], 1)


@pytest.mark.parametrize("padded", [False, True])
def test_gpt2(padded):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=13,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = _seeded(transformers.GPT2LMHeadModel(config))
    ids = torch.randint(0, 13, (5, 6), generator=_gen())
    inputs = ids
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        mask[3, 2:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
    plan = _agree(model, inputs, _lm_loss, ids, chunk_size=3)
    assert plan.rest == [] and plan.moved == {}
    assert plan.hooked["transformer.wte.weight"] == ("embedding", "linear")
    assert plan.hooked["transformer.h.0.attn.c_attn.weight"] == ("hf_conv1d",)


def test_bert_with_padding():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=12,
                                     max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = _seeded(transformers.BertForSequenceClassification(config))
    ids = torch.randint(1, 20, (5, 6), generator=_gen())
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    ids[mask == 0] = 0
    labels = torch.randint(0, 3, (5,), generator=_gen(2))
    plan = _agree(model, {"input_ids": ids, "attention_mask": mask},
                  lambda out, t: F.cross_entropy(out.logits, t, reduction="none"), labels)
    assert plan.rest == [] and plan.moved == {}


def test_parameters_and_buffers_come_from_the_arguments():
    model = _seeded(ConvNet())
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    params = {k: v + 0.1 for k, v in state.params.items()}
    buffers = {k: v + 0.1 if v.is_floating_point() else v for k, v in state.buffers.items()}
    gen = _gen()
    inputs = (torch.randn(5, 2, 9, generator=gen, dtype=torch.float64),
              torch.randn(5, 1, 6, 7, generator=gen, dtype=torch.float64))
    jac, _ = _hooked(model, inputs, lambda out: out.sum(-1), params=params, buffers=buffers)
    moved = copy.deepcopy(model)
    FunctionalModel(moved).load_into_module(type(state)(params, buffers))
    ref = _reference(moved, fmodel.names, inputs, lambda out: out.sum(-1))
    assert float((jac - ref).norm()) <= RTOL * float(ref.norm())
    assert all(torch.equal(p, state.params[n]) for n, p in model.named_parameters())


def test_a_hook_sees_the_swapped_weight_under_functional_call():
    lin = nn.Linear(3, 2)
    seen = []
    handle = lin.register_forward_hook(lambda m, a, o: seen.append(m.weight))
    weight = torch.zeros(2, 3)
    functional_call(lin, {"weight": weight}, (torch.ones(1, 3),))
    handle.remove()
    assert seen[0] is weight


# ---- what the checks move to the loop ----------------------------------------------------


def test_multihead_attention_takes_the_loop():
    x = torch.randn(5, 3, 4, generator=_gen(), dtype=torch.float64)
    plan = _agree(_seeded(Attention()), x, lambda out: out.sum(-1))
    assert plan.rest == [n for n, _ in Attention().named_parameters() if n.startswith("attn.")]
    assert plan.moved == {}


def test_a_weight_read_outside_its_layer_moves_to_the_loop():
    x = torch.randn(7, 3, generator=_gen(), dtype=torch.float64)
    plan = _agree(_seeded(Peek()), x, lambda out: (out**2).sum(-1))
    assert list(plan.moved) == ["lin.weight"]
    assert plan.rest == ["lin.weight"]
    assert "moved to the loop" in plan.summary()


@pytest.mark.parametrize("chunk_size", [3, 4])
def test_a_sequence_first_layer_moves_to_the_loop(chunk_size):
    # chunks of 3 hold as many samples as positions: only the sample check can tell
    x = torch.randn(7, 3, 2, generator=_gen(), dtype=torch.float64)
    plan = _agree(_seeded(SequenceFirst()), x, lambda out: out.prod(-1), chunk_size=chunk_size)
    assert set(plan.moved) == {"lin.weight", "lin.bias"}


@pytest.mark.parametrize("pooled", [False, True])
def test_one_row_calls_are_expanded_over_the_batch(pooled):
    ids = torch.randint(0, 7, (6, 5), generator=_gen())
    plan = _agree(_seeded(Positions(pooled)), ids, lambda out: out.sum(-1))
    assert list(plan.moved) == (["pos.weight"] if pooled else [])


def test_a_failing_forward_leaves_the_plan_as_it_was():
    model = _seeded(Positions())
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    plan = hook_plan(model, fmodel.names)
    ids = torch.randint(0, 7, (6, 5), generator=_gen())

    def failing(out):
        raise ValueError("no value")

    with pytest.raises(ValueError, match="no value"):
        list(hooked_jacobians(model, fmodel.names, state.params, state.buffers, ids, failing,
                              plan=plan))
    assert plan.moved == {} and plan.rest == [] and not plan.checked
    list(hooked_jacobians(model, fmodel.names, state.params, state.buffers, ids,
                          lambda out: out.sum(-1), plan=plan))
    assert plan.checked and plan.moved == {}


# ---- state left behind, bad input --------------------------------------------------------


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_and_flags_are_restored():
    model = _seeded(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4),
                                  nn.Tanh(), nn.Linear(4, 2)))
    model.train()
    model[2].eval()
    flags = [m.training for m in model.modules()]
    x = torch.randn(6, 3, generator=_gen(), dtype=torch.float64)
    stats = model[2].running_mean.clone()
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    chunks = hooked_jacobians(model, fmodel.names, state.params, state.buffers, x,
                              lambda out: out.sum(-1), chunk_size=4)
    _, first = next(chunks)  # between chunks nothing is left on the module
    assert _hook_count(model) == 0 and [m.training for m in model.modules()] == flags
    jac = torch.cat([first] + [j for _, j in chunks])
    assert jac.shape == (6, 1, fmodel.num_params)
    assert _hook_count(model) == 0 and [m.training for m in model.modules()] == flags
    assert torch.equal(model[2].running_mean, stats)
    # eval mode: dropout off, so the result is the loop's in eval mode
    _agree(model, x, lambda out: out.sum(-1))

    def failing(out):
        raise ValueError("no value")

    with pytest.raises(ValueError, match="no value"):
        list(hooked_jacobians(model, fmodel.names, state.params, state.buffers, x, failing))
    assert _hook_count(model) == 0 and [m.training for m in model.modules()] == flags
    with pytest.raises(RuntimeError):
        list(hooked_jacobians(model, fmodel.names, state.params, state.buffers, x[:, :2],
                              lambda out: out.sum(-1)))
    assert _hook_count(model) == 0 and [m.training for m in model.modules()] == flags


def test_bad_input_is_refused(mlp_factory, regression_data):
    x, y = regression_data
    model = mlp_factory()
    fmodel = FunctionalModel(model)
    state = fmodel.state()

    def run(inputs, fn, *args):
        return list(hooked_jacobians(model, fmodel.names, state.params, state.buffers, inputs,
                                     fn, *args))

    with pytest.raises(InputError, match="fn must return"):
        run(x, lambda out: out.unsqueeze(-1))
    with pytest.raises(InputError, match="fn must return"):
        run(x, lambda out: out.sum())
    with pytest.raises(InputError, match="first dimension"):
        run(x, _squared, y[:3])
    no_stats = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(InputError, match="running statistics"):
        hook_plan(no_stats, ["0.weight"])


def test_an_input_changed_in_place_after_its_layer_is_refused():
    class Overwrite(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            h = x * 1.0
            out = self.lin(h)
            h.mul_(2.0)
            return out

    model = _seeded(Overwrite())
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    x = torch.randn(4, 3, generator=_gen(), dtype=torch.float64)
    with pytest.raises(InputError, match="in place"):
        list(hooked_jacobians(model, fmodel.names, state.params, state.buffers, x,
                              lambda out: out.sum(-1)))


def test_plan_without_transformers(monkeypatch):
    source = Path(hooks.__file__).read_text()
    imported = [a.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                for a in node.names]
    imported += [node.module for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom) and node.module]
    assert not [m for m in imported if m.split(".")[0] == "transformers"]
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "transformers.pytorch_utils", None)
    plan = hook_plan(nn.Linear(2, 1), ["weight", "bias"])
    assert plan.route == "hooks"
