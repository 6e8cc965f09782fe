"""A task function for ``iif attribute`` / ``iif explain``: the MNIST MLP of the paper's
experiments, trained here on 5,000 seeded training images (10 epochs, seed 0), with the 2,000
seeded test images the contrast experiment draws from.

    iif explain --task docs/scripts/mnist_task.py:build --test-index 1273 --contrast runner-up
"""

from __future__ import annotations

import iif
from iif_paper.experiments import mnist


def build():
    (x, y), (xt, yt) = mnist.draw(5000, 2000, seed=0)
    task = mnist.task(seed=0, epochs=10)
    iif.train(task, (x, y), seed=0, progress=False)
    return task, (x, y), (xt, yt)
