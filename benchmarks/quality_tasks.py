"""The held-out tasks of the quality benchmark (``bench_quality.py``) and their LDS ground
truth, with the subsets split once into a tuning half and a report half.

- ``digits``: scikit-learn digits, 1,000 train / 200 test, MLP 64-128-64-10, SGD lr 0.05,
  momentum 0.9, weight decay 5e-4, batch 64, 40 epochs.
- ``mnist``: 5,000 train / 500 test from ``../shared/data/mnist``, MLP 784-128-64-10 with
  dropout 0.1, SGD lr 0.01, momentum 0.9, batch 64, 50 epochs.
- ``cnn``: the same 5,000 / 500 MNIST images (1 x 28 x 28), :class:`SmallResNet` (a strided
  conv stem 1->16, two residual blocks of two 3x3 conv-BatchNorm layers, a strided stage to
  32 channels, global average pooling, Linear to 10; 23,802 parameters), SGD lr 0.02,
  momentum 0.9, weight decay 5e-4, batch 64, 10 epochs, eval mode after training: 97.2 %
  test accuracy.
- ``lm``: the byte-level Llama of ``iif_paper.lm`` (hidden 64, 2 layers, 4 heads, MLP 128;
  115,520 parameters) on 2,000 fortunes of at most 62 bytes, AdamW lr 3e-3, batch 32, 20
  epochs. Test samples: 100 held-out fortunes of at least 24 bytes, each a prompt (BOS and
  its first 16 bytes) and a completion (the rest and EOS), labelled by ``iif.completions``:
  the test loss is the completion's summed token loss. Token loss 1.52 nats on the training
  documents, 2.08 on the completions.
- ``textcls``: ``BertForSequenceClassification`` from a tiny configuration (hidden 64, 2
  layers, 4 heads, MLP 128; 94,340 parameters) over the byte tokens, predicting which of the
  fortune files computers, definitions, work, zippy a fortune (at most 94 bytes) comes from:
  300 train and 50 test fortunes per file, padded to 96 tokens with an attention mask, fed
  as a DataLoader of ``input_ids`` / ``attention_mask`` / ``labels`` dictionaries. AdamW lr
  1e-3, weight decay 0.01, batch 32, 10 epochs: 74.5 % test accuracy (chance 25 %).

The fortunes come from Debian's ``fortunes`` package (``/usr/share/games/fortunes``). The
models of ``lm`` and ``textcls`` are initialised by ``iif``'s ``reinitialised`` (each
module's ``reset_parameters``), as the ground truth's retrained models are. Llama's RMSNorm
has no ``reset_parameters``, so ``reinitialised`` refuses it ("cannot re-initialise
parameters [...] (no reset_parameters)"): :func:`resettable_norms` gives it one.

Ground truth: ``n_subsets`` random half-size subsets, ``repeats`` retrained models per subset
(R5 = their mean test loss; R1 = the first model's), cached by ``iif.evaluation.ground_truth``:
100 x 5 for ``digits`` and ``mnist``, 100 x 1 for ``cnn``, ``lm`` and ``textcls``. Subsets
with an even index form the tuning half, odd ones the report half: settings are only ever
chosen on the tuning half (``lds(..., half="tune")``), and tables report the other half.
BERT's mask builder branches on the mask, so ``textcls``'s models cannot train together
under ``vmap``: ``ground_truth`` finds that with the gradient route's probe and retrains them
one at a time.

Costs on one thread of the shared 2-core machine (``OMP_NUM_THREADS=1 python
benchmarks/quality_tasks.py TASK --time --models 10``: one training run, then 10 retrained
models; the ranges are from several such runs, with 2 to 25 models, while other jobs shared
the cores):

| task | one training run | one retrained model (half the data) | ground truth |
|---|---:|---:|---:|
| cnn | 20-35 s | 12-19 s (2 to 25 batched) | 500 models: 1.7-2.6 h |
| lm | 52-86 s | 41-43 s (2 or 10 batched) | 100 models: 1.1-1.2 h |
| textcls | 37-62 s | 21-28 s (one by one) | 100 models: 0.6-0.8 h |

The ground truth of a task: ``OMP_NUM_THREADS=1 nice -n 19 python benchmarks/quality_tasks.py
TASK``. The main model is always trained on one thread (the cache key holds its parameters,
which change with the thread count).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iif import Recipe, Task, train
from iif.evaluation import GroundTruth, RetrainSettings, ground_truth, lds

SEED = 0
N_SUBSETS = 100
REPEATS = 5
# the new tasks retrain costlier models: their own ground-truth sizes (timings above)
CNN_SUBSETS, CNN_REPEATS = 100, 1
LM_SUBSETS, LM_REPEATS = 100, 1
TEXT_SUBSETS, TEXT_REPEATS = 100, 1
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "quality"


@dataclass
class QualityTask:
    """A trained model, its data and how its ground truth is made."""

    name: str
    task: Task
    train: Any  # (x, y) arrays, or a DataLoader of dictionaries
    test: Any
    make_model: Callable[[int], nn.Module]  # seed -> the untrained model of the run
    n_subsets: int = N_SUBSETS
    repeats: int = REPEATS
    batch_models: int = 50  # part of the ground truth's cache key: kept at 50 for the MLPs
    info: dict[str, Any] = field(default_factory=dict)  # accuracy, training seconds, ...

    def test_rows(self, idx: np.ndarray) -> Any:
        """The test samples ``idx``, held the way the task holds its test data."""
        if isinstance(self.test, torch.utils.data.DataLoader):
            loader = self.test
            return torch.utils.data.DataLoader(
                torch.utils.data.Subset(loader.dataset, [int(i) for i in idx]),
                batch_size=loader.batch_size, collate_fn=loader.collate_fn)
        xt, yt = self.test
        return xt[idx], yt[idx]

    def n_test(self) -> int:
        if isinstance(self.test, torch.utils.data.DataLoader):
            return len(self.test.dataset)
        return len(self.test[1])

    def n_train(self) -> int:
        if isinstance(self.train, torch.utils.data.DataLoader):
            return len(self.train.dataset)
        return len(self.train[1])


def digits_task() -> QualityTask:
    from iif_paper.data import load_digits

    (x, y), (xt, yt) = load_digits(n_train=1000, n_test=200, seed=SEED)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                             nn.Linear(64, 10))

    recipe = Recipe(lr=0.05, epochs=40, batch_size=64, momentum=0.9, weight_decay=5e-4)
    model = make(SEED)
    task = Task(model, "classification", recipe)
    train(task, (x, y), seed=SEED)
    model.eval()
    return QualityTask("digits", task, (x, y), (xt, yt), make)


def _mnist_samples(n_train: int, n_test: int, flatten: bool
                   ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The seeded MNIST samples of ``mnist`` and ``cnn``: (n, 784) or (n, 1, 28, 28)."""
    from iif_paper.data import load_mnist

    x, y = load_mnist("train", flatten=flatten)
    order = np.random.default_rng(SEED).permutation(len(y))[:n_train]
    xt, yt = load_mnist("test", flatten=flatten)
    torder = np.random.default_rng(SEED + 1).permutation(len(yt))[:n_test]
    return (x[order], y[order]), (xt[torder], yt[torder])


def mnist_task(n_train: int = 5000, n_test: int = 500) -> QualityTask:
    (x, y), (xt, yt) = _mnist_samples(n_train, n_test, flatten=True)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Dropout(0.1),
                             nn.Linear(128, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))

    recipe = Recipe(lr=0.01, epochs=50, batch_size=64, momentum=0.9)
    model = make(SEED)
    task = Task(model, "classification", recipe)
    train(task, (x, y), seed=SEED)
    model.eval()
    return QualityTask("mnist", task, (x, y), (xt, yt), make)


# ---- cnn: a residual network with BatchNorm on MNIST ---------------------------------------
class ResidualBlock(nn.Module):
    """Two 3x3 conv-BatchNorm layers with the input added back, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + inner)


class SmallResNet(nn.Module):
    """A strided conv stem 1->16 (28 -> 14 pixels), two residual blocks, a strided stage to 32
    channels (14 -> 7) with a second conv, global average pooling and a Linear head:
    23,802 parameters."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        wide = 2 * channels
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.stage = nn.Sequential(
            nn.Conv2d(channels, wide, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(wide),
            nn.ReLU(), nn.Conv2d(wide, wide, 3, padding=1, bias=False), nn.BatchNorm2d(wide),
            nn.ReLU())
        self.head = nn.Linear(wide, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(self.blocks(self.stem(x))).mean(dim=(2, 3)))


def cnn_task(n_train: int = 5000, n_test: int = 500) -> QualityTask:
    (x, y), (xt, yt) = _mnist_samples(n_train, n_test, flatten=False)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return SmallResNet()

    recipe = Recipe(lr=0.02, epochs=10, batch_size=64, momentum=0.9, weight_decay=5e-4)
    model = make(SEED)
    task = Task(model, "classification", recipe)
    info = _timed_train(task, (x, y))
    with torch.no_grad():
        info["test_accuracy"] = float((model(torch.as_tensor(xt)).argmax(1).numpy() == yt).mean())
    return QualityTask("cnn", task, (x, y), (xt, yt), make, n_subsets=CNN_SUBSETS,
                       repeats=CNN_REPEATS, batch_models=10, info=info)


def _timed_train(task: Task, data: Any) -> dict[str, Any]:
    """Train the task's model (seed ``SEED``) on one thread, leave it in eval mode; the
    seconds taken. The ground truth's cache key holds the trained parameters, which change
    with the thread count: one thread keeps the key whatever ``--threads`` says."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        losses = train(task, data, seed=SEED, progress=False)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    task.model.eval()
    return {"train_seconds": seconds, "final_train_loss": losses[-1], "threads": 1}


# ---- lm: the fortunes causal language model, prompt -> completion ---------------------------
LM_SIZES = {"max_bytes": 62, "n_train": 2000, "n_queries": 100, "prompt_bytes": 16,
            "min_answer_bytes": 8, "model": {"hidden": 64, "layers": 2, "heads": 4,
                                             "intermediate": 128}}


def _reset_ones(norm: nn.Module) -> None:
    with torch.no_grad():
        norm.weight.fill_(1.0)


def resettable_norms(model: nn.Module) -> nn.Module:
    """Give every Llama RMSNorm a ``reset_parameters`` (its weight back to 1, as built).

    ``iif``'s ``reinitialised`` (the ground truth's and the ensembles' fresh models) resets
    each module through ``reset_parameters`` and refuses a model whose RMSNorm weights have
    none. A bound method on the instance follows the module through ``copy.deepcopy``."""
    import types

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and not hasattr(module, "reset_parameters"):
            module.reset_parameters = types.MethodType(_reset_ones, module)
    return model


def lm_task() -> QualityTask:
    """The byte-level Llama of ``iif_paper.lm`` on 2,000 fortunes; test samples are held-out
    fortunes cut into a prompt (BOS and 16 bytes) and its completion (the rest and EOS),
    the loss summed over the completion's tokens only."""
    from iif import completions
    from iif.engine.training import reinitialised
    from iif_paper.lm import BOS, EOS, PAD, build_model, encode, load_fortunes

    size = LM_SIZES
    length = size["max_bytes"] + 2
    corpus = load_fortunes(max_bytes=size["max_bytes"], n_train=size["n_train"],
                           n_test=4 * size["n_queries"], seed=SEED)
    cut = size["prompt_bytes"]
    queries = [d.encode("utf-8") for d in corpus.test
               if len(d.encode("utf-8")) >= cut + size["min_answer_bytes"]][:size["n_queries"]]
    prompts = [[BOS, *q[:cut]] for q in queries]
    answers = [[*q[cut:], EOS] for q in queries]
    test = completions(prompts, answers, pad_id=PAD, length=length)
    x, y = encode(corpus.train, length)

    def make(seed: int) -> nn.Module:
        # the fresh models of the ground truth come from ``reinitialised`` (each module's
        # reset_parameters): the attributed model starts from the same distribution
        model = resettable_norms(build_model(seed, max_length=length, **size["model"]))
        return reinitialised(model, seed)

    recipe = Recipe(lr=3e-3, epochs=20, batch_size=32, optimizer="adamw")
    model = make(SEED)
    task = Task(model, "sequence", recipe)
    info = _timed_train(task, (x, y))
    info.update(_lm_token_losses(model, (x, y), test))
    return QualityTask("lm", task, (x, y), test, make, n_subsets=LM_SUBSETS,
                       repeats=LM_REPEATS, batch_models=10, info=info)


def _lm_token_losses(model: nn.Module, train_data: tuple[torch.Tensor, torch.Tensor],
                     test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Mean next-token loss (nats) on the training documents and on the completions."""
    from iif_paper.experiments.lm import token_loss

    return {"train_token_loss": token_loss(model, *train_data),
            "completion_token_loss": token_loss(model, *test)}


# ---- textcls: a BERT classifier of a fortune's file -------------------------------------------
TEXT_FILES = ("computers", "definitions", "work", "zippy")
TEXT_SIZES = {"max_bytes": 94, "train_per_class": 300, "test_per_class": 50}


class FortuneTexts(torch.utils.data.Dataset):
    """Tokenised fortunes as a tokenizer's dictionaries: ``input_ids`` right-padded,
    ``attention_mask`` 0 on the padding, ``labels`` the class."""

    def __init__(self, texts: list[str], labels: list[int], length: int):
        from iif_paper.lm import PAD, encode

        self.ids = encode(texts, length)[0]
        self.mask = (self.ids != PAD).long()
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


def _labelled_fortunes(files: tuple[str, ...], max_bytes: int, per_train: int, per_test: int
                       ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(text, file index) pairs for training and testing, ``per_train`` / ``per_test`` of
    each file; a text found in two of the files is left out (its label would be either)."""
    from iif_paper.lm.corpus import DEFAULT_FOLDER, read_fortunes

    docs = [read_fortunes(DEFAULT_FOLDER / name, max_bytes) for name in files]
    seen: dict[str, int] = {}
    for part in docs:
        for text in part:
            seen[text] = seen.get(text, 0) + 1
    train_rows, test_rows = [], []
    for label, part in enumerate(docs):
        unique = [t for t in part if seen[t] == 1]
        if len(unique) < per_train + per_test:
            raise ValueError(f"{files[label]}: {len(unique)} fortunes of at most {max_bytes} "
                             f"bytes, {per_train + per_test} needed")
        random.Random(SEED + label).shuffle(unique)
        test_rows += [(t, label) for t in unique[:per_test]]
        train_rows += [(t, label) for t in unique[per_test:per_test + per_train]]
    random.Random(SEED).shuffle(train_rows)
    return train_rows, test_rows


def textcls_task() -> QualityTask:
    """``BertForSequenceClassification`` from a tiny configuration on byte tokens, fed as a
    Hugging Face user holds it: a DataLoader of ``input_ids`` / ``attention_mask`` /
    ``labels`` dictionaries."""
    from transformers import BertConfig, BertForSequenceClassification

    from iif.engine.training import reinitialised
    from iif_paper.lm import PAD, VOCAB_SIZE

    size = TEXT_SIZES
    length = size["max_bytes"] + 2
    train_rows, test_rows = _labelled_fortunes(TEXT_FILES, size["max_bytes"],
                                               size["train_per_class"], size["test_per_class"])

    def loader(rows: list[tuple[str, int]]) -> torch.utils.data.DataLoader:
        texts = FortuneTexts([t for t, _ in rows], [c for _, c in rows], length)
        return torch.utils.data.DataLoader(texts, batch_size=64)

    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=length, num_labels=len(TEXT_FILES),
                        pad_token_id=PAD)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        # as for lm: the ground truth's fresh models come from ``reinitialised``
        return reinitialised(BertForSequenceClassification(config), seed)

    recipe = Recipe(lr=1e-3, epochs=10, batch_size=32, optimizer="adamw", weight_decay=0.01)
    model = make(SEED)
    task = Task(model, "classification", recipe)
    train_loader, test_loader = loader(train_rows), loader(test_rows)
    info = _timed_train(task, train_loader)
    data = test_loader.dataset
    with torch.no_grad():
        logits = model(input_ids=data.ids, attention_mask=data.mask).logits
    info["test_accuracy"] = float((logits.argmax(1) == data.labels).float().mean())
    return QualityTask("textcls", task, train_loader, test_loader, make,
                       n_subsets=TEXT_SUBSETS, repeats=TEXT_REPEATS, batch_models=10, info=info)


TASKS: dict[str, Callable[[], QualityTask]] = {
    "digits": digits_task, "mnist": mnist_task, "cnn": cnn_task, "lm": lm_task,
    "textcls": textcls_task}


# ---- ground truth -------------------------------------------------------------------------
def settings_of(qt: QualityTask, n_subsets: int | None = None, repeats: int | None = None
                ) -> RetrainSettings:
    """The task's retraining settings; ``n_subsets`` / ``repeats`` override them (a small
    ground truth for a smoke run, cached apart: the settings are part of the key)."""
    return RetrainSettings(n_subsets=n_subsets or qt.n_subsets, fraction=0.5,
                           repeats=repeats or qt.repeats, seed=SEED,
                           batch_models=qt.batch_models)


def truth(qt: QualityTask, progress: bool | None = None, n_subsets: int | None = None,
          repeats: int | None = None) -> GroundTruth:
    """The task's ground truth (``iif.evaluation.ground_truth``, cached). A model whose
    forward cannot run under ``vmap`` (``textcls``: BERT's mask builder branches on the mask)
    is retrained one model at a time by the library itself."""
    settings = settings_of(qt, n_subsets, repeats)
    gt = ground_truth(qt.task, qt.train, qt.test, settings, cache_dir=CACHE / qt.name,
                      progress=progress)
    assert gt is not None
    return gt


def halves(n_subsets: int = N_SUBSETS) -> dict[str, np.ndarray]:
    """Subset indices of the tuning half (even) and the report half (odd)."""
    idx = np.arange(n_subsets)
    return {"tune": idx[0::2], "report": idx[1::2]}


def lds_scores(gt: GroundTruth, scores: np.ndarray, half: str) -> dict[str, float]:
    """LDS R1 and R5 (with standard errors) of ``scores`` (n_test, N) on one half."""
    rows = halves(gt.subsets.shape[0])[half]
    r5 = lds(scores, gt.subsets[rows], gt.losses[rows])
    r1 = lds(scores, gt.subsets[rows], gt.repeat_losses[rows, 0])
    return {"r1": r1.mean, "r1_se": r1.stderr, "r5": r5.mean, "r5_se": r5.stderr}


def subset_truth(gt: GroundTruth, test_idx: np.ndarray) -> GroundTruth:
    """The ground truth of some test samples only (columns ``test_idx``)."""
    return dataclasses.replace(gt, losses=gt.losses[:, test_idx],
                               repeat_losses=gt.repeat_losses[:, :, test_idx])


# ---- costs --------------------------------------------------------------------------------
def time_task(name: str, models: int = 10) -> dict[str, float]:
    """On one thread: the seconds of one training run of the task's model, of one retrained
    model of its ground truth (``models`` of them trained, nothing cached) and the hours of
    its whole ground truth."""
    torch.set_num_threads(1)
    qt = TASKS[name]()
    settings = settings_of(qt, n_subsets=max(2, models), repeats=1)
    start = time.perf_counter()
    ground_truth(qt.task, qt.train, qt.test, settings)  # no cache_dir: nothing kept
    per_model = (time.perf_counter() - start) / settings.n_subsets
    return {"train_seconds": qt.info["train_seconds"], "seconds_per_model": per_model,
            "models": qt.n_subsets * qt.repeats,
            "ground_truth_hours": per_model * qt.n_subsets * qt.repeats / 3600}


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Costs and ground truth of the quality tasks.")
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--time", action="store_true", help="time training and retraining")
    p.add_argument("--models", type=int, default=10, help="models retrained by --time")
    args = p.parse_args(argv)
    if args.time:
        print(args.task, time_task(args.task, args.models), flush=True)
        return
    torch.set_num_threads(1)
    qt = TASKS[args.task]()
    print(args.task, qt.info, flush=True)
    print(truth(qt, progress=True).to_dict(), flush=True)


if __name__ == "__main__":
    main()
