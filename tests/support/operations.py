"""What operators read, as tests read it: EMF metric lines from stdout and audit records from
the audit logger."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

import pytest
from aws_lambda_powertools.metrics.provider import cold_start

from tierserve import telemetry


def emf_lines(out: str) -> list[dict[str, Any]]:
    """Every EMF document printed in ``out`` (one JSON object a line, with ``_aws``)."""
    lines = []
    for line in out.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            lines.append(json.loads(line))
    return lines


def dimension_sets(line: dict[str, Any]) -> list[list[str]]:
    [directive] = line["_aws"]["CloudWatchMetrics"]
    return directive["Dimensions"]


def metric_names(line: dict[str, Any]) -> set[str]:
    [directive] = line["_aws"]["CloudWatchMetrics"]
    return {metric["Name"] for metric in directive["Metrics"]}


def lines_with(lines: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    return [line for line in lines if metric in metric_names(line)]


@pytest.fixture
def emf(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Metrics published (the suite turns them off), from a clean slate and a cold start."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    telemetry.clear_metrics()
    cold_start.is_cold_start = True
    yield
    telemetry.clear_metrics()


@contextmanager
def audit_records() -> Iterator[list[dict[str, Any]]]:
    """The audit records written to stdout inside the block (parsed), appended to the yielded
    list as the block ends (other lines, EMF ones, are left out)."""
    stream = io.StringIO()
    records: list[dict[str, Any]] = []
    try:
        with redirect_stdout(stream):
            yield records
    finally:
        for line in stream.getvalue().splitlines():
            if line.startswith("{") and '"audit":"inference"' in line:
                records.append(json.loads(line))
