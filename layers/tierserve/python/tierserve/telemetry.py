"""Powertools Logger, Tracer and Metrics shared by every adapter.

One instance of each per process, so the Lambda handlers, the GPU server and the local
API log the same structured fields and emit the same metric names.

Two costs on a server's request path are avoided here. Powertools' ``add_metric`` validates
its arguments and formats the whole metric set into a debug message on every call (tens of
microseconds, growing with the values held), so a long-running server collects values with
:func:`buffer_metrics` and publishes them as the same EMF lines, up to 100 values per metric
each, as powertools would; Lambda handlers keep powertools' own path, which
``@metrics.log_metrics`` flushes at the end of each invocation. And a method traced with
:func:`capture_method` is not wrapped at all where tracing is off (outside Lambda, or
``POWERTOOLS_TRACE_DISABLED``): the X-Ray SDK's no-op segments still cost tens of
microseconds a call.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled

SERVICE = "tierserve"
NAMESPACE = "Tierserve"

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)

# Metric names live here so dashboards and alarms read the same spelling.
MODEL_FETCH_MS = "ModelFetchMs"
MODEL_DECOMPRESS_MS = "ModelDecompressMs"
MODEL_SESSION_MS = "ModelSessionMs"
INFERENCE_MS = "InferenceMs"
CACHE_HIT = "ModelCacheHit"
CACHE_MISS = "ModelCacheMiss"
# The S3 pipeline: one per input, by how it ended (retries are counted by SQS itself).
PIPELINE_OUTPUT = "PipelineOutput"
PIPELINE_ERROR = "PipelineError"
PIPELINE_SKIPPED = "PipelineSkipped"
PIPELINE_ROWS = "PipelineRows"
# The GPU server's dynamic batching: rows per model run, and requests refused by a full queue.
BATCH_ROWS = "BatchRows"
QUEUE_FULL = "QueueFull"


# Powertools' metric set is a plain dict that flushes itself at 100 values: fine for one Lambda
# invocation at a time, not for the GPU server's request threads, so every access holds this lock.
_metrics_lock = threading.Lock()
EMF_MAX_VALUES = 100  # values of one metric in one EMF line (CloudWatch's limit; powertools' too)


class MetricBuffer:
    """A server's metric values, by name, published as EMF lines through powertools'
    serializer (its namespace, service and dimensions): when a metric holds
    :data:`EMF_MAX_VALUES` values, and on :meth:`publish`. Thread-safe."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[str, list[float]]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, unit: str, value: float) -> None:
        with self._lock:
            entry = self._values.get(name)
            if entry is None:
                entry = self._values[name] = (unit, [])
            entry[1].append(float(value))
            full = len(entry[1]) >= EMF_MAX_VALUES
        if full:
            self.publish()

    def publish(self) -> None:
        """Print what is held as EMF lines (nothing where metrics are disabled) and forget it."""
        with self._lock:
            held, self._values = self._values, {}
        while held and not is_metrics_disabled():
            chunk = {
                name: {"Unit": unit, "StorageResolution": 60, "Value": values[:EMF_MAX_VALUES]}
                for name, (unit, values) in held.items()
            }
            with _metrics_lock:
                document = metrics.serialize_metric_set(metrics=chunk)
            print(json.dumps(document, separators=(",", ":")), flush=True)
            held = {name: (unit, values[EMF_MAX_VALUES:]) for name, (unit, values) in held.items()}
            held = {name: entry for name, entry in held.items() if entry[1]}


_buffer: MetricBuffer | None = None


def buffer_metrics() -> None:
    """From now on, collect this process's metrics in a :class:`MetricBuffer` (a long-running
    server; its own thread calls :func:`flush_metrics`). Lambda handlers never call this."""
    global _buffer
    with _metrics_lock:
        if _buffer is None:
            _buffer = MetricBuffer()


def _record(name: str, unit: MetricUnit, value: float) -> None:
    if _buffer is not None:
        _buffer.add(name, unit.value, value)
        return
    with _metrics_lock:
        metrics.add_metric(name=name, unit=unit, value=value)


def record_ms(name: str, milliseconds: float) -> None:
    _record(name, MetricUnit.Milliseconds, round(milliseconds, 3))


def record_count(name: str, count: int = 1) -> None:
    _record(name, MetricUnit.Count, count)


def flush_metrics() -> None:
    """Publish what has accumulated (long-running servers call this periodically and on exit;
    Lambda handlers flush through ``@metrics.log_metrics``)."""
    if _buffer is not None:
        _buffer.publish()
    with _metrics_lock:
        if metrics.metric_set:
            metrics.flush_metrics()


Method = TypeVar("Method", bound=Callable[..., Any])


def capture_method(method: Method) -> Method:
    """``tracer.capture_method(capture_response=False)``, or ``method`` itself where tracing is
    off (decided when the tracer was made: outside Lambda, or ``POWERTOOLS_TRACE_DISABLED``)."""
    if tracer.disabled:
        return method
    return tracer.capture_method(capture_response=False)(method)  # type: ignore[return-value]


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """Yields a one-element list that holds the elapsed milliseconds once the block ends."""
    elapsed = [0.0]
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = (time.perf_counter() - start) * 1000
