"""One batch of a bulk run: the items Step Functions' Distributed Map hands the batch function
(``{"Items": [...], "BatchInput": {"model": ..., "reader": ...}}``), served by the S3
pipeline's own :class:`~tierserve.s3_pipeline.Pipeline`, so results land exactly where, and
exactly as idempotently as, the S3 worker writes them: a rerun skips every input whose result
is current.

The items run concurrently on the caller's pool. Their results are listed first, both kinds,
one page per model (:meth:`Pipeline.index_inputs`): on a rerun a served input costs one
HeadObject and is not read; on a first run an input costs a GetObject and a PutObject.

How a batch ends, which the state machine's Retry and the map run's counters read by the
error's name (Lambda reports the exception class as ``errorType``):

- returns a summary (``items``, ``outputs``, ``errors``, ``skipped``): every item has its
  current result; inputs that cannot be served have their error file, as in the S3 pipeline.
- raises :class:`BatchItemsFailed`: some items met a transient fault (S3 or the GPU endpoint
  unavailable, the invocation's time ran out); the state machine retries the batch, whose
  served items are then skipped.
- raises :class:`BatchModelStarting` (a :class:`BatchItemsFailed`) where every item that
  failed met a GPU-tier model with no copy running (scaled to zero, or scaling out): the state
  machine retries it on a slower schedule that outlasts a copy's start (minutes), so a bulk
  run started while the GPU is cold is served once it is warm.
- raises :class:`PoisonItems`: some items can never be served (a key outside the run's
  ``inputs/{model}/``, another bucket, no key); not retried: the batch counts as failed.
- raises :class:`InvalidBatch`: the event is not a batch at all.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Executor, wait
from dataclasses import dataclass
from typing import Any

from tierserve import aws
from tierserve.batch.items import READERS, BatchSource, PoisonItem, to_object
from tierserve.errors import ModelStarting, TierserveError
from tierserve.s3_pipeline import Pipeline, PoisonMessage, S3Object
from tierserve.s3_pipeline.results import KINDS, Outcome
from tierserve.settings import BUCKET_PATTERN
from tierserve.telemetry import logger

# Named in the failure a batch reports: enough to find the cause, bounded for Step Functions' 32 KB cause.
FAILED_KEYS_SHOWN = 5


class InvalidBatch(ValueError):
    """The event is not a Distributed Map batch (``Items`` and ``BatchInput.model``)."""


class BatchItemsFailed(Exception):
    """Items of the batch met a transient fault; the batch is retried (and its served items skipped)."""


class BatchModelStarting(BatchItemsFailed):
    """Every item of the batch that failed met a model with no copy running; the batch is
    retried once a copy may be running (the state machine's slower retrier)."""


class PoisonItems(Exception):
    """Items of the batch can never be served; retrying would not help."""


@dataclass(frozen=True)
class BatchSummary:
    """How the items of one batch ended."""

    items: int
    outputs: int
    errors: int
    skipped: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def source_of(event: Mapping[str, Any], data_bucket: str | None = None) -> tuple[BatchSource, list[Any]]:
    """The run's source (its data bucket, model and reader) and the items of a batch event;
    ``data_bucket`` is the one bucket the function may serve (``TIERSERVE_DATA_BUCKET``), if set.

    Raises:
        InvalidBatch: not ``{"Items": [...], "BatchInput": {"bucket": ..., "model": ..., "reader": ...}}``,
            or a bucket other than ``data_bucket``.
    """
    items = event.get("Items") if isinstance(event, Mapping) else None
    batch_input = event.get("BatchInput") if isinstance(event, Mapping) else None
    if not isinstance(items, list) or not isinstance(batch_input, Mapping):
        raise InvalidBatch(
            'a batch is {"Items": [...], "BatchInput": {"bucket": ..., "model": ..., "reader": ...}}, as the '
            "Distributed Map's ItemBatcher sends it"
        )
    bucket, model, reader = (
        batch_input.get("bucket"),
        batch_input.get("model"),
        batch_input.get("reader", "prefix"),
    )
    if not isinstance(bucket, str) or not BUCKET_PATTERN.match(bucket):
        raise InvalidBatch(f"BatchInput needs the data bucket's name, not {str(bucket)[:80]!r}")
    if data_bucket and bucket != data_bucket:
        raise InvalidBatch(
            f"BatchInput names the bucket {bucket}, but this function serves {data_bucket} only"
        )
    if not isinstance(model, str) or reader not in READERS:
        raise InvalidBatch(f"BatchInput needs a model name and a reader ({', '.join(READERS)})")
    return BatchSource(bucket=bucket, model=model, reader=reader), items


def serve_batch(
    pipeline: Pipeline,
    event: Mapping[str, Any],
    *,
    executor: Executor,
    deadline: aws.Deadline | None = None,
) -> BatchSummary:
    """Serve every item of a batch event (see the module docstring), in the bucket its
    ``BatchInput`` names, which must be the pipeline's data bucket when that is set.

    Raises:
        InvalidBatch, BatchItemsFailed, PoisonItems: as the module docstring says.
    """
    source, items = source_of(event, pipeline.settings.data_bucket)
    objects, poison = [], []
    for item in items:
        try:
            found = to_object(item, source)
        except PoisonItem as error:
            poison.append(str(error))
            continue
        if found is not None:
            objects.append(found)
    index = pipeline.index_inputs(objects, KINDS, deadline)
    futures = {executor.submit(_serve_one, pipeline, obj, index, deadline): obj for obj in objects}
    done, late = wait(
        futures, timeout=None if deadline is None else max(0.0, deadline.hard_at - time.monotonic())
    )
    outcomes: Counter[str] = Counter()
    failed: list[str] = [f"{futures[f].key}: still running at the invocation's deadline" for f in late]
    cold = 0
    for future in done:
        try:
            outcomes[future.result().status] += 1
        except PoisonMessage as error:
            poison.append(f"{futures[future].key}: {error}")
        except Exception as error:  # transient (retryable) or unexpected: both are retried
            failed.append(f"{futures[future].key}: {_reason(error)}")
            cold += isinstance(error, ModelStarting)
    summary = BatchSummary(
        items=len(items),
        outputs=outcomes["output"],
        errors=outcomes["error"],
        skipped=outcomes["skipped"] + len(items) - len(objects) - len(poison),
    )
    if failed and cold == len(failed):
        raise BatchModelStarting(
            _failure(
                f"{cold} of {len(items)} items wait for their model, which has no copy running yet; "
                "the batch is retried once it may be running",
                failed,
            )
        )
    if failed:
        raise BatchItemsFailed(
            _failure(f"{len(failed)} of {len(items)} items failed for now and will be retried", failed)
        )
    if poison:
        raise PoisonItems(_failure(f"{len(poison)} of {len(items)} items can never be served", poison))
    return summary


def _serve_one(pipeline: Pipeline, item: S3Object, index: Any, deadline: aws.Deadline | None) -> Outcome:
    with aws.within(deadline):
        return pipeline.handle(_with_etag(pipeline, item), index, look_first=True)


def _with_etag(pipeline: Pipeline, item: S3Object) -> S3Object:
    """A manifest item without an ETag gets its input's (one HeadObject), so a rerun can tell a
    current result from an old one before reading the input."""
    return item if item.etag else pipeline.describe_input(item)


def _reason(error: BaseException) -> str:
    if isinstance(error, TierserveError):
        return error.message
    logger.error("unexpected failure in a batch item: the batch will be retried", exc_info=error)
    return f"unexpected {type(error).__name__} (see the function's log)"


def _failure(headline: str, reasons: list[str]) -> str:
    shown = "; ".join(reasons[:FAILED_KEYS_SHOWN])
    more = f"; and {len(reasons) - FAILED_KEYS_SHOWN} more" if len(reasons) > FAILED_KEYS_SHOWN else ""
    return f"{headline}: {shown}{more}"
