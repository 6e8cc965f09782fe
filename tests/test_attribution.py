"""The Attribution result: plain on-disk form and proponent/opponent rankings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from iif.attribution import META_FILE, SCORES_FILE, Attribution


def _attribution():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 10))
    completeness = {
        "sum": np.array([0.5, -1.25, 2.0]),
        "delta": np.array([0.25, 0.0, np.float32(1.5)]),
        "gap": np.array([1.0, np.nan, 1 / 3]),
    }
    settings = {
        "path": {"steps": 5, "sparse": True},
        "curvature": {"kind": "fisher", "damping": None, "default_damping_ratio": 0.1},
        "projection": {"dim": None, "seed": 0},
        "lam": np.float64(0.5),
    }
    info = {"dampings": [0.1, 0.2], "retries": np.int64(2), "fallbacks": 0, "seconds": 1.5,
            "note": "ok"}
    return Attribution(scores, "iif", settings, completeness, info)


def test_save_load_round_trip(tmp_path):
    a = _attribution()
    folder = a.save(tmp_path / "run")
    assert folder == tmp_path / "run"
    b = Attribution.load(folder)
    assert b.method == "iif"
    assert b.scores.dtype == np.float64
    np.testing.assert_array_equal(b.scores, a.scores)
    assert set(b.completeness) == {"sum", "delta", "gap"}
    for key, values in a.completeness.items():
        np.testing.assert_array_equal(b.completeness[key], np.asarray(values, dtype=float))
    assert np.isnan(b.completeness["gap"][1])
    assert b.settings == {
        "path": {"steps": 5, "sparse": True},
        "curvature": {"kind": "fisher", "damping": None, "default_damping_ratio": 0.1},
        "projection": {"dim": None, "seed": 0},
        "lam": 0.5,
    }
    assert b.info == {"dampings": [0.1, 0.2], "retries": 2, "fallbacks": 0, "seconds": 1.5,
                      "note": "ok"}
    assert b.n_test == 3 and b.n_train == 10


def test_round_trip_without_completeness(tmp_path):
    a = Attribution(np.arange(6.0).reshape(2, 3), "tracin")
    b = Attribution.load(a.save(tmp_path))
    assert b.completeness is None
    assert b.settings == {} and b.info == {}
    np.testing.assert_array_equal(b.scores, a.scores)


def test_files_are_plain(tmp_path):
    a = _attribution()
    a.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SCORES_FILE, META_FILE])
    assert SCORES_FILE == "scores.npy" and META_FILE == "attribution.json"
    scores = np.load(tmp_path / "scores.npy", allow_pickle=False)
    np.testing.assert_array_equal(scores, a.scores)

    def no_constants(token):
        raise AssertionError(f"non-standard JSON token {token}")

    text = (tmp_path / "attribution.json").read_text()
    meta = json.loads(text, parse_constant=no_constants)
    assert "NaN" not in text and "Infinity" not in text
    assert meta["method"] == "iif"
    assert meta["shape"] == [3, 10]
    assert meta["completeness"]["gap"][1] is None
    assert "raises" in meta["sign"]


def test_non_finite_info_values_are_written_as_null(tmp_path):
    a = Attribution(np.zeros((1, 2)), "iif", {"x": float("inf")},
                    info={"values": np.array([1.0, np.nan])})
    a.save(tmp_path)
    text = (tmp_path / META_FILE).read_text()
    json.loads(text, parse_constant=lambda t: pytest.fail(f"token {t}"))
    b = Attribution.load(tmp_path)
    assert b.settings == {"x": None}
    assert b.info == {"values": [1.0, None]}


def test_numpy_scalars_keep_their_type(tmp_path):
    settings = {"sparse": np.False_, "dense": np.bool_(True), "k": np.int32(4),
                "lam": np.float32(0.5)}
    Attribution(np.zeros((1, 2)), "iif", settings).save(tmp_path)
    b = Attribution.load(tmp_path)
    assert b.settings == {"sparse": False, "dense": True, "k": 4, "lam": 0.5}
    assert b.settings["sparse"] is False


def test_save_overwrites_previous_result(tmp_path):
    _attribution().save(tmp_path)
    a = Attribution(np.ones((2, 2)), "if")
    a.save(tmp_path)
    b = Attribution.load(tmp_path)
    assert b.method == "if"
    np.testing.assert_array_equal(b.scores, np.ones((2, 2)))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_scores_must_be_two_dimensional(shape):
    with pytest.raises(ValueError, match="n_test, n_train"):
        Attribution(np.zeros(shape), "iif")


def test_proponents_are_most_negative_and_opponents_most_positive():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(2, 20))
    a = Attribution(scores, "iif")
    for s in range(2):
        order = sorted(range(20), key=lambda i: scores[s, i])
        assert list(a.proponents(s, k=5)) == order[:5]
        assert list(a.opponents(s, k=5)) == order[::-1][:5]
        assert all(scores[s, i] < 0 for i in a.proponents(s, k=3))
        assert all(scores[s, i] > 0 for i in a.opponents(s, k=3))


def test_rankings_on_a_known_example():
    a = Attribution(np.array([[0.3, -2.0, 1.0, -0.1, 5.0]]), "iif")
    assert list(a.proponents(0, k=2)) == [1, 3]
    assert list(a.opponents(0, k=2)) == [4, 2]
    assert len(a.proponents(0)) == 5  # k larger than n_train


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    Attribution(np.zeros((1, 2)), "iif").save(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("scores.npy", "attribution.json"):
        mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
        assert mode == 0o666 & ~mask
