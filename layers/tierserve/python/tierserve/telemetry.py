"""Powertools Logger, Tracer and Metrics shared by every adapter.

One instance of each per process, so the Lambda handlers, the GPU server and the local
API log the same structured fields and emit the same metric names.
"""

from __future__ import annotations

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


def record_ms(name: str, milliseconds: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Milliseconds, value=round(milliseconds, 3))


def record_count(name: str, count: int = 1) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=count)


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """Yields a one-element list that holds the elapsed milliseconds once the block ends."""
    elapsed = [0.0]
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = (time.perf_counter() - start) * 1000
