"""Lambda handler: inference on Kinesis records, delivered by the stream's event source mapping.

A thin adapter: powertools decorators for logs, metrics (cold start) and traces, and its
batch processor for Kinesis with partial batch responses. Each record goes to the
transport-free stream worker in the tierserve core (``tierserve.streams``), in the shard's
order; the results go to the output stream (``TIERSERVE_OUTPUT_STREAM``) once the batch is
served. A record that fails (a transient fault) is reported in ``batchItemFailures`` with
every record after it, so the mapping retries from it, bisecting on error, at most
``MaximumRetryAttempts`` times before the on-failure destination gets the batch's position.
The event source mapping must enable ``ReportBatchItemFailures``.

The invocation never outlasts itself: its remaining time, less a margin, bounds every call.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve.aws import Deadline
from tierserve.settings import exit_on_bad_settings
from tierserve.streams import StreamWorker
from tierserve.telemetry import logger, metrics, tracer

# Kept back from the invocation's remaining time, as the S3 worker keeps it (worker.py).
DEADLINE_MARGIN_S = 5.0

with exit_on_bad_settings():  # a bad variable is one line in the init log, not a traceback
    stream = StreamWorker.from_env()  # settings read once; the model loads on first use (or preload)
# A batch where every record failed is reported like any other (the mapping retries from the
# first), not raised: raising would make the mapping bisect records that did not fail.
processor = BatchProcessor(event_type=EventType.KinesisDataStreams, raise_on_entire_batch_failure=False)
stream.pipeline.registry.preload()


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    batch = stream.start(Deadline.for_invocation(context, DEADLINE_MARGIN_S))
    response = process_partial_response(
        event=event, record_handler=batch.serve, processor=processor, context=context
    )
    return batch.finish(response)
