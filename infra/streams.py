"""Inference on a Kinesis stream: records in, result records out, in each shard's order.

    producer -> Kinesis stream (records) -> event source mapping -> stream worker
                (functions/inference/stream.py: the image every tierserve function runs)
             -> Kinesis stream (results), each result under its record's partition key
    a batch that keeps failing -> its position (shard, sequence numbers) -> SQS failure queue

The mapping reports partial batch failures (``ReportBatchItemFailures``), bisects a batch
whose invocation fails, retries at most ``stream_max_retry_attempts`` times, then sends the
batch's position to the failure queue (never the records) and moves on; an alarm goes off
when that queue is not empty.

Results go to a second stream rather than to S3 through Firehose: a stream keeps them in
their shard's order under their record's partition key, consumers read them within a second
(Firehose buffers for 60 s or more, and writes objects in arrival order), the worker writes
them with one PutRecords per batch, and a Firehose delivery stream can still archive the
results stream to S3 without changing the worker.

Both streams use Kinesis' own key (``aws/kinesis``): records are encrypted at rest, and
neither the producer nor the worker needs KMS permissions. The failure queue is SSE-SQS and
TLS-only.
"""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Duration
from aws_cdk import aws_kinesis as kinesis
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from infra.monitoring import queue_not_empty_alarm
from infra.nag import acknowledge
from infra.s3_pipeline import gpu_endpoints_environment, grant_invoke_endpoints, pipeline_memory_mb
from infra.tierserve_function import TierserveFunction
from tierserve.catalog import Manifest
from tierserve.settings import OUTPUT_STREAM_ENV, STREAM_MODEL_ENV, GpuTarget

STREAM_HANDLER = "stream.handler"
FAILURE_RETENTION = Duration.days(14)  # SQS's longest: time to find the cause and replay the range


class StreamInference(Construct):
    """The records stream, the results stream, the stream worker, its event source mapping,
    the failure queue and its alarm, for one model.

    ``gpu_endpoints`` names the model's SageMaker endpoint when it is on the GPU tier. The
    stack grants the reads of the model's objects
    (``ModelStore.grant_read_model(streams.worker, manifest)``).

    Attributes: ``records``, ``results``, ``failures``, ``worker``, ``role``, ``log_group``,
    ``alarm``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        manifest: Manifest,
        gpu_endpoints: Mapping[str, GpuTarget],
        architecture: lambda_.Architecture,
        model_bucket_name: str,
        model_prefix: str,
        shards: int,
        batch_size: int,
        max_retry_attempts: int,
        worker_timeout: Duration,
        ephemeral_storage_mb: int,
        log_retention: logs.RetentionDays,
        log_level: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.records = kinesis.Stream(
            self, "Records", shard_count=shards, encryption=kinesis.StreamEncryption.MANAGED
        )
        self.results = kinesis.Stream(
            self, "Results", shard_count=shards, encryption=kinesis.StreamEncryption.MANAGED
        )
        self.failures = sqs.Queue(
            self,
            "Failures",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=FAILURE_RETENTION,
        )
        acknowledge(
            self.failures,
            "AwsSolutions-SQS3",
            "This queue is the stream mapping's on-failure destination: it already is where failures go, "
            "and it holds positions in the stream (shard, sequence numbers), never the records.",
        )
        gpu = {manifest.name: gpu_endpoints[manifest.name]} if manifest.name in gpu_endpoints else {}
        worker = TierserveFunction(
            self,
            "Worker",
            handler=STREAM_HANDLER,
            architecture=architecture,
            models=[manifest],
            model_bucket_name=model_bucket_name,
            model_prefix=model_prefix,
            memory_mb=pipeline_memory_mb([manifest], gpu),
            timeout=worker_timeout,
            ephemeral_storage_mb=ephemeral_storage_mb,
            log_retention=log_retention,
            log_level=log_level,
            environment={
                OUTPUT_STREAM_ENV: self.results.stream_name,
                STREAM_MODEL_ENV: manifest.name,
                **gpu_endpoints_environment(gpu),
            },
            description=f"tierserve stream worker: Kinesis records -> {manifest.name}@{manifest.version} -> results",
            role_description="tierserve stream worker: reads the records stream, writes the results stream",
        )
        self.worker, self.role, self.log_group = worker.function, worker.role, worker.log_group
        self.worker.add_event_source(
            event_sources.KinesisEventSource(
                self.records,
                starting_position=lambda_.StartingPosition.TRIM_HORIZON,
                batch_size=batch_size,
                bisect_batch_on_error=True,
                retry_attempts=max_retry_attempts,
                report_batch_item_failures=True,
                on_failure=event_sources.SqsDlq(self.failures),
                parallelization_factor=1,  # one batch per shard at a time: results in the shard's order
            )
        )
        self.results.grant_write(self.role)
        grant_invoke_endpoints(self.role, self, gpu)
        self.alarm = queue_not_empty_alarm(
            self,
            "FailuresAlarm",
            self.failures,
            "tierserve stream: a batch of records failed every retry; the failure queue holds its shard and "
            "sequence numbers. Read the stream worker's logs, fix the cause, then replay that range.",
        )
