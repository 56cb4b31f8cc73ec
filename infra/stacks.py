"""The two stacks, composed from the constructs, and the grants between them.

``TierserveStorage`` holds the model bucket and deploys first, so ops can upload models
before anything serves them. ``TierserveServing`` holds a function per Lambda-tier model and
the API; it imports the bucket by its export and reads only each model's own prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Annotations, App, CfnOutput, Duration, Stack
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.api import InferenceApi
from infra.config import API_GATEWAY_TIMEOUT_SECONDS, InfraConfig
from infra.lambda_tier import LambdaModelFunction, inference_image
from infra.model_store import ModelStore
from tierserve.catalog import Catalog

STORAGE_STACK = "TierserveStorage"
SERVING_STACK = "TierserveServing"
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
    """The model bucket and its access-log bucket. Attribute: ``model_store``."""

    def __init__(self, scope: Construct, construct_id: str, **kwargs: object) -> None:
        super().__init__(
            scope, construct_id, description="tierserve: model artifacts (S3)", tags=TAGS, **kwargs
        )
        self.model_store = ModelStore(self, "ModelStore")
        CfnOutput(
            self,
            "ModelBucketName",
            value=self.model_store.bucket.bucket_name,
            description=f"Upload models to s3://<bucket>/{self.model_store.model_prefix}/<name>/<version>/",
        )


class ServingStack(Stack):
    """A function per Lambda-tier model in ``catalog`` and the API that routes to them.

    Attributes: ``api``, ``lambda_models`` (model name -> :class:`LambdaModelFunction`).
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
            scope, construct_id, description="tierserve: inference API and functions", tags=TAGS, **kwargs
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
        entries = catalog.by_tier("lambda", config.lambda_max_model_mb)
        if entries:
            architecture = ARCHITECTURES[config.lambda_architecture]
            code = inference_image(architecture=architecture)
            bucket = model_store.bucket_for(self)
            functions = Construct(self, "LambdaModels")
            for entry in entries:
                model = LambdaModelFunction(
                    functions,
                    entry.name,
                    manifest=entry.manifest,
                    code=code,
                    architecture=architecture,
                    model_bucket_name=bucket.bucket_name,
                    model_prefix=model_store.model_prefix,
                    timeout=Duration.seconds(config.lambda_timeout_seconds),
                    ephemeral_storage_mb=config.lambda_ephemeral_storage_mb,
                    log_retention=RETENTION[config.log_retention_days],
                    log_level=config.log_level,
                    preload=config.preload,
                )
                model_store.grant_read_model(model.function, entry.name)
                self.api.add_lambda_model(entry.name, model.function)
                self.lambda_models[entry.name] = model
        self._warn(config, catalog)

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

    def _warn(self, config: InfraConfig, catalog: Catalog) -> None:
        heavy = [entry.name for entry in catalog.by_tier("gpu", config.lambda_max_model_mb)]
        if heavy:
            Annotations.of(self).add_warning_v2(
                "tierserve:gpuTierNotDeployed",
                f"models {', '.join(heavy)} are GPU-tier (over lambda_max_model_mb="
                f"{config.lambda_max_model_mb} MB, or a manifest override) and this app does not deploy "
                "the GPU tier yet: they get no route, and the API answers 404 for them",
            )
        if config.lambda_timeout_seconds > API_GATEWAY_TIMEOUT_SECONDS:
            Annotations.of(self).add_warning_v2(
                "tierserve:timeoutOverApiLimit",
                f"lambda_timeout_seconds={config.lambda_timeout_seconds} is over API Gateway's "
                f"{API_GATEWAY_TIMEOUT_SECONDS} s integration timeout: API callers get a 504 first",
            )


@dataclass(frozen=True)
class TierserveStacks:
    storage: StorageStack
    serving: ServingStack


def build_stacks(app: App, *, config: InfraConfig, catalog: Catalog) -> TierserveStacks:
    """Both stacks in ``app``; the serving stack reads the storage stack's bucket."""
    storage = StorageStack(app, STORAGE_STACK)
    serving = ServingStack(
        app, SERVING_STACK, config=config, catalog=catalog, model_store=storage.model_store
    )
    return TierserveStacks(storage=storage, serving=serving)
