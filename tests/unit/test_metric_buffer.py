"""A long-running server's metric buffer: values leave as CloudWatch EMF lines of at most 100
values per metric, with powertools' namespace and service, and nothing is printed where
metrics are disabled."""

from __future__ import annotations

import json

from tierserve.settings import ModelRef
from tierserve.telemetry import EMF_MAX_VALUES, NAMESPACE, MetricBuffer, clear_metrics


def emf_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_values_leave_in_lines_of_at_most_100_per_metric(capsys, monkeypatch):
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)
    buffer = MetricBuffer()
    for value in range(EMF_MAX_VALUES + 50):
        buffer.add(None, "InferenceMs", "Milliseconds", value)  # the 100th value publishes the line
    buffer.add(None, "BatchRows", "Count", 3)
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
    buffer.add(None, "InferenceMs", "Milliseconds", 1.0)
    buffer.publish()
    assert emf_lines(capsys.readouterr().out) == []


def test_a_models_values_leave_with_its_dimensions_apart_from_the_services(capsys, monkeypatch):
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)
    clear_metrics()
    buffer = MetricBuffer()
    buffer.add(ModelRef("convnet", "2"), "InferenceMs", "Milliseconds", 5.0)
    buffer.add(None, "QueueFull", "Count", 1)
    buffer.publish()
    lines = {
        tuple(sorted(k for k in line if not k.startswith("_"))): line
        for line in emf_lines(capsys.readouterr().out)
    }
    model_line = next(line for line in lines.values() if "InferenceMs" in line)
    service_line = next(line for line in lines.values() if "QueueFull" in line)
    assert model_line["model"] == "convnet" and model_line["version"] == "2"
    assert ["service", "model", "version"] in model_line["_aws"]["CloudWatchMetrics"][0]["Dimensions"]
    assert "model" not in service_line and "InferenceMs" not in service_line
