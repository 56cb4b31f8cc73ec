"""The Lambda tier: one container function per small model, all from one image.

Every function runs the same image (``functions/inference/Dockerfile``: the tierserve core in
``/opt/python``, the handlers in the task root); its environment says which model it serves.
One model per function keeps memory sized to the model (``lambda_memory_mb``), scaling and
cold starts independent, and IAM narrowed to that model's prefix.

Architecture: x86_64 by default. onnxruntime ships wheels for both, and arm64 (Graviton) is
about 20% cheaper per GB-second, but x86_64 runs int8-quantized models on AVX2/AVX-512 VNNI
kernels, builds natively on the usual x86 CI runners and laptops without QEMU emulation, and
matches ``sam local invoke`` there. ``lambda_architecture=arm64`` switches both the function
and the image platform.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import Annotations, Duration, IgnoreMode, Size
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.nag import acknowledge
from tierserve.catalog import MB, Manifest, lambda_memory_mb
from tierserve.settings import (
    CACHE_MAX_MB_ENV,
    MODEL_BUCKET_ENV,
    MODEL_PREFIX_ENV,
    MODELS_ENV,
    PRELOAD_ENV,
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
    """The inference image, built from the repository root with a narrowed context, running
    ``handler`` (the API's by default; the S3 worker passes its own).

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


class LambdaModelFunction(Construct):
    """One container function serving one model version from the model bucket.

    Attributes: ``function``, ``role``, ``log_group``, ``manifest``, ``model_name``.
    The stack grants the read on the model version's prefix (``ModelStore.grant_read_model``).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        manifest: Manifest,
        code: lambda_.DockerImageCode,
        architecture: lambda_.Architecture,
        model_bucket_name: str,
        model_prefix: str,
        timeout: Duration,
        ephemeral_storage_mb: int,
        log_retention: logs.RetentionDays,
        log_level: str,
        preload: bool,
    ) -> None:
        super().__init__(scope, construct_id)
        self.manifest = manifest
        self.model_name = manifest.name
        ref = ModelRef(manifest.name, manifest.version)
        cache_max_mb = ephemeral_storage_mb - TMP_HEADROOM_MB
        if manifest.model.bytes > cache_max_mb * MB:
            Annotations.of(self).add_warning_v2(
                "tierserve:modelLargerThanTmp",
                f"model {ref} decompresses to {manifest.model.bytes / MB:.0f} MB, more than the "
                f"{cache_max_mb} MB its function can cache in /tmp; raise lambda_ephemeral_storage_mb",
            )

        self.log_group = logs.LogGroup(self, "Logs", retention=log_retention)
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"tierserve function for model {manifest.name}: logs, traces, reads its model",
        )
        # Only its own log group, instead of AWSLambdaBasicExecutionRole's logs on every group.
        self.log_group.grant_write(self.role)

        environment = {
            MODEL_BUCKET_ENV: model_bucket_name,
            MODEL_PREFIX_ENV: model_prefix,
            MODELS_ENV: str(ref),
            CACHE_MAX_MB_ENV: str(cache_max_mb),
            POWERTOOLS_SERVICE_NAME_ENV: SERVICE_NAME,
            POWERTOOLS_METRICS_NAMESPACE_ENV: METRICS_NAMESPACE,
            LOG_LEVEL_ENV: log_level,
        }
        if preload:
            environment[PRELOAD_ENV] = manifest.name

        self.function = lambda_.DockerImageFunction(
            self,
            "Function",
            code=code,
            architecture=architecture,
            memory_size=lambda_memory_mb(manifest),
            timeout=timeout,
            ephemeral_storage_size=Size.mebibytes(ephemeral_storage_mb),
            tracing=lambda_.Tracing.ACTIVE,
            role=self.role,
            log_group=self.log_group,
            environment=environment,
            description=f"tierserve Lambda tier: serves model {ref} ({manifest.model.bytes:,} bytes)",
        )
        acknowledge(
            self.role,
            "AwsSolutions-IAM5[Resource::*]",
            "Active tracing needs xray:PutTraceSegments and xray:PutTelemetryRecords, which "
            "support no resource-level permissions: the X-Ray docs require Resource '*'.",
        )
