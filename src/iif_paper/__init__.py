"""The paper's reproduction harness, beside the :mod:`iif` library and built on its public API.

- :mod:`iif_paper.experiments`: one module per table or figure of the paper, run by
  ``iif reproduce NAME``;
- :mod:`iif_paper.demo`: the digits example behind ``iif demo`` (``make demo``);
- :mod:`iif_paper.data`: offline loaders for scikit-learn digits, MNIST and CIFAR-10;
- :mod:`iif_paper.lds_job`: the LDS ground-truth runner for ``torchrun``.

The library never imports this package (only the ``iif demo`` and ``iif reproduce`` commands
do, when they run); this package imports the library.
"""
