"""Powertools Logger, Tracer and Metrics shared by every adapter.

One instance of each per process, so the Lambda handlers, the GPU server and the local
API log the same structured fields and emit the same metric names.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

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


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """Yields a one-element list that holds the elapsed milliseconds once the block ends."""
    elapsed = [0.0]
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = (time.perf_counter() - start) * 1000
