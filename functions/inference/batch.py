"""Lambda handler: one batch of a bulk run, handed over by the ``TierserveBatch`` state
machine's Distributed Map (``{"Items": [...], "BatchInput": {"model": ..., "reader": ...}}``).

A thin adapter: powertools decorators for logs, metrics (cold start) and traces; the batch is
served by the S3 pipeline's own code in the tierserve core (``tierserve.batch.serve_batch``),
its items concurrently (``TIERSERVE_WORKER_CONCURRENCY`` threads), every result where and as
the S3 worker writes it in the data bucket the batch names (which must be
``TIERSERVE_DATA_BUCKET`` where that is set, as the stack sets it).

It returns the batch's counts, or raises what the state machine reads by name:
``BatchItemsFailed`` (retried: a transient fault, or the invocation's time ran out before
every item was done), ``PoisonItems`` and ``InvalidBatch`` (never retried). The invocation
never outlasts itself: its remaining time, less a margin, bounds every S3 and SageMaker call.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve.aws import Deadline
from tierserve.batch import serve_batch
from tierserve.s3_pipeline import Pipeline
from tierserve.settings import exit_on_bad_settings
from tierserve.telemetry import logger, metrics, tracer

# Kept back from the invocation's remaining time, as the S3 worker keeps it (worker.py).
DEADLINE_MARGIN_S = 5.0

with exit_on_bad_settings():  # a bad variable is one line in the init log, not a traceback
    pipeline = Pipeline.from_env()  # settings read once; models load on first use (or preload)
executor = ThreadPoolExecutor(pipeline.settings.concurrency, thread_name_prefix="tierserve-batch")
pipeline.registry.preload()


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, int]:
    deadline = Deadline.for_invocation(context, DEADLINE_MARGIN_S)
    summary = serve_batch(pipeline, event, executor=executor, deadline=deadline)
    logger.info("batch served", extra=summary.as_dict())
    return summary.as_dict()
