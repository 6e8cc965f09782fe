"""A small causal language model on Debian's ``fortunes`` corpus: corpus, byte-level
tokenizer, model and training, the building blocks of the language-model benchmark."""

from iif_paper.lm.corpus import Corpus, load_fortunes, read_fortunes
from iif_paper.lm.model import CausalLM, build_model, sequence_log_prob, sequence_loss, train_lm
from iif_paper.lm.tokenizer import BOS, EOS, IGNORE, PAD, VOCAB_SIZE, decode, encode

__all__ = [
    "BOS", "EOS", "IGNORE", "PAD", "VOCAB_SIZE", "CausalLM", "Corpus", "build_model", "decode",
    "encode", "load_fortunes", "read_fortunes", "sequence_log_prob", "sequence_loss",
    "train_lm",
]
