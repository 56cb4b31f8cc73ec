"""Lambda handler: inference on files put under ``inputs/`` in S3, delivered through SQS.

A thin adapter: powertools decorators for logs, metrics (cold start) and traces, and its
batch processor for SQS with partial batch failure reporting. Each message goes to the
transport-free pipeline in the tierserve core; a message whose handling raises (a transient
fault, or a poison message) is reported in ``batchItemFailures`` so SQS redelivers it, and
moves it to the dead-letter queue after ``maxReceiveCount`` receives. The event source
mapping must enable ``ReportBatchItemFailures``.

The records of a batch are served concurrently (``TIERSERVE_WORKER_CONCURRENCY`` threads):
most of the time goes to S3 round trips, and the pipeline's conditional writes keep two
records for the same key from overwriting each other's newer result.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    AsyncBatchProcessor,
    EventType,
    async_process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve.s3_pipeline import Pipeline
from tierserve.telemetry import logger, metrics, tracer

pipeline = Pipeline.from_env()  # settings read once; models load on first use (or preload)
executor = ThreadPoolExecutor(pipeline.settings.concurrency, thread_name_prefix="tierserve-worker")
# A batch where every record failed is reported like any other, not raised: the result is the
# same (SQS redelivers them all) without counting a function error.
processor = AsyncBatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
pipeline.registry.preload()


async def record_handler(record: SQSRecord) -> None:
    await asyncio.get_running_loop().run_in_executor(executor, pipeline.handle_message, record.body)


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return async_process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
