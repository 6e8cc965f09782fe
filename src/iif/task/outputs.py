"""What a model returns, as the tensor the scores are computed from.

Models as users hold them return a tensor, a Hugging Face ``ModelOutput`` (its ``logits``), a
tuple (its first element is the output, as in ``(logits, hidden)`` or ``(logits,)``) or a
dictionary with ``logits``. :func:`model_output` takes any of these; anything else needs
``Task(..., output=fn)``, a function from what the model returns to a tensor of shape
``(batch, outputs)`` (or ``(batch, positions, vocab)`` for a sequence task).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from iif.errors import InputError, UserCodeError

OutputFn = Callable[[Any], torch.Tensor]

OUTPUT_KEY = "logits"


def model_output(out: Any, output: OutputFn | None = None) -> torch.Tensor:
    """The tensor in ``out``, what a model's forward returned: ``output(out)`` when given,
    else ``out`` itself (a tensor), ``out.logits`` / ``out["logits"]`` (a ``ModelOutput`` or a
    dictionary) or ``out[0]`` (a tuple or list). Raises :class:`InputError` naming what was
    received and the remedy."""
    if output is not None:
        try:
            value = output(out)
        except InputError:
            raise
        except Exception as exc:  # the user's function: name it
            name = getattr(output, "__qualname__", type(output).__name__)
            raise UserCodeError(f"calling the task's output function ({name})", exc) from exc
        if not isinstance(value, torch.Tensor):
            raise InputError(f"the task's output function returned {_what(value)}, not a "
                             f"tensor of shape (batch, outputs)")
        return value
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):  # a ModelOutput is an ordered dictionary
        if isinstance(out.get(OUTPUT_KEY), torch.Tensor):
            return out[OUTPUT_KEY]
        raise InputError(f"the model returned {_what(out)} with no tensor '{OUTPUT_KEY}'; "
                         f"give Task(..., output=lambda out: out[KEY]) with the key of its "
                         f"outputs")
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputError(f"the model returned {_what(out)}; iif reads a tensor, a ModelOutput's "
                     f"logits, a dictionary's '{OUTPUT_KEY}' or a tuple's first element: give "
                     f"Task(..., output=fn) with fn(model_output) -> tensor (batch, outputs)")


def _what(value: Any) -> str:
    """``a ModelOutput (keys: logits, past_key_values)``, ``a tuple of 2``, ``a str``."""
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(value, Mapping):
        keys = ", ".join(str(k) for k in list(value)[:6])
        return f"{article} {name} (keys: {keys or 'none'})"
    if isinstance(value, (tuple, list)):
        first = type(value[0]).__name__ if value else "nothing"
        return f"{article} {name} of {len(value)} (first: {first})"
    return f"{article} {name}"
