"""Powertools Logger, Tracer and Metrics shared by every adapter.

One instance of each per process, so the Lambda handlers, the GPU server and the local
API log the same structured fields and emit the same metric names.

The tracer is powertools' only where tracing is on (in Lambda, unless
``POWERTOOLS_TRACE_DISABLED``: powertools' own rule). Elsewhere it is :class:`Untraced`,
whose decorators return the function as it is: powertools' Tracer imports the X-Ray SDK
(100-190 ms of a cold start here) even when it is disabled.

Metrics about a model carry it: each served model version has its own EMF metric set whose
lines declare two dimension sets, ``[service]`` and ``[service, model, version]``, so one
value counts both in the service-wide figure and in the model's own (CloudWatch aggregates
each dimension set separately; nothing is published twice). Only models this process
serves become dimension values (callers name models in paths and keys, and each distinct
value is a new, paid-for metric). A metric about no model (a key that names none) goes to
the service-wide set alone. :func:`log_metrics` flushes every set after each invocation; the
GPU server calls :func:`flush_metrics` on a timer.

Powertools' ``add_metric`` validates its arguments and formats the whole metric set into a
debug message on every call (tens of microseconds, growing with the values held), so a
long-running server collects values with :func:`buffer_metrics` and publishes them as the
same EMF lines, up to 100 values per metric each, as powertools would; Lambda handlers keep
powertools' own path, which :func:`log_metrics` flushes at the end of each invocation. The
buffer keeps values per model too, and publishes them with the model's set's dimensions.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol, TypeVar

from aws_lambda_powertools.logging import Logger
from aws_lambda_powertools.metrics import EphemeralMetrics, Metrics, MetricUnit
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
COLD_START = "ColdStart"
# One per inference request over HTTP (every tier), and those answered 4xx / 5xx.
INFERENCE_REQUESTS = "InferenceRequests"
INFERENCE_CLIENT_ERRORS = "InferenceClientErrors"
INFERENCE_SERVER_ERRORS = "InferenceServerErrors"
INFERENCE_LATENCY_MS = "InferenceLatencyMs"  # the whole request: parse, run, encode
# The response cache (opt-in per model): lookups that found an answer, and those that did not.
RESPONSE_CACHE_HIT = "ResponseCacheHit"
RESPONSE_CACHE_MISS = "ResponseCacheMiss"

SERVICE_DIMENSION = "service"
MODEL_DIMENSION = "model"
VERSION_DIMENSION = "version"
FUNCTION_DIMENSION = "function_name"


class _ModelKey(NamedTuple):
    name: str
    version: str


class Versioned(Protocol):
    """What names a model version: a ``ModelRef`` or a ``Manifest``."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


# Powertools' metric set is a plain dict that flushes itself at 100 values: fine for one Lambda
# invocation at a time, not for the GPU server's request threads, so every access holds this lock.
_metrics_lock = threading.Lock()


_model_sets: dict[tuple[str, str], EphemeralMetrics] = {}
EMF_MAX_VALUES = 100  # values of one metric in one EMF line (CloudWatch's limit; powertools' too)


def _metric_set(model: Versioned | None) -> Any:
    """The metric set a value about ``model`` goes to (call with the lock held)."""
    if model is None:
        return metrics
    key = (model.name, model.version)
    found = _model_sets.get(key)
    if found is None:
        found = _model_sets[key] = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
    if not found.dimension_sets:  # a flush clears them
        found.add_dimensions(
            **{SERVICE_DIMENSION: SERVICE, MODEL_DIMENSION: model.name, VERSION_DIMENSION: model.version}
        )
    return found


class MetricBuffer:
    """A server's metric values, by model and name, published as EMF lines through powertools'
    serializer of the value's metric set (its namespace, service and dimensions): when a metric
    holds :data:`EMF_MAX_VALUES` values, and on :meth:`publish`. Thread-safe."""

    def __init__(self) -> None:
        self._values: dict[tuple[Versioned | None, str], tuple[str, list[float]]] = {}
        self._lock = threading.Lock()

    def add(self, model: Versioned | None, name: str, unit: str, value: float) -> None:
        with self._lock:
            entry = self._values.get((model, name))
            if entry is None:
                entry = self._values[(model, name)] = (unit, [])
            entry[1].append(float(value))
            full = len(entry[1]) >= EMF_MAX_VALUES
        if full:
            self.publish()

    def publish(self) -> None:
        """Print what is held as EMF lines (nothing where metrics are disabled) and forget it."""
        with self._lock:
            held, self._values = self._values, {}
        if is_metrics_disabled():
            return
        by_model: dict[Versioned | None, dict[str, tuple[str, list[float]]]] = {}
        for (model, name), entry in held.items():
            by_model.setdefault(model, {})[name] = entry
        for model, values in by_model.items():
            self._print(model, values)

    @staticmethod
    def _print(model: Versioned | None, held: dict[str, tuple[str, list[float]]]) -> None:
        while held:
            chunk = {
                name: {"Unit": unit, "StorageResolution": 60, "Value": values[:EMF_MAX_VALUES]}
                for name, (unit, values) in held.items()
            }
            with _metrics_lock:
                document = _metric_set(model).serialize_metric_set(metrics=chunk)
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


def _record(name: str, unit: MetricUnit, value: float, model: Versioned | None) -> None:
    if model is not None:  # the buffer's key: a ModelRef, a Manifest and the like compare by value
        model = _ModelKey(model.name, model.version)
    if _buffer is not None:
        _buffer.add(model, name, unit.value, value)
        return
    with _metrics_lock:
        _metric_set(model).add_metric(name=name, unit=unit, value=value)


def record_ms(name: str, milliseconds: float, model: Versioned | None = None) -> None:
    """Add ``milliseconds`` to metric ``name``, about ``model`` (a served model) when given."""
    _record(name, MetricUnit.Milliseconds, round(milliseconds, 3), model)


def record_count(name: str, count: int = 1, model: Versioned | None = None) -> None:
    """Add ``count`` to metric ``name``, about ``model`` (a served model) when given."""
    _record(name, MetricUnit.Count, count, model)


def flush_metrics() -> None:
    """Publish what has accumulated, one EMF line per metric set (long-running servers call
    this periodically and on exit; Lambda handlers flush through :func:`log_metrics`)."""
    if _buffer is not None:
        _buffer.publish()
    with _metrics_lock:
        for metric_set in (metrics, *_model_sets.values()):
            if metric_set.metric_set:
                metric_set.flush_metrics()


F = TypeVar("F", bound=Callable[..., Any])


def log_metrics(*, models: Sequence[Versioned] = ()) -> Callable[[F], F]:
    """A Lambda handler's decorator: after each invocation, every metric set is flushed, and
    on the first, ``ColdStart`` is counted with ``[service, function_name]`` and, when the
    function serves one model (an API function), ``[service, model, version]`` too.

    Powertools' ``log_metrics`` would flush only its own set, and its cold start carries no model.
    """

    def decorate(handler: F) -> F:
        @functools.wraps(handler)
        def wrapped(event: Any, context: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return handler(event, context, *args, **kwargs)
            finally:
                if cold_start.is_cold_start:
                    cold_start.is_cold_start = False
                    _count_cold_start(context, models[0] if len(models) == 1 else None)
                flush_metrics()

        return wrapped  # type: ignore[return-value]

    return decorate


def _count_cold_start(context: Any, model: Versioned | None) -> None:
    function_name = getattr(context, "function_name", None) or os.environ.get(
        "AWS_LAMBDA_FUNCTION_NAME", SERVICE
    )
    with _metrics_lock:
        single = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
        single.add_dimension(name=FUNCTION_DIMENSION, value=function_name)
        if model is not None:
            single.add_dimensions(
                **{SERVICE_DIMENSION: SERVICE, MODEL_DIMENSION: model.name, VERSION_DIMENSION: model.version}
            )
        single.add_metric(name=COLD_START, unit=MetricUnit.Count, value=1)
        single.flush_metrics()


def clear_metrics() -> None:
    """Drop what has accumulated, unpublished, and forget the per-model sets (tests)."""
    with _metrics_lock:
        metrics.clear_metrics()
        _model_sets.clear()


def reset_for_new_environment() -> None:
    """Forget what belongs to the environment a snapshot was taken in: metrics recorded during
    its init (flushed there, before the snapshot) and request keys on the logger. A restored
    environment did not run the init, so its first invocation is no cold start: restores are
    counted apart (:data:`SNAPSTART_RESTORE`)."""
    with _metrics_lock:
        metrics.clear_metrics()
        _model_sets.clear()
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
