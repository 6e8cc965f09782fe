"""Fixtures of the task tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """Sizes of every read of streamed inputs, which read 16 samples at a time here."""
    import iif.task.data
    from iif.engine.functional import FunctionalModel
    from iif.task.data import StreamedInputs

    sizes: list[int] = []
    original = StreamedInputs._read

    def counting(self, positions):
        sizes.append(len(positions))
        return original(self, positions)

    monkeypatch.setattr(StreamedInputs, "_read", counting)
    # model outputs are read 1024 samples at a time: 16 here, so that the data sets of these
    # tests (40 to 60 samples) are read in parts
    monkeypatch.setattr(FunctionalModel.outputs, "__defaults__", (16,))
    monkeypatch.setattr(iif.task.data, "READ_BATCH", 16)
    return sizes
