"""Next-token labels of a causal language model: the shift Hugging Face models make from
``labels=input_ids``, padding and prompts excluded from the loss (iif.task.sequences)."""

from __future__ import annotations

import pytest
import torch

from iif.errors import InputError
from iif.task.sequences import causal_lm_labels, completions
from iif.task.task import IGNORE, Task

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=12)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def test_labels_give_the_loss_hugging_face_computes_from_labels_equal_to_the_ids(gpt2):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 11, (4, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    mask[3, 4:] = 0
    ids[mask == 0] = 0
    hf_labels = ids.masked_fill(mask == 0, IGNORE)  # what a Hugging Face user passes
    with torch.no_grad():
        hf = gpt2(input_ids=ids, attention_mask=mask, labels=hf_labels).loss  # token mean
        logits = gpt2(input_ids=ids, attention_mask=mask).logits
    labels = causal_lm_labels(ids, mask)
    task = Task(gpt2, "sequence")
    targets = task.validate((ids, labels)).targets
    ours = task.sample_loss(logits, targets).sum() / (labels != IGNORE).sum()
    torch.testing.assert_close(ours.float(), hf, rtol=1e-6, atol=0)  # its loss is float32
    assert labels[1, 4] == IGNORE and labels[1, 3] == ids[1, 4]


def test_completions_score_the_answer_given_the_prompt(gpt2):
    prompts, answers = [[3, 4, 5], [7]], [[6, 2], [8, 9, 10]]
    ids, labels = completions(prompts, answers, pad_id=0)
    assert ids.shape == (2, 5) and ids[0].tolist() == [3, 4, 5, 6, 2]
    assert ids[1].tolist() == [7, 8, 9, 10, 0]
    assert labels[0].tolist() == [IGNORE, IGNORE, 6, 2, IGNORE]
    assert labels[1].tolist() == [8, 9, 10, IGNORE, IGNORE]
    task = Task(gpt2, "sequence")
    with torch.no_grad():
        logits = gpt2(input_ids=ids).logits
        loss = task.sample_loss(logits, task.validate((ids, labels)).targets)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            alone = torch.tensor([p + a])
            logp = torch.log_softmax(gpt2(input_ids=alone).logits[0], dim=-1)
            want = -sum(logp[len(p) - 1 + j, tok] for j, tok in enumerate(a))
            torch.testing.assert_close(loss[i], want, rtol=1e-12, atol=1e-12)


def test_bad_sequences_are_one_line():
    with pytest.raises(InputError, match=r"input_ids must be \(n, T\) integer token ids"):
        causal_lm_labels(torch.zeros(3))
    with pytest.raises(InputError, match="sample 1 has no token to predict"):
        causal_lm_labels(torch.tensor([[1, 2, 3], [4, 0, 0]]),
                         torch.tensor([[1, 1, 1], [1, 0, 0]]))
    with pytest.raises(InputError, match="one length >= 1 per sample"):
        causal_lm_labels(torch.tensor([[1, 2, 3]]), prompt_lengths=[0])
    with pytest.raises(InputError, match="one answer per prompt"):
        completions([[1]], [])


def test_labels_equal_to_the_ids_are_refused_with_the_shift(gpt2):
    ids = torch.randint(1, 11, (3, 6), generator=torch.Generator().manual_seed(3))
    with pytest.raises(InputError, match=r"the labels equal the input ids .* give "
                                         r"iif.causal_lm_labels\(input_ids, attention_mask\)"):
        Task(gpt2, "sequence").validate((ids, ids.clone()))
    Task(gpt2, "sequence").validate((ids, causal_lm_labels(ids)))  # shifted: accepted


def test_completions_pad_to_the_length_asked_for():
    ids, labels = completions([[3, 4]], [[5]], pad_id=0, length=6)
    assert ids.tolist() == [[3, 4, 5, 0, 0, 0]]
    assert labels.tolist() == [[IGNORE, 5, IGNORE, IGNORE, IGNORE, IGNORE]]
    with pytest.raises(InputError, match="length=2 is shorter than the longest prompt and "
                                         "answer"):
        completions([[3, 4]], [[5]], length=2)
