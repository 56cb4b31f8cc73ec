"""A map run without Step Functions: what the ``TierserveBatch`` state machine's Distributed
Map does, in this process, over any S3 (the local stack's embedded one in particular).

The same parts as in AWS: the item reader (:mod:`tierserve.batch.items`), batches of
``items_per_batch`` items with the same ``BatchInput``, the batch function's own code
(:func:`tierserve.batch.runner.serve_batch`, bounded by the function's timeout as Lambda
bounds it), at most ``max_concurrency`` batches at once on a bounded pool, the state
machine's retry policy (:data:`BATCH_RETRY`), the tolerated failure percentage, item
counters shaped like ``DescribeMapRun``'s ``itemCounts``, and a result summary written where
and as the ResultWriter writes it: ``{SUMMARY_PREFIX}/{run id}/manifest.json`` naming
``SUCCEEDED_0.json`` and ``FAILED_0.json``.

What only AWS exercises: the Amazon States Language interpreter, Step Functions' own item
reader, batcher, retries and result writer, child workflow executions and their quotas,
Lambda invocations, and IAM.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import count, islice
from typing import Any

from tierserve import aws
from tierserve.batch.items import BatchSource, read_items
from tierserve.batch.runner import BatchItemsFailed, BatchModelStarting, serve_batch
from tierserve.s3_pipeline import Pipeline
from tierserve.settings import SUMMARY_PREFIX

# Kept back from the function's timeout, as the Lambda handler keeps it back (functions/inference/batch.py).
DEADLINE_MARGIN_S = 5.0
TOLERANCE_EXCEEDED = "States.ExceedToleratedFailureThreshold"
LOCAL_ACCOUNT = "000000000000"


@dataclass(frozen=True)
class RetryPolicy:
    """How the state machine retries a failed batch: these errors, after ``interval_s`` growing
    by ``backoff_rate``, at most ``max_attempts`` times after the first (Step Functions'
    ``Retry`` fields); the CDK construct renders the same values."""

    errors: tuple[str, ...]
    interval_s: float
    max_attempts: int
    backoff_rate: float
    max_delay_s: float | None = None  # Step Functions' MaxDelaySeconds: no wait is longer

    def delays(self) -> Iterator[float]:
        for attempt in range(self.max_attempts):
            delay = self.interval_s * self.backoff_rate**attempt
            yield delay if self.max_delay_s is None else min(delay, self.max_delay_s)


BATCH_RETRY = RetryPolicy(
    errors=(BatchItemsFailed.__name__,), interval_s=2.0, max_attempts=3, backoff_rate=2.0
)
# A batch whose failed items all met a model with no copy running: a copy takes minutes to
# start, so 1 minute doubling to 5 (under a copy's idle period before it scales in), 25 times
# (about 2 h in all) before the batch fails.
COLD_RETRY = RetryPolicy(
    errors=(BatchModelStarting.__name__,),
    interval_s=60.0,
    max_attempts=25,
    backoff_rate=2.0,
    max_delay_s=300.0,
)


@dataclass(frozen=True)
class MapSettings:
    """What the Distributed Map is built with (``cdk.json``'s ``batch_*`` context)."""

    items_per_batch: int
    max_concurrency: int
    tolerated_failure_percentage: float
    function_timeout_s: float


@dataclass
class ItemCounts:
    """A map run's item counters, as ``DescribeMapRun`` reports them (``itemCounts``)."""

    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    total: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class MapRunResult:
    """How a run ended: ``SUCCEEDED`` or ``FAILED`` (with ``error`` and ``cause``), its counters,
    and the summary's ``manifest.json`` key."""

    status: str
    counts: ItemCounts
    summary_key: str
    run_id: str
    error: str = ""
    cause: str = ""
    outcomes: dict[str, int] = field(
        default_factory=dict
    )  # outputs, errors, skipped over the batches that succeeded


@dataclass
class _Batch:
    number: int
    event: dict[str, Any]
    started: str = ""
    stopped: str = ""
    output: dict[str, int] | None = None
    error: str = ""
    cause: str = ""

    @property
    def size(self) -> int:
        return len(self.event["Items"])


def run_locally(
    pipeline: Pipeline,
    s3: Any,
    source: BatchSource,
    settings: MapSettings,
    *,
    progress: Callable[[ItemCounts], None] | None = None,
    retry: RetryPolicy = BATCH_RETRY,
    cold_retry: RetryPolicy = COLD_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> MapRunResult:
    """Run every item of ``source`` through the batch function's code (see the module docstring).

    Raises:
        BadManifest: the manifest cannot be read as items (the run starts nothing).
        Exception: a failed S3 call while reading items or writing the summary.
    """
    run_id = str(uuid.uuid4())
    counts = ItemCounts()
    lock = threading.Lock()
    finished: list[_Batch] = []
    batches = _batches(read_items(s3, source), source, settings.items_per_batch)
    aborted = ""
    with (
        ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="tierserve-map") as map_pool,
        ThreadPoolExecutor(pipeline.settings.concurrency, thread_name_prefix="tierserve-items") as item_pool,
    ):

        def attempt(batch: _Batch) -> _Batch:
            with lock:
                counts.pending -= batch.size
                counts.running += batch.size
            batch.started = _now()
            _serve_with_retries(pipeline, batch, item_pool, settings, (retry, cold_retry), sleep)
            batch.stopped = _now()
            return batch

        running: set[Future[_Batch]] = set()
        reading = True
        while reading or running:
            while reading and len(running) < settings.max_concurrency and not aborted:
                batch = next(batches, None)
                if batch is None:
                    reading = False
                    break
                with lock:
                    counts.total += batch.size
                    counts.pending += batch.size
                running.add(map_pool.submit(attempt, batch))
            if not running:
                break
            done, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                batch = future.result()
                finished.append(batch)
                with lock:
                    counts.running -= batch.size
                    if batch.output is None:
                        counts.failed += batch.size
                    else:
                        counts.succeeded += batch.size
            if not aborted and _exceeded(counts, settings.tolerated_failure_percentage, certain=not reading):
                aborted = TOLERANCE_EXCEEDED
                reading = False
            if progress is not None:
                with lock:
                    progress(ItemCounts(**counts.as_dict()))
    if not aborted and _exceeded(counts, settings.tolerated_failure_percentage, certain=True):
        aborted = TOLERANCE_EXCEEDED
    summary_key = _write_summary(s3, source, run_id, finished)
    result = MapRunResult("FAILED" if aborted else "SUCCEEDED", counts, summary_key, run_id)
    if aborted:
        result.error = aborted
        result.cause = (
            f"{counts.failed} of {counts.total} items failed, over the tolerated "
            f"{settings.tolerated_failure_percentage:g}%: see s3://{source.bucket}/{summary_key}"
        )
    for batch in finished:
        for name, value in (batch.output or {}).items():
            if name != "items":
                result.outcomes[name] = result.outcomes.get(name, 0) + value
    return result


def _batches(items: Iterator[Any], source: BatchSource, size: int) -> Iterator[_Batch]:
    for number in count():
        chunk = list(islice(items, size))
        if not chunk:
            return
        yield _Batch(number, {"Items": chunk, "BatchInput": source.batch_input()})


def _serve_with_retries(
    pipeline: Pipeline,
    batch: _Batch,
    item_pool: ThreadPoolExecutor,
    settings: MapSettings,
    retries: tuple[RetryPolicy, ...],
    sleep: Callable[[float], None],
) -> None:
    # Each retrier counts its own attempts, as Step Functions' do.
    delays = [(policy, policy.delays()) for policy in retries]
    while True:
        deadline = aws.Deadline.after(
            settings.function_timeout_s, min(DEADLINE_MARGIN_S, settings.function_timeout_s / 5)
        )
        try:
            summary = serve_batch(pipeline, batch.event, executor=item_pool, deadline=deadline)
        except Exception as error:
            batch.error, batch.cause = (
                type(error).__name__,
                json.dumps({"errorMessage": str(error), "errorType": type(error).__name__}),
            )
            delay = next((next(left, None) for policy, left in delays if batch.error in policy.errors), None)
            if delay is None:
                return
            sleep(delay)
            continue
        batch.output, batch.error, batch.cause = summary.as_dict(), "", ""
        return


def _exceeded(counts: ItemCounts, tolerated_percentage: float, *, certain: bool) -> bool:
    """Whether the failed items are over the tolerated share of all items. Before every item is
    read the total is not known, so only a tolerance of 0 can be exceeded for certain."""
    if not counts.failed:
        return False
    if not certain and tolerated_percentage > 0:
        return False
    return counts.failed * 100 > tolerated_percentage * counts.total


def _write_summary(s3: Any, source: BatchSource, run_id: str, batches: list[_Batch]) -> str:
    """The ResultWriter's files: one per status, then the manifest naming them."""
    prefix = f"{SUMMARY_PREFIX}/{run_id}"
    map_run = f"arn:aws:states:local:{LOCAL_ACCOUNT}:mapRun:TierserveBatch/Map:{run_id}"
    files: dict[str, list[dict[str, Any]]] = {"FAILED": [], "PENDING": [], "SUCCEEDED": []}
    for status in ("SUCCEEDED", "FAILED"):
        records = [_record(batch, map_run, run_id) for batch in sorted(batches, key=lambda b: b.number)]
        records = [r for r in records if r["Status"] == status]
        if not records:
            continue
        key = f"{prefix}/{status}_0.json"
        body = json.dumps(records).encode()
        s3.put_object(Bucket=source.bucket, Key=key, Body=body, ContentType="application/json")
        files[status].append({"Key": key, "Size": len(body)})
    manifest_key = f"{prefix}/manifest.json"
    manifest = {"DestinationBucket": source.bucket, "MapRunArn": map_run, "ResultFiles": files}
    s3.put_object(
        Bucket=source.bucket,
        Key=manifest_key,
        Body=json.dumps(manifest).encode(),
        ContentType="application/json",
    )
    return manifest_key


def _record(batch: _Batch, map_run: str, run_id: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "ExecutionArn": f"arn:aws:states:local:{LOCAL_ACCOUNT}:execution:TierserveBatch/Map:{run_id}-{batch.number}",
        "Name": f"{run_id}-{batch.number}",
        "MapRunArn": map_run,
        "Input": json.dumps(batch.event),
        "InputDetails": {"Included": True},
        "StartDate": batch.started,
        "StopDate": batch.stopped,
        "Status": "SUCCEEDED" if batch.output is not None else "FAILED",
    }
    if batch.output is not None:
        record["Output"] = json.dumps(batch.output)
        record["OutputDetails"] = {"Included": True}
    else:
        record["Error"], record["Cause"] = batch.error, batch.cause
    return record


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
