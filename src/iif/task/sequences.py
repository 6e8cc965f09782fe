"""Labels of a causal language model, as a ``"sequence"`` task reads them.

A ``"sequence"`` task scores next-token labels: ``labels[i, t]`` is the token the model should
predict at position t of sample i, i.e. ``input_ids[i, t + 1]``, and ``IGNORE`` (-100) where
no loss is taken. Hugging Face users pass ``labels=input_ids`` and let the model shift them;
:func:`causal_lm_labels` does that shift once, and :func:`completions` builds the data of the
most common question, "which training documents made the model write this completion for
this prompt": prompt and completion side by side, the loss on the completion's tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from iif.errors import InputError
from iif.task.task import IGNORE


def causal_lm_labels(input_ids: Any, attention_mask: Any = None,
                     prompt_lengths: Sequence[int] | torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Next-token labels (n, T) for token ids (n, T): ``labels[:, t] = input_ids[:, t + 1]``,
    ``IGNORE`` at the last position, where the next token is padding (``attention_mask`` 0)
    and where it is still part of the prompt (its first ``prompt_lengths[i]`` tokens: the
    loss then covers only what follows the prompt)."""
    ids = torch.as_tensor(input_ids)
    if ids.ndim != 2 or ids.is_floating_point():
        raise InputError(f"input_ids must be (n, T) integer token ids, got shape "
                         f"{tuple(ids.shape)} ({ids.dtype})")
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask has shape {tuple(mask.shape)}, input_ids "
                             f"{tuple(ids.shape)}")
        labels[:, :-1][mask[:, 1:] == 0] = IGNORE
    if prompt_lengths is not None:
        lengths = torch.as_tensor(prompt_lengths).reshape(-1)
        if lengths.numel() != ids.shape[0] or bool((lengths < 1).any()):
            raise InputError(f"prompt_lengths must give one length >= 1 per sample "
                             f"({ids.shape[0]}), got {lengths.tolist()}")
        # position t predicts token t + 1: it belongs to the prompt while t + 1 < length
        positions = torch.arange(ids.shape[1])[None, :]
        labels[positions + 1 < lengths[:, None]] = IGNORE
    if bool((labels == IGNORE).all(dim=1).any()):
        empty = int((labels == IGNORE).all(dim=1).nonzero()[0])
        raise InputError(f"sample {empty} has no token to predict (shorter than 2 tokens, "
                         f"all padding, or all prompt)")
    return labels


def completions(prompts: Sequence[Any], answers: Sequence[Any], pad_id: int = 0,
                length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` for "which training samples made the model write ``answers[i]``
    after ``prompts[i]``": each prompt followed by its answer, right-padded with ``pad_id`` to
    ``length`` (None: the longest; give the training data's length, which test inputs must
    match), the labels ``IGNORE`` except on the answer's tokens (explain these with a
    ``"sequence"`` task: the test loss is the answer's summed token loss given the prompt)."""
    if len(prompts) != len(answers) or not prompts:
        raise InputError(f"give one answer per prompt (got {len(prompts)} prompts and "
                         f"{len(answers)} answers)")
    rows = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        p, a = torch.as_tensor(p).reshape(-1), torch.as_tensor(a).reshape(-1)
        if p.numel() == 0 or a.numel() == 0:
            raise InputError(f"prompt and answer {i} must each hold at least one token")
        rows.append((p.long(), a.long()))
    longest = max(p.numel() + a.numel() for p, a in rows)
    if length is None:
        length = longest
    elif length < longest:
        raise InputError(f"length={length} is shorter than the longest prompt and answer "
                         f"({longest} tokens)")
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(rows):
        both = torch.cat([p, a])
        ids[i, : both.numel()] = both
        mask[i, : both.numel()] = 1
    labels = causal_lm_labels(ids, mask, [p.numel() for p, _ in rows])
    return ids, labels
