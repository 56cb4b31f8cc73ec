"""Lambda handler: inference on files put under ``inputs/`` in S3, delivered through SQS.

A thin adapter: powertools decorators for logs, metrics (cold start) and traces, and its
batch processor for SQS with partial batch failure reporting. Each message goes to the
transport-free pipeline in the tierserve core; a message whose handling raises (a transient
fault, or a poison message) is reported in ``batchItemFailures`` so SQS redelivers it, and
moves it to the dead-letter queue after ``maxReceiveCount`` receives. The event source
mapping must enable ``ReportBatchItemFailures``.

The records of a batch are served concurrently (``TIERSERVE_WORKER_CONCURRENCY`` threads):
most of the time goes to S3 round trips, and the pipeline's conditional writes keep two
records for the same key from overwriting each other's newer result. Before they start, the
batch's error results are listed in the background (``Pipeline.index_messages``): one request
for the batch where each record would otherwise look for its own.

A record whose GPU-tier model has no copy running (scaled to zero, or scaling out) is made to
wait in the queue until a copy may be running (``tierserve.s3_pipeline.cold``): its visibility
is extended with a backoff, or, on the last receive before the dead-letter queue, a copy of it
is queued with a delay. Files uploaded while the GPU is cold are served once it is warm.

The invocation never outlasts itself: its remaining time, less a margin, is a deadline that
bounds every S3 and SageMaker call of its records (``tierserve.aws``), and a record still
running at the deadline is reported as failed, so the handler always answers before Lambda
would kill the whole batch.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    AsyncBatchProcessor,
    EventType,
    async_process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve import aws
from tierserve.aws import Deadline, OutOfTime
from tierserve.errors import ModelStarting, TierserveError, is_retryable
from tierserve.s3_pipeline import Pipeline
from tierserve.s3_pipeline.cold import ColdModelWait, Delivery
from tierserve.s3_pipeline.results import ResultIndex
from tierserve.settings import exit_on_bad_settings
from tierserve.telemetry import log_metrics, logger, tracer

# Kept back from the invocation's remaining time: the calls end this much before Lambda's
# timeout, the handler half of it, leaving time to report the batch and flush metrics.
DEADLINE_MARGIN_S = 5.0

with exit_on_bad_settings():  # a bad variable is one line in the init log, not a traceback
    pipeline = Pipeline.from_env()  # settings read once; models load on first use (or preload)
executor = ThreadPoolExecutor(pipeline.settings.concurrency, thread_name_prefix="tierserve-worker")
# A batch where every record failed is reported like any other, not raised: the result is the
# same (SQS redelivers them all) without counting a function error.
processor = AsyncBatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
cold_wait = ColdModelWait(pipeline.settings.cold_retry_s)
pipeline.registry.preload()


def serve_record(record: SQSRecord, deadline: Deadline, index: ResultIndex) -> None:
    """Serve one message; raise to report it failed. A message whose model has no copy running
    waits in the queue instead (reported failed with its visibility extended, or done with a
    delayed copy queued). A transient fault on the last receive the queue allows leaves its
    error documents before the message goes to the dead-letter queue."""
    try:
        pipeline.handle_message(record.body, deadline, index)
    except ModelStarting as error:
        with aws.within(deadline):
            if not cold_wait.defer(Delivery.from_record(record.raw_event), error):
                raise
    except TierserveError as error:
        if is_retryable(error):
            give_up_if_last(record, error, deadline)
        raise


def give_up_if_last(record: SQSRecord, error: TierserveError, deadline: Deadline) -> None:
    """On the last receive, write why nothing came (Pipeline.give_up), within the time kept
    back for reporting when the fault was the deadline itself; a failure to is only logged:
    the dead-letter queue still holds the message."""
    delivery = Delivery.from_record(record.raw_event)
    try:
        with aws.within(Deadline(at=deadline.hard_at, hard_at=deadline.hard_at)):
            if cold_wait.is_last_receive(delivery):
                pipeline.give_up(record.body, error, delivery.receive_count)
    except Exception as failure:
        logger.warning(
            "the last delivery failed, and its error document could not be written: the dead-letter "
            "queue holds the message",
            extra={"message_id": record.message_id, "error": aws.bounded_text(failure)},
        )


async def record_handler(record: SQSRecord, deadline: Deadline, index: ResultIndex) -> None:
    work = asyncio.get_running_loop().run_in_executor(executor, serve_record, record, deadline, index)
    try:
        await asyncio.wait_for(work, timeout=max(0.0, deadline.hard_at - time.monotonic()))
    except TimeoutError:
        logger.warning(
            "record still running at the invocation's deadline: reported as failed, SQS delivers it again",
            extra={"message_id": record.message_id},
        )
        raise OutOfTime("the record did not finish before the invocation's deadline") from None


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)
@log_metrics()
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    deadline = Deadline.for_invocation(context, DEADLINE_MARGIN_S)
    index = pipeline.index_messages((record.get("body", "") for record in event.get("Records", [])), deadline)
    return async_process_partial_response(
        event=event,
        record_handler=partial(record_handler, deadline=deadline, index=index),
        processor=processor,
        context=context,
    )
