"""Data sets available offline. Loaders read local files only; none downloads anything."""

from iif_paper.data.digits import load_digits
from iif_paper.data.mnist import load_mnist

__all__ = ["load_digits", "load_mnist"]
