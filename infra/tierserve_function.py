"""TierserveFunction: every Lambda function of tierserve, from one image.

The API function of each Lambda-tier model (``infra/lambda_tier.py``) and the S3 worker
(``infra/s3_pipeline.py``) run the same image (``functions/inference/Dockerfile``: the
tierserve core in ``/opt/python``, the handlers in the task root) with a different handler as
the image command, so they share one asset in ECR. They also share what this construct
builds: the environment that names the models and where they live, a log group with the
configured retention, a role that only that function's Lambda service may assume and that
writes only that log group, and active tracing. Reads of models and data are the stack's
grants (``ModelStore.grant_read_model``).

Architecture: x86_64 by default. onnxruntime ships wheels for both, and arm64 (Graviton) is
about 20% cheaper per GB-second, but x86_64 runs int8-quantized models on AVX2/AVX-512 VNNI
kernels, builds natively on the usual x86 CI runners and laptops without QEMU emulation, and
matches ``sam local invoke`` there. ``lambda_architecture=arm64`` switches both the function
and the image platform (the construct builds the image for the function's architecture, so
the two cannot disagree).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from aws_cdk import Annotations, Duration, IgnoreMode, Size
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.nag import acknowledge
from infra.trust import service_principal
from tierserve.catalog import Manifest
from tierserve.settings import (
    CACHE_MAX_MB_ENV,
    DEFAULT_FETCH_CONNECTIONS,
    FETCH_CONNECTIONS_ENV,
    MODEL_BUCKET_ENV,
    MODEL_PREFIX_ENV,
    MODELS_ENV,
    ModelRef,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
INFERENCE_DOCKERFILE = "functions/inference/Dockerfile"
# Docker (BuildKit) reads ``<Dockerfile>.dockerignore`` next to the Dockerfile; the image
# asset below passes the same patterns to CDK, so both build from the same small context.
INFERENCE_DOCKERIGNORE = "functions/inference/Dockerfile.dockerignore"
INFERENCE_HANDLER = "api.handler"

SERVICE_NAME = "tierserve"
METRICS_NAMESPACE = "Tierserve"
POWERTOOLS_SERVICE_NAME_ENV = "POWERTOOLS_SERVICE_NAME"
POWERTOOLS_METRICS_NAMESPACE_ENV = "POWERTOOLS_METRICS_NAMESPACE"
# powertools reads POWERTOOLS_LOG_LEVEL first; LOG_LEVEL is its legacy name.
LOG_LEVEL_ENV = "POWERTOOLS_LOG_LEVEL"
# /tmp the model cache leaves to the runtime, partial downloads' neighbours and temp files.
TMP_HEADROOM_MB = 512
# Every caller (API Gateway, the S3 pipeline's event source) invokes this alias, never $LATEST:
# a published version, which SnapStart and provisioned concurrency need.
ALIAS_NAME = "live"
SNAPSTART_PUBLISH_WARNING = "@aws-cdk/aws-lambda:snapStartRequirePublish"
XRAY_REASON = (
    "Active tracing needs xray:PutTraceSegments and xray:PutTelemetryRecords, which support no "
    "resource-level permissions: the X-Ray docs require Resource '*'."
)


def dockerignore_patterns(path: Path) -> list[str]:
    """The patterns of a .dockerignore file, without comments and blank lines."""
    lines = path.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def image_context_patterns(root: Path = REPO_ROOT) -> list[str]:
    """The .dockerignore patterns that narrow the build context to what the image copies."""
    return dockerignore_patterns(root / INFERENCE_DOCKERIGNORE)


def inference_image(
    *, architecture: lambda_.Architecture, root: Path = REPO_ROOT, handler: str = INFERENCE_HANDLER
) -> lambda_.DockerImageCode:
    """The inference image for ``architecture``, built from the repository root with a narrowed
    context, running ``handler`` (the API's by default; the S3 worker passes its own).

    The same directory, file and options give the same asset hash, so every function that
    uses this code shares one image in ECR; the handler is the function's image command, not
    part of the image.
    """
    return lambda_.DockerImageCode.from_image_asset(
        str(root),
        file=INFERENCE_DOCKERFILE,
        cmd=[handler],
        platform=ecr_assets.Platform.custom(architecture.docker_platform),
        exclude=image_context_patterns(root),
        ignore_mode=IgnoreMode.DOCKER,
    )


def model_environment(
    *, models: Sequence[Manifest], model_bucket_name: str, model_prefix: str, log_level: str
) -> dict[str, str]:
    """What every tierserve process that serves ``models`` reads: where the models live,
    which ones (``TIERSERVE_MODELS``), and how it logs and names its metrics."""
    return {
        MODEL_BUCKET_ENV: model_bucket_name,
        MODEL_PREFIX_ENV: model_prefix,
        MODELS_ENV: ModelRef.join(ModelRef(m.name, m.version) for m in models),
        POWERTOOLS_SERVICE_NAME_ENV: SERVICE_NAME,
        POWERTOOLS_METRICS_NAMESPACE_ENV: METRICS_NAMESPACE,
        LOG_LEVEL_ENV: log_level,
    }


class TierserveFunction(Construct):
    """One tierserve container function: image, environment, log group, role, tracing, and a
    published version behind the alias ``live`` that every caller invokes.

    ``models`` are what the function serves (its ``TIERSERVE_MODELS``); ``environment`` adds
    the handler's own variables. The disk cache gets ``cache_max_mb``, by default all of
    ``ephemeral_storage_mb`` but :data:`TMP_HEADROOM_MB`. ``snapstart`` snapshots each published
    version (SnapStart ``ApplyOn: PublishedVersions``; /tmp at most 512 MB);
    ``provisioned_concurrency`` keeps that many environments of the alias initialized instead.

    Attributes: ``function``, ``version``, ``alias``, ``role``, ``log_group``, ``cache_max_mb``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        handler: str,
        architecture: lambda_.Architecture,
        models: Sequence[Manifest],
        model_bucket_name: str,
        model_prefix: str,
        memory_mb: int,
        timeout: Duration,
        ephemeral_storage_mb: int,
        log_retention: logs.RetentionDays,
        log_level: str,
        description: str,
        role_description: str,
        environment: Mapping[str, str] | None = None,
        reserved_concurrency: int | None = None,
        cache_max_mb: int | None = None,
        fetch_connections: int = DEFAULT_FETCH_CONNECTIONS,
        snapstart: bool = False,
        provisioned_concurrency: int = 0,
    ) -> None:
        super().__init__(scope, construct_id)
        if snapstart and provisioned_concurrency:
            raise ValueError(
                "a function has SnapStart or provisioned concurrency, not both (Lambda refuses it)"
            )
        self.cache_max_mb = ephemeral_storage_mb - TMP_HEADROOM_MB if cache_max_mb is None else cache_max_mb
        self.log_group = logs.LogGroup(self, "Logs", retention=log_retention)
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=service_principal(self, "lambda.amazonaws.com"),
            description=role_description,
        )
        # Only its own log group, instead of AWSLambdaBasicExecutionRole's logs on every group.
        self.log_group.grant_write(self.role)
        acknowledge(self.role, "AwsSolutions-IAM5[Resource::*]", XRAY_REASON)
        self.function = lambda_.DockerImageFunction(
            self,
            "Function",
            code=inference_image(architecture=architecture, handler=handler),
            architecture=architecture,
            memory_size=memory_mb,
            timeout=timeout,
            ephemeral_storage_size=Size.mebibytes(ephemeral_storage_mb),
            tracing=lambda_.Tracing.ACTIVE,
            role=self.role,
            log_group=self.log_group,
            environment={
                **model_environment(
                    models=models,
                    model_bucket_name=model_bucket_name,
                    model_prefix=model_prefix,
                    log_level=log_level,
                ),
                CACHE_MAX_MB_ENV: str(self.cache_max_mb),
                FETCH_CONNECTIONS_ENV: str(fetch_connections),
                **(environment or {}),
            },
            reserved_concurrent_executions=reserved_concurrency,
            description=description,
            snap_start=lambda_.SnapStartConf.ON_PUBLISHED_VERSIONS if snapstart else None,
        )
        if snapstart:  # CDK's reminder that SnapStart needs a published version: this is one
            Annotations.of(self.function).acknowledge_warning(
                SNAPSTART_PUBLISH_WARNING, "the alias below targets a published version"
            )
        # A new version whenever the function's configuration or image changes; SnapStart
        # snapshots it when it is published, so the alias only ever points at a ready one.
        self.version = self.function.current_version
        self.alias = lambda_.Alias(
            self,
            "Live",
            alias_name=ALIAS_NAME,
            version=self.version,
            provisioned_concurrent_executions=provisioned_concurrency or None,
        )
