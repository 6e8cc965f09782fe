"""The Attribution result: plain on-disk form and proponent/opponent rankings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from iif.results.attribution import META_FILE, SCORES_FILE, Attribution


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


# ---- (index, score) pairs, the helpful view, long tables -------------------------------------
def test_rankings_with_scores_are_index_score_pairs_sorted():
    a = _attribution()
    for s in range(a.n_test):
        pro = a.proponents(s, k=4, with_scores=True)
        opp = a.opponents(s, k=4, with_scores=True)
        assert [i for i, _ in pro] == list(a.proponents(s, k=4))  # default unchanged
        assert [p.index for p in opp] == list(a.opponents(s, k=4))
        assert all(type(i) is int and type(v) is float for i, v in pro + opp)
        assert [v for _, v in pro] == sorted(a.scores[s])[:4]
        assert [v for _, v in opp] == sorted(a.scores[s], reverse=True)[:4]
        assert all(v == a.scores[s, i] for i, v in pro + opp)
    assert isinstance(a.proponents(0, k=2), np.ndarray)


def test_helpful_view_flips_the_sign_and_keeps_proponents():
    a = _attribution()
    h = a.helpful
    assert h.orientation == "helpful" and a.orientation == "loss"
    np.testing.assert_array_equal(h.scores, -a.scores)
    for s in range(a.n_test):
        assert list(h.proponents(s, k=5)) == list(a.proponents(s, k=5))
        assert list(h.opponents(s, k=5)) == list(a.opponents(s, k=5))
        assert all(v > 0 for _, v in h.proponents(s, k=2, with_scores=True))
    assert h.helpful is h and a.oriented("loss") is a
    np.testing.assert_array_equal(h.oriented("loss").scores, a.scores)
    h.info["note"] = "changed"  # a view's info is its own
    assert a.info["note"] == "ok"
    with pytest.raises(ValueError, match="orientation"):
        a.oriented("up")
    with pytest.raises(ValueError, match="contrast"):
        Attribution(np.ones((1, 3)), "iif", info={"contrast": {"A": [1], "B": [2]}}).oriented(
            "helpful")


def test_helpful_view_round_trips_and_says_so(tmp_path):
    h = _attribution().helpful
    h.save(tmp_path / "h")
    meta = json.loads((tmp_path / "h" / META_FILE).read_text())
    assert meta["orientation"] == "helpful" and "lowers" in meta["sign"]
    back = Attribution.load(tmp_path / "h")
    assert back.orientation == "helpful"
    np.testing.assert_array_equal(back.scores, h.scores)
    _attribution().save(tmp_path / "l")  # the default result writes no orientation key
    assert "orientation" not in json.loads((tmp_path / "l" / META_FILE).read_text())


def _table_expectation(a, k=None):
    rows = []
    for s in range(a.n_test):
        order = list(a.proponents(s, k=a.n_train))
        for r, i in enumerate(order, start=1):
            if k is None or r <= k or r > a.n_train - k:
                rows.append((s, i, a.scores[s, i], r))
    return rows


def test_write_table_is_a_long_csv(tmp_path):
    import csv

    a = _attribution()
    path = a.write_table(tmp_path / "sub" / "table.csv")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["test", "train", "score", "rank"]
    got = [(int(t), int(i), float(v), int(r)) for t, i, v, r in rows[1:]]
    assert len(got) == a.n_test * a.n_train
    assert got == _table_expectation(a)  # scores read back exactly
    top = a.write_table(tmp_path / "top.csv", k=2, test_indices=[7, 8, 9])
    with open(top, newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [(int(t), int(r)) for t, _, _, r in rows[:4]] == [(7, 1), (7, 2), (7, 9), (7, 10)]
    assert len(rows) == 3 * 4
    assert [int(i) for _, i, _, r in rows[:2]] == list(a.proponents(0, k=2))
    with pytest.raises(ValueError, match="test_indices"):
        a.write_table(tmp_path / "x.csv", test_indices=[1, 2])
    with pytest.raises(ValueError, match="k must be"):
        a.write_table(tmp_path / "x.csv", k=0)


def test_to_pandas_long_format():
    pd = pytest.importorskip("pandas")
    a = _attribution().helpful
    df = a.to_pandas()
    assert list(df.columns) == ["test", "train", "score", "rank"]
    assert isinstance(df, pd.DataFrame) and len(df) == 30
    assert list(df.itertuples(index=False, name=None)) == _table_expectation(a)
    assert len(a.to_pandas(k=3)) == 18


def test_to_pandas_without_pandas_says_what_to_do(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(ImportError, match="pip install pandas.*write_table"):
        _attribution().to_pandas()
