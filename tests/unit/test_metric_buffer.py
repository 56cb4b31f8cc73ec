"""A long-running server's metric buffer: values leave as CloudWatch EMF lines of at most 100
values per metric, with powertools' namespace and service, and nothing is printed where
metrics are disabled."""

from __future__ import annotations

import json

from tierserve.telemetry import EMF_MAX_VALUES, NAMESPACE, MetricBuffer


def emf_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_values_leave_in_lines_of_at_most_100_per_metric(capsys, monkeypatch):
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)
    buffer = MetricBuffer()
    for value in range(EMF_MAX_VALUES + 50):
        buffer.add("InferenceMs", "Milliseconds", value)  # the 100th value publishes the line
    buffer.add("BatchRows", "Count", 3)
    buffer.publish()
    lines = emf_lines(capsys.readouterr().out)
    assert len(lines) == 2
    first, second = lines
    assert first["InferenceMs"] == [float(v) for v in range(EMF_MAX_VALUES)]
    assert second["InferenceMs"] == [float(v) for v in range(EMF_MAX_VALUES, EMF_MAX_VALUES + 50)]
    assert second["BatchRows"] == [3.0]
    directive = second["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == NAMESPACE
    assert {m["Name"]: m["Unit"] for m in directive["Metrics"]} == {
        "InferenceMs": "Milliseconds",
        "BatchRows": "Count",
    }
    buffer.publish()  # nothing held: nothing printed
    assert emf_lines(capsys.readouterr().out) == []


def test_nothing_is_printed_where_metrics_are_disabled(capsys, monkeypatch):
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    buffer = MetricBuffer()
    buffer.add("InferenceMs", "Milliseconds", 1.0)
    buffer.publish()
    assert emf_lines(capsys.readouterr().out) == []
