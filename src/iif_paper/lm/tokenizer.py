"""Byte-level tokenizer: the 256 byte values of UTF-8 text, then BOS, EOS and PAD.

Nothing to train or download: a document is ``BOS, its UTF-8 bytes, EOS``, right-padded
with PAD. Targets are the ids shifted left by one (next-token prediction), IGNORE where
there is nothing to predict (after EOS, over padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
"""Token ids in use: bytes 0..255, BOS, EOS, PAD."""
IGNORE = -100
"""Target id of positions without a next token (``cross_entropy``'s ``ignore_index``)."""


def encode(texts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``texts`` -> ids (n, length) and targets (n, length), both int64.

    ``ids[i] = BOS, bytes of texts[i], EOS, PAD, ...``; ``targets[i, t] = ids[i, t + 1]``
    where that is a byte or EOS, else IGNORE. A text of more than ``length - 2`` bytes is
    cut to ``length`` ids (its EOS, then, is lost)."""
    if length < 2:
        raise ValueError(f"length must be at least 2 (BOS and EOS), got {length}")
    ids = torch.full((len(texts), length), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        seq = [BOS, *text.encode("utf-8"), EOS][:length]
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    targets[targets == PAD] = IGNORE
    return ids, targets


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    """One sequence of ids (T,) -> text: bytes up to the first EOS, BOS and PAD skipped,
    invalid UTF-8 replaced."""
    out = bytearray()
    for token in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
        if token == EOS:
            break
        if 0 <= token < 256:
            out.append(token)
    return out.decode("utf-8", errors="replace")
