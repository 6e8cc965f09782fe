"""Runs described from outside Python.

- ``cli``: the ``iif`` command (attribute, show, explain, report, demo, reproduce).
- ``config``: TOML settings and flags turned into a method.
- ``distributed``: torchrun; ranks agree on the run key and split tests or training.

Imports: any part of the library; nothing imports ``iif.runs`` but ``iif.__main__``.
"""
