"""A smoke run of the language-model blocks: corpus, tokenizer, model, a few epochs of
training, train/test mean token loss and the time per epoch.

    python -m iif_paper.lm.smoke [--tiny] [--n-train 2000] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from iif_paper.lm.corpus import DEFAULT_FOLDER, load_fortunes
from iif_paper.lm.model import build_model, sequence_log_prob, train_lm
from iif_paper.lm.tokenizer import IGNORE, encode

TINY = Path(__file__).resolve().parents[3] / "tests" / "data" / "tiny_fortunes"


def token_loss(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over all documents."""
    return float(-sequence_log_prob(model, ids, targets).sum() / (targets != IGNORE).sum())


def smoke(folder: str | Path = DEFAULT_FOLDER, n_train: int = 2000, n_test: int = 200,
          epochs: int = 3, length: int = 128, lr: float = 3e-3, batch_size: int = 32,
          seed: int = 0) -> dict[str, float]:
    """Train a fresh default model for ``epochs`` on ``n_train`` documents; print and return
    the train/test mean token losses and the seconds per epoch."""
    corpus = load_fortunes(folder, max_bytes=length - 2, n_train=n_train, n_test=n_test,
                           seed=seed)
    train, test = encode(corpus.train, length), encode(corpus.test, length)
    model = build_model(seed, max_length=length)
    params = sum(p.numel() for p in model.parameters())
    print(f"{len(corpus.train)} train / {len(corpus.test)} test documents, "
          f"{params / 1e6:.2f} M parameters, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    history = train_lm(model, *train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    per_epoch = (time.perf_counter() - start) / epochs
    result = {"epoch_seconds": per_epoch, "train_loss": token_loss(model, *train),
              "test_loss": token_loss(model, *test), "final_epoch_doc_loss": history[-1]}
    print(f"{per_epoch:.1f} s/epoch; mean token loss train {result['train_loss']:.3f}, "
          f"test {result['test_loss']:.3f} nats (uniform: {torch.log(torch.tensor(259.)):.3f})")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test corpus")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tiny:
        smoke(TINY, n_train=args.n_train, n_test=6, epochs=args.epochs)
    else:
        smoke(n_train=args.n_train, n_test=args.n_test, epochs=args.epochs)


if __name__ == "__main__":
    main()
