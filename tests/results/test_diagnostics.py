"""Trust flags: which test samples' answers cannot be trusted, by global test index, through
the method, the ensemble mean, the result store, the command line and the pictures."""

from __future__ import annotations

import json
import logging

import matplotlib.text
import numpy as np
import pytest
import tiny_job
import torch

from iif import Attribution, BaselineSettings
from iif.methods.base import completeness_gap
from iif.results.diagnostics import (
    GAP_THRESHOLD,
    KINDS,
    MOVE_THRESHOLD,
    describe,
    flagged,
    globalized,
    index_offset,
    judged_gap,
    kinds_of,
    log_flags,
    name_tests,
    summarize,
    trust_flags,
)
from iif.results.runkey import RunKey
from iif.results.store import ResultStore, attribute_to
from iif.runs.cli import main
from iif.views.report import plot_proponents_opponents, plot_rankings

NOT_MOVED = BaselineSettings(epochs=0)  # theta' = theta*: delta = 0 for every test sample
SETTINGS_NOT_MOVED = tiny_job.SETTINGS + "\n[baseline]\nepochs = 0\n"


@pytest.fixture(scope="module")
def problem():
    return tiny_job.problem()


@pytest.fixture
def iif_logs(caplog, monkeypatch):
    """The package's warnings, also after the command line stopped them propagating."""
    monkeypatch.setattr(logging.getLogger("iif"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="iif")
    return caplog


def _completeness(total, delta):
    total, delta = np.asarray(total, float), np.asarray(delta, float)
    return {"sum": total, "delta": delta, "gap": completeness_gap(total, delta)}


# ---- the rule --------------------------------------------------------------------------------
def test_rule_on_hand_made_completeness_with_nan_and_an_offset():
    assert GAP_THRESHOLD == 0.5 and MOVE_THRESHOLD == 1e-3
    completeness = {
        "sum": np.zeros(7),  # only delta and gap are read
        "delta": np.array([-2.0, 5e-4, 0.0, np.nan, -1.0, 1e-3, -3e-7]),
        "gap": np.array([0.1, 0.2, np.nan, np.nan, 0.6, 0.5, 40.0]),
    }
    info = {"fallback_tests": [2], "truncated_tests": [4]}
    flags = trust_flags(completeness, info, offset=10)
    assert list(flags) == list(KINDS)
    assert flags == {
        "baseline_not_moved": [11, 12, 16],  # |delta| < 1e-3; 1e-3 itself moved; NaN is not
        "fallback": [12],
        "truncated": [14],
        "sign_mismatch": [],  # sums of 0 have no sign
        "large_gap": [],  # the size of the gap is judged only when asked
    }
    assert flagged(flags) == [11, 12, 14, 16]
    assert kinds_of(flags, 12) == ["baseline_not_moved", "fallback"]
    assert kinds_of(flags, 10) == []
    judged = trust_flags(completeness, info, offset=10, gap_threshold=GAP_THRESHOLD)
    assert judged["large_gap"] == [12, 13, 14, 16]  # > 0.5 or NaN; 0.5 itself is not large
    assert kinds_of(judged, 12) == ["baseline_not_moved", "fallback", "large_gap"]
    # thresholds are arguments
    strict = trust_flags(completeness, info, gap_threshold=0.05, move_threshold=1.5)
    assert strict["baseline_not_moved"] == [1, 2, 4, 5, 6]
    assert strict["large_gap"] == [0, 1, 2, 3, 4, 5, 6]


def test_gap_from_completeness_gap_counts_delta_zero_as_large():
    comp = _completeness([1.0, 0.9, 0.7], [0.0, -1.0, 1.0])
    flags = trust_flags(comp, gap_threshold=GAP_THRESHOLD)
    assert flags["large_gap"] == [0, 1]  # NaN (delta = 0) and |0.9 + 1| / 1 = 1.9
    assert flags["baseline_not_moved"] == [0]
    assert flags["sign_mismatch"] == [1]  # +0.9 against -1; delta 0 has no sign


def test_sign_mismatch_is_the_default_verdict_on_the_sum():
    # sums of the same sign as delta pass however far they are from it; opposite signs do not
    comp = _completeness([-0.01, -30.0, 0.2, -0.5, 0.0], [-2.0, -1.0, -1.0, 1.0, 1.0])
    flags = trust_flags(comp, offset=3)
    assert flags["sign_mismatch"] == [5, 6] and flags["large_gap"] == []
    text = summarize(flags, comp, offset=3)
    assert text.startswith("tests 5 (sum +0.2, delta -1), 6 (sum -0.5, delta +1): the scores "
                           "add up to a loss change of the opposite sign")
    assert text.endswith("these scores are not a reliable explanation")
    assert describe(flags, 5, comp, row=2).startswith("not a reliable explanation: the scores")


def test_the_gap_against_the_path_end_is_judged_where_it_was_measured():
    # rows 0, 1: delta_path measured (its gap judged); row 2: not measured (the gap to theta')
    comp = {"sum": np.array([-1.0, -1.0, -1.0]), "delta": np.array([-1.0, -4.0, -4.0]),
            "delta_path": np.array([-4.0, -1.1, np.nan])}
    comp["gap"] = completeness_gap(comp["sum"], comp["delta"])
    comp["gap_path"] = completeness_gap(comp["sum"], comp["delta_path"])
    np.testing.assert_allclose(judged_gap(comp), [0.75, 1 / 11, 0.75])
    assert trust_flags(comp, gap_threshold=0.5)["large_gap"] == [0, 2]
    assert trust_flags(comp)["large_gap"] == []
    assert judged_gap(_completeness([-1.0], [-2.0]))[0] == 0.5  # no path: the gap to theta'


def test_without_completeness_only_fallback_and_truncated_apply():
    flags = trust_flags(None, {"fallback_tests": [0], "truncated_tests": [1, 3]}, offset=4)
    assert flags == {"baseline_not_moved": [], "fallback": [4], "truncated": [5, 7],
                     "sign_mismatch": [], "large_gap": []}
    assert trust_flags(None, {}) == {kind: [] for kind in KINDS}
    assert summarize(trust_flags(None, {})) is None


def test_members_and_chunks_are_read_with_their_offsets():
    comp = _completeness([-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0])  # sound combined
    info = {"members": [
        {"fallback_tests": [1], "flags": {"large_gap": [0, 2], "baseline_not_moved": [1]}},
        {"truncated_tests": [], "flags": {"baseline_not_moved": [2], "truncated": [0]}},
    ], "flags": {"large_gap": [0, 1, 2]}}  # the info's own flags are not read
    flags = trust_flags(comp, info)
    assert flags == {"baseline_not_moved": [1, 2], "fallback": [1], "truncated": [0],
                     "sign_mismatch": [], "large_gap": []}  # judged on the combined sums
    store_info = {"chunks": [
        {"rows": [0, 4], "truncated_tests": [3]},
        {"rows": [4, 6], "fallback_tests": [1], "members": [{"truncated_tests": [0]}]},
    ]}
    assert trust_flags(None, store_info) == {"baseline_not_moved": [], "fallback": [5],
                                             "truncated": [3, 4], "sign_mismatch": [],
                                             "large_gap": []}


def test_globalized_info_is_read_as_global_and_older_chunks_as_rows():
    info = {"fallback_tests": [1], "truncated_tests": [0], "fallbacks": 1,
            "flags": {"fallback": [1], "baseline_not_moved": [1], "large_gap": [],
                      "truncated": [0]},
            "members": [{"fallback_tests": [], "truncated_tests": [2],
                         "flags": {"truncated": [2]}}],
            "damping": [0.1, 0.2]}
    shifted = globalized(info, 4)
    assert shifted["fallback_tests"] == [5] and shifted["truncated_tests"] == [4]
    assert shifted["flags"] == {"fallback": [5], "baseline_not_moved": [5], "large_gap": [],
                                "truncated": [4]}
    assert shifted["members"][0]["truncated_tests"] == [6]
    assert shifted["members"][0]["flags"] == {"truncated": [6]}
    assert shifted["damping"] == [0.1, 0.2] and shifted["fallbacks"] == 1
    assert shifted["test_offset"] == 4 and "test_offset" not in info  # a copy
    assert info["fallback_tests"] == [1]
    # a store's chunks: globalized ones as they are, older ones offset by their first row
    # (a chunk's own flags are not read: the store's completeness gives not-moved and gaps)
    store_info = {"chunks": [{"rows": [0, 4], "truncated_tests": [3]},
                             {"rows": [4, 7], **shifted}]}
    assert trust_flags(None, store_info) == {"baseline_not_moved": [], "fallback": [5],
                                             "truncated": [3, 4, 6], "sign_mismatch": [],
                                             "large_gap": []}


def test_name_tests_by_global_index():
    assert name_tests([1]) == "test 1"
    with index_offset(10):
        assert name_tests(np.array([1])) == "test 11"
        assert name_tests(range(3)) == "tests 10, 11, 12"
        assert name_tests(range(14), limit=2) == "tests 10, 11 and 12 more"


def test_summary_names_global_indices_under_their_most_telling_kind():
    comp = {"sum": np.zeros(4), "delta": np.array([0.0, -3e-7, -1.0, -2.0]),
            "gap": np.array([np.nan, 12.0, 0.93, 0.1])}
    flags = trust_flags(comp, {"fallback_tests": [0]}, offset=14, gap_threshold=GAP_THRESHOLD)
    text = summarize(flags, comp, offset=14)
    assert "\n" not in text
    assert text.startswith("test 15 (delta -3e-07): the baseline did not move the test loss")
    assert "; test 14: unlearning diverged at once" in text
    assert "test 16 (gap 0.93): the scores do not add up" in text
    assert text.count("14") == 1 and text.count("15") == 1  # each named once
    assert text.endswith("these scores are not a reliable explanation")
    # without completeness: no values; many indices are cut at the limit
    many = {"large_gap": list(range(100, 125))}
    text = summarize(many)
    assert text.startswith("tests 100, 101,") and "109 and 15 more:" in text
    assert "110" not in text
    # a truncated baseline alone is a caution, not a verdict
    text = summarize({"truncated": [3]})
    assert "last sound epoch" in text and "not a reliable" not in text
    assert summarize({kind: [] for kind in KINDS}) is None and summarize(None) is None


def test_describe_one_sample():
    comp = {"sum": np.zeros(2), "delta": np.array([-1.0, 2e-5]), "gap": np.array([0.2, 3.0])}
    flags = trust_flags(comp, offset=7)
    assert describe(flags, 7, comp, row=0) is None
    note = describe(flags, 8, comp, row=1)
    assert note.startswith("not a reliable explanation: the baseline did not move")
    assert "delta +2e-05" in note and "gap" not in note
    assert describe({"truncated": [0]}, 0).startswith("caution: ")


def test_logged_warning_is_shifted_by_the_index_offset(iif_logs):
    logger = logging.getLogger("iif.test_diagnostics")
    comp = {"sum": np.zeros(2), "delta": np.array([-1.0, 0.0]), "gap": np.array([0.1, np.nan])}
    flags = trust_flags(comp)
    with index_offset(4):
        text = log_flags(logger, flags, comp)
    assert text.startswith("test 5 (delta 0): the baseline did not move")
    assert log_flags(logger, {kind: [] for kind in KINDS}) is None
    warnings = [r.getMessage() for r in iif_logs.records if r.name == logger.name]
    assert warnings == [text]


# ---- Integrated Influence ------------------------------------------------------------------
def test_iif_flags_baselines_that_did_not_move_and_names_them(problem, tmp_path, iif_logs):
    task, train, test = problem
    result = tiny_job.method(task, train, baseline=NOT_MOVED).attribute(test)
    np.testing.assert_array_equal(result.completeness["delta"], np.zeros(6))
    flags = result.info["flags"]
    assert flags["baseline_not_moved"] == [0, 1, 2, 3, 4, 5]
    assert flags["large_gap"] == []  # the size of a gap is not judged by default
    assert flags["fallback"] == [] and flags["truncated"] == []
    warnings = [r.getMessage() for r in iif_logs.records
                if r.name == "iif.methods.integrated.integrated" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "tests 0 (delta 0), 1 (delta 0)" in warnings[0] and "5 (delta 0)" in warnings[0]
    assert Attribution.load(result.save(tmp_path)).info["flags"] == flags


def test_explained_sample_is_flagged_by_its_index(problem, tmp_path, iif_logs):
    from iif.views.explain import explain

    task, train, test = problem
    method = tiny_job.method(task, train, baseline=NOT_MOVED)
    text, record = explain(method, test, 5, tmp_path, k=3, image_shape=(2, 2))
    assert "warning: test 5 (delta 0): the baseline did not move" in text
    assert record["flags"] == ["baseline_not_moved"]
    assert record["warning"].startswith("not a reliable explanation")
    assert (tmp_path / "explain_5.png").stat().st_size > 1000
    logged = [r.getMessage() for r in iif_logs.records
              if r.name == "iif.methods.integrated.integrated"]
    assert logged and logged[-1].startswith("test 5 (delta 0)")


def test_ensemble_flags_union_members_and_judge_the_mean_gap(problem):
    task, train, test = problem
    method = tiny_job.method(task, train)
    row = np.zeros((3, 200))
    member_a = Attribution(row, "iif", {}, _completeness([-1.0, -0.1, -1.0],
                                                         [-1.0, -1.0, -1.0]),
                           {"fallback_tests": [1], "truncated_tests": [],
                            "flags": {"large_gap": [1]}})
    member_b = Attribution(row, "iif", {}, _completeness([-1.0, -1.9, 0.0],
                                                         [-1.0, -1.0, 1e-4]),
                           {"fallback_tests": [], "truncated_tests": [0],
                            "flags": {"baseline_not_moved": [2], "large_gap": [1, 2]}})
    combined = method._combine([member_a, member_b])
    # member gaps of 0.9 cancel in the mean (sum -1.0 against delta -1.0)
    assert combined.completeness["gap"][1] == pytest.approx(0.0)
    assert combined.info["flags"] == {"baseline_not_moved": [2], "fallback": [1],
                                      "truncated": [0], "sign_mismatch": [], "large_gap": []}
    assert len(combined.info["members"]) == 2
    # the mean delta (-0.5) is not what did not move: no value is quoted for it
    assert summarize(combined.info["flags"], combined.completeness).startswith(
        "test 2: the baseline did not move")


# ---- the result store and the command line -------------------------------------------------
def _chunk(n: int, info: dict, delta) -> Attribution:
    delta = np.asarray(delta, float)
    return Attribution(np.zeros((n, 3)), "iif", {}, _completeness(delta, delta), info)


def test_store_assembles_flags_by_global_index(tmp_path):
    store = ResultStore(tmp_path, method="iif", settings={"x": 1}, key=RunKey({"x": "h"}),
                        n_test=7, n_train=3, bounds=[0, 4, 7])
    first = _chunk(4, {"fallback_tests": [], "truncated_tests": []}, [-1.0] * 4)
    first.info["flags"] = trust_flags(first.completeness, first.info)
    second = _chunk(3, {"fallback_tests": [], "truncated_tests": [1]}, [-1.0, -1.0, 2e-4])
    second.info["flags"] = trust_flags(second.completeness, second.info)
    assert second.info["flags"]["baseline_not_moved"] == [2]  # chunk-relative
    store.write(0, 4, first)
    store.write(4, 7, second)
    result = store.assemble()
    assert result.info["flags"] == {"baseline_not_moved": [6], "fallback": [],
                                    "truncated": [5], "sign_mismatch": [], "large_gap": []}
    assert result.info["chunks"][1]["rows"] == [4, 7]
    loaded = Attribution.load(tmp_path)
    assert loaded.info["flags"] == result.info["flags"]
    assert summarize(loaded.info["flags"], loaded.completeness).startswith(
        "test 6 (delta +0.0002): the baseline did not move")


def test_store_run_names_global_indices(problem, tmp_path, iif_logs):
    task, train, test = problem
    result = attribute_to(tmp_path, tiny_job.method(task, train, baseline=NOT_MOVED), test,
                          chunk=4)
    assert result.info["flags"]["baseline_not_moved"] == [0, 1, 2, 3, 4, 5]
    second = result.info["chunks"][1]
    # a chunk's info names its test samples by global index, as the warnings do
    assert second["rows"] == [4, 6] and second["flags"]["baseline_not_moved"] == [4, 5]
    assert second["test_offset"] == 4
    logged = [r.getMessage() for r in iif_logs.records
              if r.name == "iif.methods.integrated.integrated"]
    assert len(logged) == 2 and logged[1].startswith("tests 4 (delta 0), 5 (delta 0):")


def test_store_run_names_a_later_chunks_fallback_by_global_index(problem, tmp_path, iif_logs,
                                                                 monkeypatch):
    import iif.methods.integrated.baseline as baseline

    task, train, test = problem
    target = torch.as_tensor(test[0][4])
    real = baseline._soundness

    def soundness(task_, fmodel, train_, test_, goal, reasons):
        if len(test_) == 1 and torch.allclose(test_.x[0].cpu().double(), target):
            def diverged(candidate):  # test 4's unlearning diverges in its first epoch
                reasons.append("forced by the test")
                return False
            return diverged
        return real(task_, fmodel, train_, test_, goal, reasons)

    monkeypatch.setattr(baseline, "_soundness", soundness)
    result = attribute_to(tmp_path, tiny_job.method(task, train), test, chunk=3)
    # test 4 is row 1 of the second chunk [3, 6)
    second = result.info["chunks"][1]
    assert second["rows"] == [3, 6] and second["test_offset"] == 3
    assert second["fallback_tests"] == [4] and second["flags"]["fallback"] == [4]
    assert 4 in second["flags"]["baseline_not_moved"]
    assert result.info["chunks"][0]["fallback_tests"] == []
    assert result.info["flags"]["fallback"] == [4]
    assert Attribution.load(tmp_path).info["flags"] == result.info["flags"]
    summary = summarize(result.info["flags"], result.completeness)
    assert "test 4: unlearning diverged at once" in summary
    warnings = [r.getMessage() for r in iif_logs.records if r.levelno == logging.WARNING]
    assert ("unlearning diverged in its first epoch for test 4 (forced by the test); "
            "falling back") in " ".join(warnings)
    flagged_lines = [w for w in warnings if "unlearning diverged at once" in w]
    assert len(flagged_lines) == 1 and "test 4: unlearning diverged at once" in \
        flagged_lines[0]
    assert not any("test 1:" in w for w in warnings)  # its row in the chunk is never named


def test_cli_prints_flags_by_global_index(tmp_path, capsys):
    settings = tmp_path / "s.toml"
    settings.write_text(SETTINGS_NOT_MOVED)
    out = tmp_path / "run"
    assert main(["attribute", "--task", "tiny_job:job", "--out", str(out), "--settings",
                 str(settings), "--chunk", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    warning = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "4 (delta 0), 5 (delta 0): the baseline did not move" in \
        warning[0]
    meta = json.loads((out / "attribution.json").read_text())
    assert meta["info"]["flags"]["baseline_not_moved"] == [0, 1, 2, 3, 4, 5]
    assert main(["show", str(out), "--task", "tiny_job:job", "--test-index", "5", "--top", "3",
                 "--image-shape", "2", "2"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("warning:") == 2  # the summary and test 5's own line
    assert "warning: test 5: not a reliable explanation" in shown
    assert (out / "show_5.png").stat().st_size > 1000


def test_store_without_completeness_flags_nothing(tmp_path):
    store = ResultStore(tmp_path, method="trak", settings={}, key=RunKey({"x": "h"}),
                        n_test=3, n_train=3, bounds=[0, 2, 3])
    store.write(0, 2, Attribution(np.zeros((2, 3)), "trak", {}, None, {"damping": [0.1]}))
    store.write(2, 3, Attribution(np.zeros((1, 3)), "trak", {}, None, {"damping": [0.1]}))
    result = store.assemble()
    assert result.completeness is None
    assert result.info["flags"] == {kind: [] for kind in KINDS}
    assert summarize(result.info["flags"]) is None


# ---- pictures ------------------------------------------------------------------------------
def test_pictures_take_a_warning(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(20, 16, generator=gen).numpy()
    labels = np.arange(20) % 3
    scores = np.linspace(-1.0, 1.0, 20)
    note = ("not a reliable explanation: the baseline did not move the test loss (delta 0, "
            "|delta| < 0.001); the scores do not add up to the loss change")
    png = plot_proponents_opponents(images[0], 1, images, labels, scores, tmp_path / "a.png",
                                    k=3, image_shape=(4, 4), warning=note,
                                    completeness={"sum": 0.1, "delta": 0.0, "gap": np.nan})
    plain = plot_proponents_opponents(images[0], 1, images, labels, scores, tmp_path / "b.png",
                                      k=3, image_shape=(4, 4))
    rows = [("proponents", [{"index": 0, "label": 0, "score": -1.0}]),
            ("opponents", [{"index": 19, "label": 1, "score": 1.0}])]
    ranked = plot_rankings(images[0], "Test sample 5", rows, images, tmp_path / "c.png",
                           image_shape=(4, 4), warning=note)
    for path in (tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def texts(figure) -> str:
        return " ".join(t.get_text() for t in figure.findobj(matplotlib.text.Text))

    assert "not a reliable explanation" in texts(png) and "not a reliable" in texts(ranked)
    assert "not a reliable" not in texts(plain)
