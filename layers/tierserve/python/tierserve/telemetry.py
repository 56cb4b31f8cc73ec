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
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from aws_lambda_powertools.logging import Logger
from aws_lambda_powertools.metrics import EphemeralMetrics, Metrics, MetricUnit
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


def record_ms(name: str, milliseconds: float, model: Versioned | None = None) -> None:
    """Add ``milliseconds`` to metric ``name``, about ``model`` (a served model) when given."""
    with _metrics_lock:
        _metric_set(model).add_metric(name=name, unit=MetricUnit.Milliseconds, value=round(milliseconds, 3))


def record_count(name: str, count: int = 1, model: Versioned | None = None) -> None:
    """Add ``count`` to metric ``name``, about ``model`` (a served model) when given."""
    with _metrics_lock:
        _metric_set(model).add_metric(name=name, unit=MetricUnit.Count, value=count)


def flush_metrics() -> None:
    """Publish what has accumulated, one EMF line per metric set (long-running servers call
    this periodically and on exit; Lambda handlers flush through :func:`log_metrics`)."""
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
