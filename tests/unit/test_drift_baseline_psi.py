"""Drift's pure parts: the baseline's bins and its strict file, PSI and its verdicts on shifted
and unshifted feeds, the rows a --baseline file gives, the report's table and plot."""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pytest
from PIL import Image

from tierserve.catalog import TensorSpec
from tierserve.drift.baseline import (
    BINS,
    MAX_BASELINE_BYTES,
    MAX_FEATURES_PER_INPUT,
    Baseline,
    BaselineError,
    build_baseline,
    feature_columns,
    read_baseline_rows,
)
from tierserve.drift.psi import DRIFTED, MISSING, STABLE, TOO_FEW, WATCH, compare, psi
from tierserve.drift.report import DriftReport, render_png
from tierserve.settings import ModelRef

INPUTS = (TensorSpec("input", "FP32", (-1, 4)),)


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    rows = np.random.default_rng(0).normal(size=(5000, 4))
    return build_baseline("iris", "1", INPUTS, {"input": rows}, source="test rows")


def columns(rows: np.ndarray) -> dict:
    return feature_columns(["input"], {"input": rows})


def test_each_feature_gets_deciles_whose_shares_are_counted(baseline):
    assert [f.name for f in baseline.features] == [f"input[{i}]" for i in range(4)]
    for feature in baseline.features:
        assert len(feature.edges) == BINS - 1 and len(feature.fractions) == BINS
        assert list(feature.edges) == sorted(feature.edges)
        assert sum(feature.fractions) == pytest.approx(1.0)
        assert all(f == pytest.approx(0.1, abs=0.002) for f in feature.fractions)


def test_ties_in_a_discrete_feature_make_fewer_unequal_bins():
    rows = np.repeat(np.array([[0.0], [1.0], [2.0]]), [70, 20, 10], axis=0)
    built = build_baseline("m", "1", (TensorSpec("x", "FP32", (-1, 1)),), {"x": rows}, source="t")
    (feature,) = built.features
    assert len(feature.fractions) == len(feature.edges) + 1 < BINS
    assert sorted(feature.fractions, reverse=True)[0] == pytest.approx(0.7)


def test_a_wide_input_is_one_pooled_feature():
    wide = (TensorSpec("image", "FP32", (-1, 3, 8, 8)),)
    built = build_baseline(
        "c", "1", wide, {"image": np.random.default_rng(1).random((20, 3, 8, 8))}, source="t"
    )
    assert MAX_FEATURES_PER_INPUT < 3 * 8 * 8
    assert [f.name for f in built.features] == ["image[*]"]


def test_the_baseline_file_round_trips(baseline):
    assert Baseline.from_json(baseline.to_json()) == baseline
    assert baseline.digest()["bytes"] == len(baseline.to_json().encode())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(path="/etc/passwd"), "must be an object with the fields"),
        (
            lambda d: d["features"][0].update(edges=list(reversed(d["features"][0]["edges"]))),
            "strictly ascending",
        ),
        (lambda d: d["features"][0].update(fractions=[0.5] * BINS), "sum to 1"),
        (lambda d: d["features"][0].update(edges=d["features"][0]["edges"][:3]), "one edge fewer"),
        (lambda d: d["features"][0].update(file="../other/baseline.json"), "exactly name, input, edges"),
        (lambda d: d.update(features=[]), "1 to"),
        (lambda d: d.update(schema_version=2), "schema_version"),
        (lambda d: d.update(rows=True), '"rows" must be a whole number'),
    ],
)
def test_a_hostile_baseline_is_refused_naming_the_field(baseline, change, message):
    data = json.loads(baseline.to_json())
    change(data)
    with pytest.raises(BaselineError, match=message):
        Baseline.from_json(json.dumps(data))


def test_a_baseline_with_nan_or_over_its_size_is_refused(baseline):
    with pytest.raises(BaselineError, match="NaN"):
        Baseline.from_json(baseline.to_json().replace('"rows": 5000', '"rows": NaN'))
    with pytest.raises(BaselineError, match="bytes"):
        Baseline.from_json(b" " * (MAX_BASELINE_BYTES + 1))


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift():
    even = np.full(10, 0.1)
    assert psi(even, even) == 0.0
    shares = [psi(even, np.roll(np.linspace(0.05, 0.15, 10), k)) for k in (0, 3)]
    assert all(value > 0 for value in shares)


def test_an_unshifted_feed_is_stable(baseline):
    feed = np.random.default_rng(7).normal(size=(2000, 4))
    results = compare(baseline, columns(feed))
    assert {r.verdict for r in results} == {STABLE}
    assert max(r.psi for r in results) < 0.1


def test_a_shifted_feed_drifts_on_the_shifted_features_only(baseline):
    feed = np.random.default_rng(7).normal(size=(2000, 4)) + np.array([0.0, 0.45, 1.0, 0.0])
    verdicts = {r.bins.name: (r.verdict, r.psi) for r in compare(baseline, columns(feed))}
    assert verdicts["input[2]"][0] == DRIFTED and verdicts["input[2]"][1] > 0.25
    assert verdicts["input[1]"][0] in (WATCH, DRIFTED)
    assert verdicts["input[0]"][0] == STABLE and verdicts["input[3]"][0] == STABLE


def test_too_few_rows_are_not_judged_and_missing_features_say_so(baseline):
    few = compare(baseline, columns(np.random.default_rng(7).normal(size=(20, 4)) + 5), min_rows=100)
    assert {r.verdict for r in few} == {TOO_FEW} and all(r.psi is None for r in few)
    assert {r.verdict for r in compare(baseline, {})} == {MISSING}


def test_rows_for_a_baseline_from_npy_json_and_jsonl(tmp_path):
    rows = np.random.default_rng(2).normal(size=(30, 4))
    np.save(tmp_path / "rows.npy", rows)
    (tmp_path / "rows.json").write_text(json.dumps({"input": rows.tolist()}))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows.tolist()) + "\n")
    for name in ("rows.npy", "rows.json", "rows.jsonl"):
        read = read_baseline_rows(tmp_path / name, INPUTS)
        assert np.allclose(read["input"], rows), name


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("rows.csv", "1,2,3,4", "must be .npy, .json or .jsonl"),
        ("rows.json", '{"other": [[1, 2, 3, 4]]}', "names \\['other'\\]"),
        ("rows.json", "[[1, 2, 3]]", "shape \\[1, 3\\]"),
        ("rows.jsonl", '[1, 2, 3, 4]\n["a", 2, 3, 4]\n', "not numbers"),
        ("rows.json", '{"input": [[1, 2, 3, NaN]]}', "NaN"),
    ],
)
def test_a_bad_baseline_file_is_refused_with_the_fix(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(BaselineError, match=message):
        read_baseline_rows(tmp_path / name, INPUTS)


def test_a_pickled_npy_is_not_loaded(tmp_path):
    np.save(tmp_path / "rows.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BaselineError, match="cannot be read"):
        read_baseline_rows(tmp_path / "rows.npy", INPUTS)


def test_the_report_table_and_plot(baseline):
    feed = np.random.default_rng(7).normal(size=(2000, 4)) + np.array([0.0, 0.0, 1.0, 0.0])
    until = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
    report = DriftReport(
        ModelRef("iris", "1"), until - dt.timedelta(hours=24), until, 0.25, 40, 2000,
        tuple(compare(baseline, columns(feed))), baseline.rows,
    )  # fmt: skip
    assert report.verdict == DRIFTED and report.drifted[0].bins.name == "input[2]"
    table = report.table()
    assert "input[2]" in table and "drift" in table and "verdict: drift" in table
    assert report.keys() == (
        "drift-reports/iris/1/2026-12-02T120000Z/report.json",
        "drift-reports/iris/1/2026-12-02T120000Z/psi.png",
    )
    document = json.loads(report.to_json())
    assert document["drifted"] == ["input[2]"] and document["max_psi"] > 0.25
    image = Image.open(io.BytesIO(render_png(report)))
    assert image.format == "PNG" and image.width == 900 and image.height > 300
