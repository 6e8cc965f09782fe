"""Samples with several inputs: ``Inputs`` behaves as a tensor of samples where the engine
handles inputs (indexing, joining, vmap, devices), dictionary and tuple batches keep every
input, and what the model cannot take is refused or named."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.func import vmap
from torch.utils.data import DataLoader, Dataset, TensorDataset

from iif.engine.functional import FunctionalModel
from iif.errors import InputError
from iif.results.runkey import data_digest, tensor_digest
from iif.task.data import Streamed
from iif.task.inputs import Inputs, call_model, joined_inputs
from iif.task.task import Task


def _inputs(n: int = 5) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    return Inputs(kwargs={"input_ids": torch.randint(0, 9, (n, 4), generator=gen),
                          "attention_mask": torch.ones(n, 4, dtype=torch.long),
                          "scale": torch.rand(n, generator=gen, dtype=torch.float64)})


def _same(a: Inputs, b: Inputs) -> None:
    assert a.structure() == b.structure()
    for (ka, ta), (kb, tb) in zip(a.named(), b.named(), strict=True):
        assert ka == kb
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), ka


# ---- the tensor-like protocol ----------------------------------------------------------------
def test_every_input_needs_one_row_per_sample():
    with pytest.raises(InputError, match="input 'attention_mask' holds 3 samples, input "
                                         "'input_ids' 5"):
        Inputs(kwargs={"input_ids": torch.zeros(5, 2), "attention_mask": torch.zeros(3, 2)})
    with pytest.raises(InputError, match="positional input 1 is a scalar"):
        Inputs((torch.zeros(2, 1), torch.tensor(1.0)))
    with pytest.raises(InputError, match="single input"):
        Inputs((torch.zeros(2, 1),))
    one = torch.zeros(4, 3)
    assert joined_inputs([one]) is one  # one input stays a plain tensor
    assert joined_inputs(kwargs={"x": one}) is one


def test_the_main_input_gives_the_shape_and_kind():
    x = _inputs()
    assert x.main_key == "input_ids" and len(x) == 5
    assert x.shape == (5, 4) and x.ndim == 2 and x.dtype == torch.int64
    assert not x.is_floating_point() and x.device == torch.device("cpu")
    both = Inputs((torch.zeros(3, 7, dtype=torch.float64),), {"input_ids": torch.zeros(3, 2)})
    assert both.main_key == 0 and both.shape == (3, 7) and both.is_floating_point()
    assert Inputs(kwargs={"b": torch.zeros(2, 1), "c": torch.zeros(2)}).main_key == "b"


@pytest.mark.parametrize("index", [slice(1, 4), torch.tensor([4, 0, 2]),
                                   torch.tensor([[1, 2], [3, 0]]), 3, (slice(None), None)])
def test_an_index_applies_to_every_input(index):
    x = _inputs()
    got = x[index]
    for key, t in x.named():
        assert torch.equal(dict(got.named())[key], t[index]), key


def test_chunks_join_back_and_stack():
    x = _inputs(7)
    _same(torch.cat([x[:3], x[3:5], x[5:]]), x)
    _same(Inputs.cat([x[:2], x[2:]]), x)
    stacked = torch.stack([x[:3], x[3:6]])
    assert stacked.shape == (2, 3, 4)
    _same(stacked[1], x[3:6])
    other = Inputs(kwargs={"input_ids": torch.zeros(2, 4), "mask": torch.zeros(2, 4)})
    with pytest.raises(InputError, match="do not match"):
        torch.cat([x[:2], other])
    longer = x.map(lambda t: torch.cat([t, t], 1) if t.ndim == 2 else t)
    with pytest.raises(RuntimeError, match="input 'input_ids'"):
        torch.cat([x[:2], longer[:2]])


def test_devices_dtypes_and_dimensions():
    x = _inputs()
    half = x.to(torch.float32)  # floating point only: token ids and masks keep theirs
    assert half.kwargs["scale"].dtype == torch.float32
    assert half.kwargs["input_ids"].dtype == torch.int64
    moved = x.to("cpu", torch.float32)
    assert moved.device == torch.device("cpu") and moved.kwargs["scale"].dtype == torch.float32
    needs = x.map(lambda t: t.double().requires_grad_(True))
    assert not any(t.requires_grad for t in needs.detach().tensors())
    _same(x.cpu(), x)
    up = x.unsqueeze(0)
    assert [t.shape[0] for t in up.tensors()] == [1, 1, 1]
    _same(up.squeeze(0), x)


def test_vmap_maps_over_every_input_and_the_pytree_round_trips():
    x = _inputs(6)

    def one(xi: Inputs) -> torch.Tensor:
        kept = (xi.kwargs["input_ids"] * xi.kwargs["attention_mask"]).double()
        return kept.sum() * xi.kwargs["scale"]

    got = vmap(one)(x)
    want = torch.stack([one(x[i]) for i in range(6)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    leaves, spec = pytree.tree_flatten(x)
    assert len(leaves) == 3
    _same(pytree.tree_unflatten(leaves, spec), x)


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat([a, b], dim=-1))


def test_the_functional_model_calls_the_module_with_the_inputs():
    model = Two()
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randn(4, k, generator=gen, dtype=torch.float64) for k in (2, 3))
    fmodel = FunctionalModel(model)
    state = fmodel.state()
    want = model(a, b)
    for x in (Inputs((a, b)), Inputs(kwargs={"b": b, "a": a}), Inputs((a,), {"b": b})):
        got = fmodel(state.params, state.buffers, x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(call_model(model, x), want, rtol=0, atol=0)


# ---- data ------------------------------------------------------------------------------------
class Texts(Dataset):
    """Dictionary samples as a tokenizer gives them, with a string entry."""

    def __init__(self, n: int = 7, label: str = "labels"):
        gen = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, 9, (n, 4), generator=gen)
        self.mask = torch.ones(n, 4, dtype=torch.long)
        self.mask[::2, 3] = 0
        self.y = torch.arange(n) % 2
        self.label = label

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                self.label: self.y[i], "text": f"sample {i}"}


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(9, 3).double()
        self.head = nn.Linear(3, 2).double()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.head(h.sum(1))


class AnyKeywords(Tokens):
    def forward(self, input_ids: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids, kwargs["attention_mask"])


def test_dictionary_batches_keep_every_input_and_name_strings_once(caplog):
    data = Texts()
    task = Task(Tokens(), "classification")
    with caplog.at_level(logging.WARNING, logger="iif.task.data"):
        got = task.validate(DataLoader(data, batch_size=3), "training data")
    assert isinstance(got.x, Inputs) and got.x.structure() == (0, ("input_ids",
                                                                     "attention_mask"))
    assert torch.equal(got.x.kwargs["input_ids"], data.ids)
    assert torch.equal(got.x.kwargs["attention_mask"], data.mask)
    assert torch.equal(got.labels, data.y)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "'text' (list)" in said[0] and "not passed" in said[0]
    torch.testing.assert_close(task.model(data.ids, data.mask),
                               FunctionalModel(task.model).outputs(
                                   FunctionalModel(task.model).state(), got.x),
                               rtol=0, atol=0)


def test_the_label_key_is_the_tasks():
    data = Texts(label="sentiment")
    with pytest.raises(InputError, match="label key"):
        Task(Tokens(), "classification").validate(DataLoader(data, batch_size=4))
    got = Task(Tokens(), "classification", label_key="sentiment").validate(
        DataLoader(data, batch_size=4))
    assert torch.equal(got.labels, data.y)
    with pytest.raises(InputError, match="no label key 'labels'"):
        Task(Tokens(), "classification", label_key="labels").validate(
            DataLoader(data, batch_size=4))


def test_a_keyword_the_forward_does_not_take_is_refused_by_name():
    class Extra(Texts):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "token_type_ids": torch.zeros(4, dtype=torch.long)}

    with pytest.raises(InputError, match="'token_type_ids', which Tokens.forward does not "
                                         "take \\(its parameters: input_ids, attention_mask\\)"):
        Task(Tokens(), "classification").validate(DataLoader(Extra(), batch_size=4))
    # a forward taking **kwargs decides itself
    got = Task(AnyKeywords(), "classification").validate(DataLoader(Texts(), batch_size=4))
    assert got.x.structure() == (0, ("input_ids", "attention_mask"))


def test_one_input_entry_stays_one_tensor_passed_positionally():
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.arange(6) % 2

    class Records(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"features": x[i], "label": y[i], "name": f"row {i}"}

    task = Task(nn.Linear(3, 2).double(), "classification")
    got = task.validate(DataLoader(Records(), batch_size=4))
    assert isinstance(got.x, torch.Tensor) and torch.equal(got.x, x)


def test_tuple_batches_and_tensor_datasets_give_positional_inputs():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(7, 2, generator=gen), torch.randn(7, 3, generator=gen)
    y = torch.arange(7) % 3
    task = Task(Two(), "classification")
    for data in (TensorDataset(a, b, y), DataLoader(TensorDataset(a, b, y), batch_size=3),
                 ((a, b), y)):
        got = task.validate(data)
        assert got.x.structure() == (2, ())
        assert torch.equal(got.x.args[0], a.double()) and torch.equal(got.x.args[1],
                                                                        b.double())
        assert got.x.args[0].dtype == torch.float64  # the model's dtype, as for one input


def test_padding_to_other_lengths_is_refused_held_or_streamed():
    class Ragged(Texts):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            if i >= 4:  # a later batch padded to another length
                item = {**item, "input_ids": torch.cat([self.ids[i], torch.zeros(2).long()]),
                        "attention_mask": torch.cat([self.mask[i], torch.zeros(2).long()])}
            return item

    task = Task(Tokens(), "classification")
    with pytest.raises(InputError, match="different per-sample shapes cannot be joined.*pad"):
        task.validate(DataLoader(Ragged(), batch_size=4))
    with pytest.raises(InputError, match="input_ids \\(6,\\) int64, attention_mask \\(6,\\) "
                                         "int64 after input_ids \\(4,\\).*pad every sample"):
        task.validate(Streamed(DataLoader(Ragged(), batch_size=4)))


def test_test_inputs_must_be_the_training_inputs():
    task = Task(Tokens(), "classification")
    train = task.validate(DataLoader(Texts(), batch_size=4))
    data = Texts(3)
    other = {"input_ids": data.ids[:, :3], "attention_mask": data.mask[:, :3]}
    with pytest.raises(InputError, match="input_ids \\(3,\\), attention_mask \\(3,\\), the "
                                         "training inputs input_ids \\(4,\\)"):
        task.validate((other, data.y), "test data", like=train)


def test_the_digest_holds_every_input_and_a_tensor_s_as_before():
    x = torch.arange(12.0).reshape(4, 3)
    a = x.numpy()
    want = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()
    assert tensor_digest([x]) == want  # a plain tensor: its dtype, shape and bytes
    task = Task(Tokens(), "classification")
    data = Texts()
    base = task.validate(DataLoader(data, batch_size=4))
    data.mask[1, 0] = 0  # one sample's mask
    masked = task.validate(DataLoader(data, batch_size=4))
    assert data_digest(base) != data_digest(masked)
    assert data_digest(base) == data_digest(task.validate(DataLoader(Texts(), batch_size=4)))
    renamed = Inputs(kwargs={"input_ids": base.x.kwargs["input_ids"],
                             "mask": base.x.kwargs["attention_mask"]})
    assert tensor_digest([renamed]) != tensor_digest([base.x])


def test_streamed_inputs_given_as_a_pair_stay_streamed():
    from iif.task.data import StreamedInputs, take

    x, y = torch.randn(6, 3, dtype=torch.float64), torch.arange(6) % 2
    task = Task(nn.Linear(3, 2).double(), "classification")
    streamed = task.validate(Streamed(TensorDataset(x, y)))
    rows = torch.tensor([0, 2, 5])
    part = task.validate((take(streamed.x, rows), y[rows]))  # as an ensemble's half reads it
    assert isinstance(part.x, StreamedInputs) and torch.equal(part.x[:], x[rows])


def test_a_list_of_per_sample_tensors_is_refused_with_the_stacking_hint():
    task = Task(nn.Linear(3, 2).double(), "classification")
    x = [torch.randn(3, dtype=torch.float64) for _ in range(10)]
    with pytest.raises(InputError, match=r"a list of 10 tensors is read as 10 inputs of each "
                                         r"sample; for one tensor per sample, give "
                                         r"torch.stack\(list\)"):
        task.validate((x, torch.randint(0, 2, (10,))))
