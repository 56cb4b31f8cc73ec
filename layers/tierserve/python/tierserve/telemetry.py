"""Powertools Logger, Tracer and Metrics shared by every adapter.

One instance of each per process, so the Lambda handlers, the GPU server and the local
API log the same structured fields and emit the same metric names.

The tracer is powertools' only where tracing is on (in Lambda, unless
``POWERTOOLS_TRACE_DISABLED``: powertools' own rule). Elsewhere it is :class:`Untraced`,
whose decorators return the function as it is: powertools' Tracer imports the X-Ray SDK
(100-190 ms of a cold start here) even when it is disabled.

Powertools' ``add_metric`` validates its arguments and formats the whole metric set into a
debug message on every call (tens of microseconds, growing with the values held), so a
long-running server collects values with :func:`buffer_metrics` and publishes them as the
same EMF lines, up to 100 values per metric each, as powertools would; Lambda handlers keep
powertools' own path, which ``@metrics.log_metrics`` flushes at the end of each invocation.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aws_lambda_powertools.logging import Logger
from aws_lambda_powertools.metrics import Metrics, MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from aws_lambda_powertools.metrics.provider import cold_start
from aws_lambda_powertools.tracing.tracer import Tracer

SERVICE = "tierserve"
NAMESPACE = "Tierserve"


class Untraced:
    """The tracer where tracing is off: every decorator is the identity, every call a no-op."""

    disabled = True

    def capture_method(self, method: Callable[..., Any] | None = None, **_: Any) -> Any:
        return method if method is not None else lambda decorated: decorated

    capture_lambda_handler = capture_method

    def put_annotation(self, *_: Any, **__: Any) -> None:
        pass

    def put_metadata(self, *_: Any, **__: Any) -> None:
        pass


def tracing_enabled() -> bool:
    """Whether powertools would trace here: in Lambda, not in SAM/Chalice local, not disabled."""
    return not Tracer._is_tracer_disabled()  # powertools' own rule, so the two never disagree


logger = Logger(service=SERVICE)
tracer: Any = Tracer(service=SERVICE) if tracing_enabled() else Untraced()
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
# A delivery that met a GPU-tier model with no copy running (s3_pipeline/cold.py makes it wait).
PIPELINE_COLD_WAITS = "PipelineColdWaits"
# The GPU server's dynamic batching: rows per model run, and requests refused by a full queue.
BATCH_ROWS = "BatchRows"
QUEUE_FULL = "QueueFull"
# An execution environment restored from a SnapStart snapshot (beside powertools' ColdStart,
# which counts environments that ran their own init).
SNAPSTART_RESTORE = "SnapStartRestore"


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


def reset_for_new_environment() -> None:
    """Forget what belongs to the environment a snapshot was taken in: metrics recorded during
    its init (flushed there, before the snapshot) and request keys on the logger. A restored
    environment did not run the init, so its first invocation is no cold start: restores are
    counted apart (:data:`SNAPSTART_RESTORE`)."""
    with _metrics_lock:
        metrics.clear_metrics()
    logger.remove_keys(["function_request_id", "correlation_id", "xray_trace_id"])
    cold_start.is_cold_start = False


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """Yields a one-element list that holds the elapsed milliseconds once the block ends."""
    elapsed = [0.0]
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = (time.perf_counter() - start) * 1000
