"""The stacks that serve the data bucket and streams, after the serving stack whose GPU
endpoints they call: ``TierservePipeline`` (S3-triggered inference and the drift job),
``TierserveBatch`` (bulk inference) and ``TierserveStream`` (Kinesis, when context ``stream``
names a model). :func:`infra.stacks.build_stacks` composes them.
"""

from __future__ import annotations

from aws_cdk import Annotations, CfnOutput, Duration, Stack
from constructs import Construct

from infra.batch import BatchInference
from infra.cdk_values import ARCHITECTURES, RETENTION, TAGS
from infra.config import ConfigError, InfraConfig
from infra.drift import add_drift_job
from infra.model_store import ModelStore
from infra.monitoring import AlarmTopic, notify
from infra.s3_pipeline import DataStore, InferencePipeline
from infra.streams import StreamInference
from tierserve.catalog import Catalog, Manifest
from tierserve.settings import GpuTarget


class PipelineStack(Stack):
    """S3-triggered inference on the data bucket for every model in the catalog.

    Lambda-tier models run in the worker; GPU-tier models on the endpoints and components
    ``gpu_endpoints`` names (model name -> target, from the serving stack). Attribute:
    ``pipeline``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: InfraConfig,
        catalog: Catalog,
        model_store: ModelStore,
        data_store: DataStore,
        gpu_endpoints: dict[str, GpuTarget],
        captured: list[str] | None = None,
        alarm_topic: AlarmTopic | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description="tierserve: S3-triggered inference (SQS, worker)",
            tags=TAGS,
            **kwargs,
        )
        self.pipeline = InferencePipeline(
            self,
            "Pipeline",
            data_bucket=data_store.bucket_for(self),
            models=[entry.manifest for entry in catalog],
            gpu_endpoints=gpu_endpoints,
            architecture=ARCHITECTURES[config.lambda_architecture],
            model_bucket_name=model_store.bucket_for(self).bucket_name,
            model_prefix=model_store.model_prefix,
            worker_timeout=Duration.seconds(config.pipeline_worker_timeout_seconds),
            max_receive_count=config.pipeline_max_receive_count,
            batch_size=config.pipeline_batch_size,
            batching_window=Duration.seconds(config.pipeline_batching_window_seconds),
            reserved_concurrency=config.pipeline_reserved_concurrency or None,
            ephemeral_storage_mb=config.lambda_ephemeral_storage_mb,
            log_retention=RETENTION[config.log_retention_days],
            log_level=config.log_level,
            alarm_topic=alarm_topic.topic_for(self) if alarm_topic is not None else None,
            max_input_mb=config.max_input_mb,
        )
        for entry in catalog:
            model_store.grant_read_model(self.pipeline.worker, entry.manifest)
        self.drift = add_drift_job(  # the scheduled drift job over the models that capture (infra/drift.py)
            self,
            captured=captured or [],
            config=config,
            catalog=catalog,
            model_store=model_store,
            data_store=data_store,
            architecture=ARCHITECTURES[config.lambda_architecture],
            log_retention=RETENTION[config.log_retention_days],
            alarm_topic=self.pipeline.alarm_topic,
        )
        CfnOutput(
            self,
            "DeadLetterQueueUrl",
            value=self.pipeline.dead_letter_queue.queue_url,
            description="Inputs that failed every delivery; redrive with aws sqs start-message-move-task",
        )


class BatchStack(Stack):
    """Bulk inference over the data bucket for every model in the catalog: the state machine
    that ``tierserve batch`` starts, and its batch function. Attribute: ``batch``."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: InfraConfig,
        catalog: Catalog,
        model_store: ModelStore,
        data_store: DataStore,
        gpu_endpoints: dict[str, GpuTarget],
        **kwargs: object,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description="tierserve: bulk inference over S3 (Step Functions Distributed Map)",
            tags=TAGS,
            **kwargs,
        )
        data_bucket = data_store.bucket_for(self)
        self.batch = BatchInference(
            self,
            "Batch",
            data_bucket=data_bucket,
            models=[entry.manifest for entry in catalog],
            gpu_endpoints=gpu_endpoints,
            architecture=ARCHITECTURES[config.lambda_architecture],
            model_bucket_name=model_store.bucket_for(self).bucket_name,
            model_prefix=model_store.model_prefix,
            function_timeout=Duration.seconds(config.batch_function_timeout_seconds),
            ephemeral_storage_mb=config.lambda_ephemeral_storage_mb,
            items_per_batch=config.batch_items_per_batch,
            max_concurrency=config.batch_max_concurrency,
            tolerated_failure_percentage=config.batch_tolerated_failure_percentage,
            log_retention=RETENTION[config.log_retention_days],
            log_level=config.log_level,
        )
        for entry in catalog:
            model_store.grant_read_model(self.batch.function, entry.manifest)
        CfnOutput(
            self,
            "StateMachineArn",
            value=self.batch.state_machine.state_machine_arn,
            description="tierserve batch s3://<data bucket>/inputs/<model>/<prefix> --model <model> starts it",
        )
        CfnOutput(
            self,
            "DataBucketName",
            value=data_bucket.bucket_name,
            description="The data bucket the state machine reads and writes",
        )


class StreamStack(Stack):
    """Inference on a Kinesis stream for the model context ``stream`` names: the records and
    results streams, the stream worker and its failure queue. Attribute: ``streams``."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: InfraConfig,
        manifest: Manifest,
        model_store: ModelStore,
        gpu_endpoints: dict[str, GpuTarget],
        alarm_topic: AlarmTopic | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description=f"tierserve: inference on a Kinesis stream ({manifest.name})",
            tags=TAGS,
            **kwargs,
        )
        self.streams = StreamInference(
            self,
            "Streams",
            manifest=manifest,
            gpu_endpoints=gpu_endpoints,
            architecture=ARCHITECTURES[config.lambda_architecture],
            model_bucket_name=model_store.bucket_for(self).bucket_name,
            model_prefix=model_store.model_prefix,
            shards=config.stream_shards,
            batch_size=config.stream_batch_size,
            max_retry_attempts=config.stream_max_retry_attempts,
            worker_timeout=Duration.seconds(config.pipeline_worker_timeout_seconds),
            ephemeral_storage_mb=config.lambda_ephemeral_storage_mb,
            log_retention=RETENTION[config.log_retention_days],
            log_level=config.log_level,
        )
        model_store.grant_read_model(self.streams.worker, manifest)
        if manifest.name in gpu_endpoints and config.gpu_min_copies == 0:
            # Kinesis cannot hold one record back as SQS can: retries seconds apart end in the
            # failure queue long before a copy has started (docs/batch-and-streams.md).
            Annotations.of(self).add_warning_v2(
                "tierserve:streamModelScalesToZero",
                f"the stream's model {manifest.name} is on the GPU tier and scales to zero (gpu_min_copies=0): "
                "while it has no copy, its records fail every retry and their positions go to the failure "
                "queue; set gpu_min_copies to 1 or more, or replay those ranges once it runs",
            )
        if alarm_topic is not None:
            notify(self.streams.alarm, alarm_topic.topic_for(self))
        outputs = {
            "RecordsStreamName": (
                self.streams.records.stream_name,
                "Put records here (v2 infer requests or rows)",
            ),
            "ResultsStreamName": (
                self.streams.results.stream_name,
                "Read results here, under each record's partition key",
            ),
            "FailureQueueUrl": (
                self.streams.failures.queue_url,
                "Positions of batches that failed every retry",
            ),
        }
        for output_id, (value, description) in outputs.items():
            CfnOutput(self, output_id, value=value, description=description)


def stream_model(config: InfraConfig, catalog: Catalog) -> Manifest | None:
    """The manifest of the model context ``stream`` names (None: no stream).

    Raises:
        ConfigError: the catalog holds no such model.
    """
    if not config.stream:
        return None
    entry = catalog.get(config.stream)
    if entry is None:
        names = ", ".join(e.name for e in catalog) or "none"
        raise ConfigError(
            f"cdk.json context 'stream' is {config.stream!r}, which the catalog does not hold (it holds {names}): "
            'package that model, or set stream to one of these, or to "" for no stream'
        )
    return entry.manifest
