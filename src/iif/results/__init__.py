"""What a run leaves behind, and what makes it trustworthy.

- ``attribution``: ``Attribution``, scores (n_test, n_train) with completeness and info.
- ``diagnostics``: per-test trust flags (fallbacks, unmoved baselines, completeness gaps).
- ``runkey``: the run key, the digest of everything that determines the scores.
- ``chunks``: checksummed, keyed, locked chunk folders.
- ``store``: a resumable attribution run on disk.
- ``fitted``: a method's fitted training side (safetensors + JSON), handed over by the method.
- ``trained``: a trained model cached on disk under its key (``train_cached``).

Imports: the ground floor, ``iif.task`` and ``iif.engine``; never a method (a method hands
results what they need).
"""
