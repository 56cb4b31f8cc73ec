"""The GPU tier: one SageMaker real-time endpoint per heavy model, all from one image.

Every endpoint runs ``functions/gpu_server`` (the SageMaker hosting contract over the
tierserve core); its environment names the model, which the server fetches from the model
bucket by its manifest, as a Lambda function does. So no ``ModelDataUrl``: the same S3
layout, digests and checks as the Lambda tier, and a new model version is a new
``name@version`` in the environment (a new SageMaker Model and EndpointConfig, which
SageMaker rolls out blue/green on the named endpoint).

Per model: an execution role that only SageMaker may assume, for this account's SageMaker
resources, and that may pull the image, read the model version's manifest and artifact,
and write its endpoint's log group (the server's metrics are EMF lines in it; nothing calls
PutMetricData); a Model; an EndpointConfig (one ``AllTraffic`` variant); an Endpoint with a
name derived from the model name (:func:`gpu_endpoint_name`, nothing time-based); and
target-tracking autoscaling on invocations per instance.

Volume encryption: a customer-managed KMS key (rotated yearly) on the endpoint's EBS
volume, except on instance types with local NVMe storage (g4dn, g5, g6, p4d, ...), which
SageMaker encrypts in hardware and for which it refuses a ``KmsKeyId`` (CreateEndpointConfig
fails): :func:`needs_volume_key` says which.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from aws_cdk import Duration, IgnoreMode, RemovalPolicy, Stack
from aws_cdk import aws_applicationautoscaling as appscaling
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

from infra.nag import acknowledge
from infra.tierserve_function import REPO_ROOT, dockerignore_patterns, model_environment
from infra.trust import service_principal
from tierserve.catalog import Manifest
from tierserve.settings import MAX_BATCH_SIZE_ENV, MAX_QUEUE_DELAY_MS_ENV

GPU_DOCKERFILE = "functions/gpu_server/Dockerfile"
# Docker (BuildKit) reads ``<Dockerfile>.dockerignore``; the asset passes the same patterns.
GPU_DOCKERIGNORE = "functions/gpu_server/Dockerfile.dockerignore"

ENDPOINT_PREFIX = "tierserve"
ENDPOINT_NAME_MAX = 63  # SageMaker: ^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}
VARIANT_NAME = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
# Application Auto Scaling acts on SageMaker through this service-linked role (it creates it
# on first use); a plain role of our own would need sagemaker:UpdateEndpointWeightsAndCapacities.
AUTOSCALING_SERVICE_LINKED_ROLE = (
    "aws-service-role/sagemaker.application-autoscaling.amazonaws.com/"
    "AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint"
)
SCALE_OUT_COOLDOWN = Duration.minutes(1)
SCALE_IN_COOLDOWN = Duration.minutes(5)
# SageMaker sends the container's stdout to the log group /aws/sagemaker/Endpoints/{endpoint};
# the server's metrics are EMF lines there, extracted into METRICS_NAMESPACE by CloudWatch Logs.
SAGEMAKER_LOG_GROUP_PREFIX = "/aws/sagemaker/Endpoints"

# Instance families with local NVMe instance storage: SageMaker refuses a KmsKeyId for them.
# Families not listed here with a "d" after the generation (c5d, m6id, g4dn, p3dn, p4de,
# x2iedn) have instance storage too (_STORAGE_SUFFIX).
INSTANCE_STORE_FAMILIES = frozenset(
    {"g5", "g6", "g6e", "gr6", "p5", "p5e", "p5en", "p6", "trn1", "trn1n", "trn2"}
)
_STORAGE_SUFFIX = re.compile(r"^[a-z]+\d+[a-z]*d[a-z]*$")


def gpu_endpoint_name(model_name: str, *, prefix: str = ENDPOINT_PREFIX) -> str:
    """The SageMaker endpoint name of a model: ``{prefix}-{model}``, deterministic.

    Names over SageMaker's 63 characters keep their start and end in a short digest of the
    model name, so two long names never collide. Example: ``gpu_endpoint_name("big-llm")``
    is ``"tierserve-big-llm"``.
    """
    name = f"{prefix}-{model_name}"
    if len(name) <= ENDPOINT_NAME_MAX:
        return name
    digest = hashlib.sha256(model_name.encode()).hexdigest()[:8]
    return f"{name[: ENDPOINT_NAME_MAX - len(digest) - 1].rstrip('-')}-{digest}"


def endpoint_arn(scope: Construct, endpoint_name: str) -> str:
    """The ARN of endpoint ``endpoint_name`` in ``scope``'s account and region (IAM
    compares endpoint ARNs in lowercase; tierserve's names already are)."""
    return Stack.of(scope).format_arn(service="sagemaker", resource="endpoint", resource_name=endpoint_name)


def has_instance_storage(instance_type: str) -> bool:
    """True for instance types with local NVMe storage (``ml.g5.xlarge``: yes, ``ml.p3.2xlarge``: no)."""
    family = instance_type.split(".")[1] if instance_type.count(".") >= 2 else instance_type
    return family in INSTANCE_STORE_FAMILIES or bool(_STORAGE_SUFFIX.match(family))


def needs_volume_key(instance_type: str) -> bool:
    """Whether an endpoint on ``instance_type`` gets the KMS volume key (EBS volume) or not
    (instance storage, encrypted in hardware; SageMaker refuses a key there)."""
    return not has_instance_storage(instance_type)


def gpu_server_image(
    scope: Construct, construct_id: str = "GpuServerImage", *, root: Path = REPO_ROOT
) -> ecr_assets.DockerImageAsset:
    """The GPU server image (linux/amd64, CUDA), built from the repository root with the
    context narrowed by its ``Dockerfile.dockerignore``; one per stack, shared by every endpoint."""
    return ecr_assets.DockerImageAsset(
        scope,
        construct_id,
        directory=str(root),
        file=GPU_DOCKERFILE,
        platform=ecr_assets.Platform.LINUX_AMD64,
        exclude=dockerignore_patterns(root / GPU_DOCKERIGNORE),
        ignore_mode=IgnoreMode.DOCKER,
    )


def gpu_volume_key(scope: Construct, construct_id: str = "GpuVolumeKey") -> kms.Key:
    """A customer-managed key, rotated yearly, for the endpoints' EBS volumes."""
    return kms.Key(
        scope,
        construct_id,
        description="tierserve GPU tier: encrypts the SageMaker endpoints' storage volumes",
        enable_key_rotation=True,
    )


class GpuModelEndpoint(Construct):
    """One heavy model on its own autoscaled SageMaker real-time endpoint.

    Attributes: ``manifest``, ``model_name``, ``endpoint_name`` (a plain string, known at
    synth), ``endpoint`` (the CfnEndpoint: its ``ref`` is the ARN), ``model``,
    ``endpoint_config``, ``role``, ``log_group``, ``scalable_target``.
    The stack grants the read of the model version's objects
    (``ModelStore.grant_read_model(role, manifest)``).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        manifest: Manifest,
        image: ecr_assets.DockerImageAsset,
        model_bucket_name: str,
        model_prefix: str,
        instance_type: str,
        initial_instance_count: int,
        min_instances: int,
        max_instances: int,
        invocations_per_instance: float,
        max_batch_size: int,
        max_queue_delay_ms: float,
        volume_key: kms.IKey | None,
        log_retention: logs.RetentionDays,
        log_level: str,
        endpoint_prefix: str = ENDPOINT_PREFIX,
    ) -> None:
        super().__init__(scope, construct_id)
        if volume_key is not None and has_instance_storage(instance_type):
            raise ValueError(
                f"{instance_type} has local NVMe storage, which SageMaker encrypts itself and for which "
                "it refuses a KMS key: pass volume_key=None (see needs_volume_key)"
            )
        self.manifest = manifest
        self.model_name = manifest.name
        self.endpoint_name = gpu_endpoint_name(manifest.name, prefix=endpoint_prefix)

        # SageMaker writes the container's stdout here; created by us to set its retention.
        self.log_group = logs.LogGroup(
            self,
            "Logs",
            log_group_name=f"{SAGEMAKER_LOG_GROUP_PREFIX}/{self.endpoint_name}",
            retention=log_retention,
            removal_policy=RemovalPolicy.DESTROY,  # a retained named group would block a redeploy
        )
        self.role = iam.Role(
            self,
            "ExecutionRole",
            # SageMaker's confused-deputy guidance: its own resources in this account and region.
            assumed_by=service_principal(
                self,
                "sagemaker.amazonaws.com",
                source_arn=Stack.of(self).format_arn(service="sagemaker", resource="*"),
            ),
            description=f"tierserve GPU endpoint for model {manifest.name}: pulls its image, reads its "
            "model, writes its logs",
        )
        image.repository.grant_pull(self.role)
        self.log_group.grant(
            self.role,
            "logs:CreateLogGroup",
            "logs:CreateLogStream",
            "logs:DescribeLogStreams",
            "logs:PutLogEvents",
        )
        acknowledge(
            self.role,
            "AwsSolutions-IAM5[Resource::*]",
            "ecr:GetAuthorizationToken (pulling the image) supports no resource-level permissions: "
            "Resource '*' is required, and the token only lets the role pull what ecr:BatchGetImage "
            "allows, the assets repository.",
        )
        environment = {
            **model_environment(
                models=[manifest],
                model_bucket_name=model_bucket_name,
                model_prefix=model_prefix,
                log_level=log_level,
            ),
            MAX_BATCH_SIZE_ENV: str(max_batch_size),
            MAX_QUEUE_DELAY_MS_ENV: f"{max_queue_delay_ms:g}",
        }
        self.model = sagemaker.CfnModel(
            self,
            "Model",
            execution_role_arn=self.role.role_arn,
            primary_container=sagemaker.CfnModel.ContainerDefinitionProperty(
                image=image.image_uri, mode="SingleModel", environment=environment
            ),
            # The server fetches its model from S3 (network isolation would cut it off).
            enable_network_isolation=False,
        )
        # CreateModel checks that the role may pull the image: the policy must exist first.
        self.model.node.add_dependency(self.role)

        self.endpoint_config = sagemaker.CfnEndpointConfig(
            self,
            "Config",
            production_variants=[
                sagemaker.CfnEndpointConfig.ProductionVariantProperty(
                    variant_name=VARIANT_NAME,
                    model_name=self.model.attr_model_name,
                    instance_type=instance_type,
                    initial_instance_count=initial_instance_count,
                    initial_variant_weight=1.0,
                )
            ],
            kms_key_id=volume_key.key_arn if volume_key is not None else None,
            # No data capture: requests carry callers' tensors, which nobody asked us to keep.
        )
        self.endpoint = sagemaker.CfnEndpoint(
            self,
            "Endpoint",
            endpoint_name=self.endpoint_name,
            endpoint_config_name=self.endpoint_config.attr_endpoint_config_name,
        )
        self.endpoint.node.add_dependency(self.log_group)

        self.scalable_target = appscaling.ScalableTarget(
            self,
            "Scaling",
            service_namespace=appscaling.ServiceNamespace.SAGEMAKER,
            scalable_dimension=SCALABLE_DIMENSION,
            resource_id=f"endpoint/{self.endpoint.attr_endpoint_name}/variant/{VARIANT_NAME}",
            min_capacity=min_instances,
            max_capacity=max_instances,
            role=iam.Role.from_role_arn(
                self,
                "AutoScalingRole",
                Stack.of(self).format_arn(
                    service="iam", region="", resource="role", resource_name=AUTOSCALING_SERVICE_LINKED_ROLE
                ),
                mutable=False,
            ),
        )
        self.scalable_target.scale_to_track_metric(
            "InvocationsPerInstance",
            target_value=invocations_per_instance,
            predefined_metric=appscaling.PredefinedMetric.SAGEMAKER_VARIANT_INVOCATIONS_PER_INSTANCE,
            scale_out_cooldown=SCALE_OUT_COOLDOWN,
            scale_in_cooldown=SCALE_IN_COOLDOWN,
        )

    @property
    def endpoint_arn(self) -> str:
        """The endpoint's ARN as a token (``Ref``), so whoever uses it deploys after the endpoint."""
        return self.endpoint.ref
