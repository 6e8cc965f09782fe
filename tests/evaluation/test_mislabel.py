"""Label flipping and mislabel-detection metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iif.errors import InputError
from iif.evaluation.mislabel import detection_curve, flip_labels, mislabel_auc


def test_flip_labels_flips_exactly_the_requested_count():
    labels = np.arange(50) % 4
    noisy, flipped = flip_labels(labels, fraction=0.1, seed=3)
    assert flipped.dtype == bool and flipped.sum() == 5
    assert np.all(noisy[flipped] != labels[flipped])
    np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])
    assert noisy.min() >= 0 and noisy.max() <= 3
    np.testing.assert_array_equal(labels, np.arange(50) % 4)  # the input is untouched
    assert flip_labels(np.arange(30) % 3, fraction=0.1)[1].sum() == 3
    assert flip_labels(labels, fraction=0.0)[1].sum() == 0


def test_flip_labels_is_seeded():
    labels = np.arange(40) % 5
    a, ma = flip_labels(labels, 0.25, seed=1)
    b, mb = flip_labels(labels, 0.25, seed=1)
    c, mc = flip_labels(labels, 0.25, seed=2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert not np.array_equal(ma, mc)


def test_new_class_is_uniform_among_the_others():
    labels = np.zeros(3000, dtype=np.int64)
    noisy, flipped = flip_labels(labels, fraction=1.0, num_classes=4, seed=0)
    assert flipped.all()
    counts = np.bincount(noisy, minlength=4)
    assert counts[0] == 0
    assert np.all(np.abs(counts[1:] - 1000) < 100)


def test_flip_labels_keeps_torch_tensors():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    noisy, flipped = flip_labels(labels, fraction=0.3, num_classes=5, seed=4)
    assert isinstance(noisy, torch.Tensor) and noisy.dtype == labels.dtype
    assert isinstance(flipped, torch.Tensor) and flipped.dtype == torch.bool
    assert int(flipped.sum()) == 3 and bool((noisy[flipped] != labels[flipped]).all())


@pytest.mark.parametrize(("labels", "kwargs", "match"), [
    (np.array([0, 1, 2]), {"fraction": 1.5}, "fraction"),
    (np.array([0, 1, 2]), {"num_classes": 2}, "out of range"),
    (np.array([0, 0, 0]), {}, "at least 2 classes"),
    (np.array([0.5, 1.0]), {}, "integer"),
    (np.array([-1, 1]), {}, ">= 0"),
    (np.zeros((2, 2), dtype=int), {}, "1-d"),
])
def test_flip_labels_rejects_bad_input(labels, kwargs, match):
    with pytest.raises(InputError, match=match):
        flip_labels(labels, **kwargs)


def test_mislabel_auc_hand_case():
    self_influence = np.array([-5.0, -1.0, 0.0, 2.0])
    flipped = np.array([True, False, True, False])
    # scores -si = [5, 1, 0, -2]; positive/negative pairs won: (5>1, 5>-2, 0<1, 0>-2) = 3 of 4
    assert mislabel_auc(self_influence, flipped) == pytest.approx(0.75)
    assert mislabel_auc(np.array([-3.0, 1.0, -2.0, 4.0]), flipped) == pytest.approx(1.0)
    assert mislabel_auc(torch.tensor([-3.0, 1.0, -2.0, 4.0]), torch.tensor(flipped)) == 1.0
    with pytest.raises(InputError, match="boolean"):
        mislabel_auc(self_influence, flipped.astype(int))


def test_detection_curve_hand_case():
    si = np.array([-9.0, -8.0, 5.0, -7.0, 1.0, 2.0, 3.0, 4.0, 6.0, 0.0])
    flipped = np.zeros(10, dtype=bool)
    flipped[[0, 3, 4]] = True
    # ranking (most negative first): 0, 1, 3, 9, 4, 5, 6, 7, 2, 8
    curve = detection_curve(si, flipped, fractions=(0.1, 0.2, 0.3, 0.5, 1.0))
    assert curve == pytest.approx({0.1: 1 / 3, 0.2: 1 / 3, 0.3: 2 / 3, 0.5: 1.0, 1.0: 1.0})
    assert list(detection_curve(si, flipped)) == [0.05, 0.1, 0.2, 0.3]
    assert detection_curve(si, flipped)[0.05] == pytest.approx(1 / 3)  # 0.5 -> 1 sample
    with pytest.raises(InputError, match="fractions"):
        detection_curve(si, flipped, fractions=(0.0,))
