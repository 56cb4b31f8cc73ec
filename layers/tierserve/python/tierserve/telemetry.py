"""Powertools Logger, Tracer and Metrics shared by every adapter.

One instance of each per process, so the Lambda handlers, the GPU server and the local
API log the same structured fields and emit the same metric names.

The tracer is powertools' only where tracing is on (in Lambda, unless
``POWERTOOLS_TRACE_DISABLED``: powertools' own rule). Elsewhere it is :class:`Untraced`,
whose decorators return the function as it is: powertools' Tracer imports the X-Ray SDK
(100-190 ms of a cold start here) even when it is disabled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aws_lambda_powertools.logging import Logger
from aws_lambda_powertools.metrics import Metrics, MetricUnit
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


# Powertools' metric set is a plain dict that flushes itself at 100 values: fine for one Lambda
# invocation at a time, not for the GPU server's request threads, so every access holds this lock.
_metrics_lock = threading.Lock()


def record_ms(name: str, milliseconds: float) -> None:
    with _metrics_lock:
        metrics.add_metric(name=name, unit=MetricUnit.Milliseconds, value=round(milliseconds, 3))


def record_count(name: str, count: int = 1) -> None:
    with _metrics_lock:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=count)


def flush_metrics() -> None:
    """Publish what has accumulated (long-running servers call this periodically and on exit;
    Lambda handlers flush through ``@metrics.log_metrics``)."""
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
