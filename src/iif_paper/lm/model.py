"""A small causal transformer (Llama architecture, built from a configuration: no weights
are downloaded), its per-document loss, training and the log-probability measurement.

Every linear map of the Llama blocks and the output head is an ``nn.Linear`` (GPT-2's
``Conv1D`` would hide them from a Kronecker projection); the rest are the token embedding
and the RMSNorm weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iif_paper.lm.tokenizer import IGNORE


class CausalLM(nn.Module):
    """``forward(ids (n, T) int64) -> logits (n, T, V)``.

    Sequences are right-padded: with causal attention a padded position comes after the
    text and cannot change its logits, so no attention mask is passed (which also keeps
    the forward a pure function of the ids, as ``torch.func.vmap`` wants)."""

    def __init__(self, vocab_size: int = 260, hidden: int = 128, layers: int = 4,
                 heads: int = 4, intermediate: int | None = None, max_length: int = 128):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM  # a slow import: only here

        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads,
            intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_length,
            tie_word_embeddings=False, use_cache=False,
            # eager attention: a plain softmax(QK^T)V that torch.func transforms support
            attn_implementation="eager")
        self.config = config
        self.net = LlamaForCausalLM(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids, use_cache=False).logits


def build_model(seed: int = 0, **sizes: int) -> CausalLM:
    """A freshly initialised :class:`CausalLM` (``sizes``: its keyword arguments), seeded.
    The default (hidden 128, 4 layers, 4 heads, MLP 512, vocab 260: the tokenizer's 259 ids and
    one spare) has 1.12 M parameters."""
    torch.manual_seed(seed)
    return CausalLM(**sizes)


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over each document's tokens: logits (n, T, V) or
    flattened to (n, T V) (how ``iif`` hands a model's outputs to a task's loss), targets
    (n, T) (IGNORE where nothing is predicted; any dtype holding integer ids) -> (n,)."""
    logits = logits.reshape(*targets.shape, -1)
    per_token = F.cross_entropy(logits.transpose(1, 2), targets.long(),
                                ignore_index=IGNORE, reduction="none")  # (n, T)
    return per_token.sum(dim=-1)


@torch.no_grad()
def sequence_log_prob(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                      batch_size: int = 256) -> torch.Tensor:
    """Summed log-probability of each document's target tokens: ids, targets (n, T) ->
    (n,), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([-sequence_loss(model(ids[i:i + batch_size]),
                                         targets[i:i + batch_size])
                          for i in range(0, ids.shape[0], batch_size)])
    finally:
        model.train(was_training)


def train_lm(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, epochs: int,
             lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
             weight_decay: float = 0.0) -> list[float]:
    """AdamW on the mean over documents of :func:`sequence_loss`; minibatches shuffled by
    ``seed``. Returns each epoch's mean training loss per document."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    history = []
    for _ in range(epochs):
        order = torch.randperm(ids.shape[0], generator=gen)
        total = 0.0
        for start in range(0, ids.shape[0], batch_size):
            batch = order[start:start + batch_size]
            loss = sequence_loss(model(ids[batch]), targets[batch]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * batch.numel()
        history.append(total / ids.shape[0])
    model.eval()
    return history
