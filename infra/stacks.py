"""The stacks, composed from the constructs, and the grants between them.

``TierserveStorage`` holds the model and data buckets and deploys first, so ops can upload
models before anything serves them; both buckets are retained. ``TierserveServing`` holds a
function per Lambda-tier model, a SageMaker endpoint per GPU-tier model, the API shell and
each model's routes; it imports the model bucket by its export and reads only each model's
own manifest and artifact.
``TierservePipeline`` (only when the catalog has models) holds the S3-triggered pipeline's
queue, worker and alarm; it deploys after the serving stack, whose GPU endpoints it calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Annotations, App, CfnOutput, Duration, Stack
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.api import InferenceApi
from infra.config import API_GATEWAY_TIMEOUT_SECONDS, ConfigError, InfraConfig
from infra.gpu_tier import GpuModelEndpoint, gpu_server_image, gpu_volume_key, needs_volume_key
from infra.lambda_routes import LambdaModelRoutes
from infra.lambda_tier import LambdaModelFunction
from infra.limits import image_limits, lambda_model_limits, model_key_limits
from infra.model_store import ModelStore
from infra.s3_pipeline import DataStore, InferencePipeline
from infra.sagemaker_routes import SageMakerModelRoutes
from tierserve.catalog import Catalog

STORAGE_STACK = "TierserveStorage"
SERVING_STACK = "TierserveServing"
PIPELINE_STACK = "TierservePipeline"
TAGS = {"project": "tierserve"}

ARCHITECTURES = {"x86_64": lambda_.Architecture.X86_64, "arm64": lambda_.Architecture.ARM_64}
RETENTION = {
    1: logs.RetentionDays.ONE_DAY,
    3: logs.RetentionDays.THREE_DAYS,
    5: logs.RetentionDays.FIVE_DAYS,
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    60: logs.RetentionDays.TWO_MONTHS,
    90: logs.RetentionDays.THREE_MONTHS,
    120: logs.RetentionDays.FOUR_MONTHS,
    150: logs.RetentionDays.FIVE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    400: logs.RetentionDays.THIRTEEN_MONTHS,
    545: logs.RetentionDays.EIGHTEEN_MONTHS,
    731: logs.RetentionDays.TWO_YEARS,
    1096: logs.RetentionDays.THREE_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
    2192: logs.RetentionDays.SIX_YEARS,
    2557: logs.RetentionDays.SEVEN_YEARS,
    2922: logs.RetentionDays.EIGHT_YEARS,
    3288: logs.RetentionDays.NINE_YEARS,
    3653: logs.RetentionDays.TEN_YEARS,
}


class StorageStack(Stack):
    """The model bucket, the data bucket, and their access-log bucket.

    Attributes: ``model_store``, ``data_store``.
    """

    def __init__(self, scope: Construct, construct_id: str, **kwargs: object) -> None:
        super().__init__(
            scope,
            construct_id,
            description="tierserve: model artifacts and pipeline data (S3)",
            tags=TAGS,
            **kwargs,
        )
        self.model_store = ModelStore(self, "ModelStore")
        self.data_store = DataStore(self, "DataStore", access_log_bucket=self.model_store.access_log_bucket)
        CfnOutput(
            self,
            "ModelBucketName",
            value=self.model_store.bucket.bucket_name,
            description=f"Upload models to s3://<bucket>/{self.model_store.model_prefix}/<name>/<version>/",
        )
        CfnOutput(
            self,
            "DataBucketName",
            value=self.data_store.bucket.bucket_name,
            description="Put inputs under s3://<bucket>/inputs/<model>/; results appear under outputs/ and errors/",
        )


class ServingStack(Stack):
    """A function per Lambda-tier model, an endpoint per GPU-tier model, the API shell, and
    each model's routes in it.

    Attributes: ``api``, ``lambda_models`` (model name -> :class:`LambdaModelFunction`),
    ``gpu_models`` (model name -> :class:`GpuModelEndpoint`), ``routes`` (model name ->
    :class:`LambdaModelRoutes` or :class:`SageMakerModelRoutes`).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: InfraConfig,
        catalog: Catalog,
        model_store: ModelStore,
        **kwargs: object,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description="tierserve: inference API, functions and GPU endpoints",
            tags=TAGS,
            **kwargs,
        )
        self.api = InferenceApi(
            self,
            "Api",
            auth=config.auth,
            throttle_rate_limit=config.throttle_rate_limit,
            throttle_burst_limit=config.throttle_burst_limit,
            log_retention=RETENTION[config.log_retention_days],
            manage_cloudwatch_role=config.api_cloudwatch_role,
        )
        self.lambda_models: dict[str, LambdaModelFunction] = {}
        self.gpu_models: dict[str, GpuModelEndpoint] = {}
        self.routes: dict[str, LambdaModelRoutes | SageMakerModelRoutes] = {}
        self._add_lambda_models(config, catalog, model_store)
        self._add_gpu_models(config, catalog, model_store)
        self._warn(config)

        CfnOutput(
            self, "ApiUrl", value=self.api.url, description="Open Inference Protocol base URL (append v2/...)"
        )
        if self.api.api_key is not None:
            CfnOutput(
                self,
                "ApiKeyId",
                value=self.api.api_key.key_id,
                description="aws apigateway get-api-key --include-value --api-key <this id>",
            )

    def _add_lambda_models(self, config: InfraConfig, catalog: Catalog, model_store: ModelStore) -> None:
        entries = catalog.by_tier("lambda", config.lambda_max_model_mb)
        limits = [*model_key_limits(config, [e.name for e in entries]), *(image_limits() if entries else [])]
        errors = [limit.message for limit in limits if limit.error]
        for entry in entries:  # every model's errors at once, not the first one's
            errors += [limit.message for limit in lambda_model_limits(entry.manifest, config) if limit.error]
        if errors:
            raise ConfigError("\n".join(errors))
        if not entries:
            return
        bucket = model_store.bucket_for(self)
        functions = Construct(self, "LambdaModels")
        routes = Construct(self, "LambdaRoutes")
        for entry in entries:
            model = LambdaModelFunction(
                functions,
                entry.name,
                manifest=entry.manifest,
                config=config,
                architecture=ARCHITECTURES[config.lambda_architecture],
                model_bucket_name=bucket.bucket_name,
                model_prefix=model_store.model_prefix,
                log_retention=RETENTION[config.log_retention_days],
            )
            model_store.grant_read_model(model.function, entry.manifest)
            self.routes[entry.name] = LambdaModelRoutes(
                routes, entry.name, api=self.api, model_name=entry.name, function=model.alias
            )
            self.lambda_models[entry.name] = model

    def _add_gpu_models(self, config: InfraConfig, catalog: Catalog, model_store: ModelStore) -> None:
        entries = catalog.by_tier("gpu", config.lambda_max_model_mb)
        if not entries:
            return
        image = gpu_server_image(self)
        # Instance types with local NVMe storage (the default g5 included) are encrypted by the
        # instance's hardware, and SageMaker refuses a KMS key for them: no key then.
        volume_key = gpu_volume_key(self) if needs_volume_key(config.gpu_instance_type) else None
        bucket = model_store.bucket_for(self)
        endpoints = Construct(self, "GpuModels")
        routes = Construct(self, "GpuRoutes")
        for entry in entries:
            model = GpuModelEndpoint(
                endpoints,
                entry.name,
                manifest=entry.manifest,
                image=image,
                model_bucket_name=bucket.bucket_name,
                model_prefix=model_store.model_prefix,
                instance_type=config.gpu_instance_type,
                initial_instance_count=config.gpu_initial_instance_count,
                min_instances=config.gpu_min_instances,
                max_instances=config.gpu_max_instances,
                invocations_per_instance=config.gpu_invocations_per_instance,
                max_batch_size=config.gpu_max_batch_size,
                max_queue_delay_ms=config.gpu_max_queue_delay_ms,
                volume_key=volume_key,
                log_retention=RETENTION[config.log_retention_days],
                log_level=config.log_level,
            )
            model_store.grant_read_model(model.role, entry.manifest)
            self.routes[entry.name] = SageMakerModelRoutes(
                routes,
                entry.name,
                api=self.api,
                manifest=entry.manifest,
                endpoint_name=model.endpoint.attr_endpoint_name,
                endpoint_arn=model.endpoint_arn,
            )
            self.gpu_models[entry.name] = model

    def _warn(self, config: InfraConfig) -> None:
        if config.lambda_timeout_seconds > API_GATEWAY_TIMEOUT_SECONDS:
            Annotations.of(self).add_warning_v2(
                "tierserve:timeoutOverApiLimit",
                f"lambda_timeout_seconds={config.lambda_timeout_seconds} is over API Gateway's "
                f"{API_GATEWAY_TIMEOUT_SECONDS} s integration timeout: API callers get a 504 first",
            )


class PipelineStack(Stack):
    """S3-triggered inference on the data bucket for every model in the catalog.

    Lambda-tier models run in the worker; GPU-tier models on the endpoints ``gpu_endpoints``
    names (model name -> endpoint name, from the serving stack). Attribute: ``pipeline``.
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
        gpu_endpoints: dict[str, str],
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
            alarm_email=config.alarm_email or None,
        )
        for entry in catalog:
            model_store.grant_read_model(self.pipeline.worker, entry.manifest)
        CfnOutput(
            self,
            "DeadLetterQueueUrl",
            value=self.pipeline.dead_letter_queue.queue_url,
            description="Inputs that failed every delivery; redrive with aws sqs start-message-move-task",
        )


@dataclass(frozen=True)
class TierserveStacks:
    storage: StorageStack
    serving: ServingStack
    pipeline: PipelineStack | None


def build_stacks(app: App, *, config: InfraConfig, catalog: Catalog) -> TierserveStacks:
    """Every stack in ``app``; the pipeline only when the catalog has a model to serve."""
    storage = StorageStack(app, STORAGE_STACK)
    serving = ServingStack(
        app, SERVING_STACK, config=config, catalog=catalog, model_store=storage.model_store
    )
    pipeline = None
    if catalog.entries:
        pipeline = PipelineStack(
            app,
            PIPELINE_STACK,
            config=config,
            catalog=catalog,
            model_store=storage.model_store,
            data_store=storage.data_store,
            gpu_endpoints={name: model.endpoint_name for name, model in serving.gpu_models.items()},
        )
        pipeline.add_stack_dependency(serving, "invokes the GPU endpoints the serving stack creates")
    return TierserveStacks(storage=storage, serving=serving, pipeline=pipeline)
