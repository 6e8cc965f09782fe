"""Per-sample work under ``vmap`` through attention: torch's note that
``scaled_dot_product_attention`` has no batching rule is not repeated to the user, while every
other warning still reaches them, as often as their own filters say."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from iif.engine.functional import FunctionalModel, quiet_attention_fallback
from iif.engine.grads import per_sample_grads
from iif.engine.stacked import StackedState, fit_stacked, stacked_outputs
from iif.task.task import Recipe, Task

FALLBACK = re.compile(r"There is a performance drop because we have not yet implemented the "
                      r"batching rule for aten::_?scaled_dot_product", re.I)
SEQ, DIM = 3, 4


class TinyAttention(nn.Module):
    """One causal self-attention head over a sequence of SEQ tokens of DIM features, through
    ``F.scaled_dot_product_attention``; ``note`` is a warning of its own at every forward."""

    def __init__(self, note: str | None = None):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(SEQ * DIM, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
        self.note = note

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.note:
            warnings.warn(self.note, UserWarning, stacklevel=1)
        q, k, v = self.qkv(x.reshape(-1, 1, SEQ, DIM)).chunk(3, dim=-1)  # one head
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(att.flatten(1))


def _problem(note: str | None = None, n: int = 4):
    gen = torch.Generator().manual_seed(1)
    task = Task(TinyAttention(note), "regression", Recipe(lr=0.05, batch_size=2))
    x = torch.randn(n, SEQ * DIM, generator=gen, dtype=torch.float32)
    y = torch.randn(n, 2, generator=gen, dtype=torch.float32)
    return task, FunctionalModel(task.model), x, y


def _fallbacks(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, UserWarning) and FALLBACK.match(str(w.message))]


def _notes(caught: list[warnings.WarningMessage], note: str) -> int:
    return sum(str(w.message) == note for w in caught)


def test_torch_itself_still_warns_so_the_tests_below_can_fail():
    task, _, x, _ = _problem()
    params = {k: p.detach() for k, p in task.model.named_parameters()}

    def out_sum(p, xi):
        return functional_call(task.model, p, (xi[None],)).sum()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vmap(grad(out_sum), in_dims=(None, 0))(params, x)
    assert _fallbacks(caught), "this torch has a batching rule for attention"


def test_per_sample_gradients_through_attention_do_not_repeat_torchs_note():
    task, fmodel, x, y = _problem(note="attention model note")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = per_sample_grads(fmodel, fmodel.state(), x, y, task, chunk_size=2)
    assert g.shape == (x.shape[0], fmodel.num_params) and bool(torch.isfinite(g).all())
    assert _fallbacks(caught) == []
    assert _notes(caught, "attention model note") > 0  # the model's own warning is not hidden


def test_stacked_copies_through_attention_do_not_repeat_torchs_note():
    task, fmodel, x, y = _problem(note="stacked model note")
    state = StackedState.repeat(fmodel.state(), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = stacked_outputs(fmodel, state, x)
        results = fit_stacked(task, fmodel, state, x, y, epochs=1,
                              generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, x.shape[0], 2) and len(results) == 2
    assert _fallbacks(caught) == []
    assert _notes(caught, "stacked model note") > 0


def test_a_warning_of_the_model_shows_as_often_as_the_users_filters_say():
    """Under Python's default action a warning shows once per place: the engine's filtering,
    around every chunk, must not reset that and repeat it once per chunk."""
    task, fmodel, x, y = _problem(note="shown once", n=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        per_sample_grads(fmodel, fmodel.state(), x, y, task, chunk_size=1)
    assert _notes(caught, "shown once") == 1


def test_the_filter_stays_local_and_other_filters_still_apply():
    task, fmodel, x, y = _problem(note="an error to this user")
    before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. python -W error
        with pytest.raises(UserWarning, match="an error to this user"):
            per_sample_grads(fmodel, fmodel.state(), x, y, task, chunk_size=2)
        task.model.note = None
        per_sample_grads(fmodel, fmodel.state(), x, y, task, chunk_size=2)  # no error now
    assert warnings.filters == before
    def note(op: str, category: type[Warning] = UserWarning) -> None:
        warnings.warn(f"There is a performance drop because we have not yet implemented the "
                      f"batching rule for aten::{op}. Please file us an issue", category,
                      stacklevel=2)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_attention_fallback():
            note("_scaled_dot_product_efficient_attention")
            note("_some_other_op")
            note("_scaled_dot_product_attention_math", DeprecationWarning)
        note("_scaled_dot_product_efficient_attention")
    ops = [(w.category, str(w.message).split("aten::")[1].split(".")[0]) for w in caught]
    assert ops == [(UserWarning, "_some_other_op"),
                   (DeprecationWarning, "_scaled_dot_product_attention_math"),
                   (UserWarning, "_scaled_dot_product_efficient_attention")]  # after the block
