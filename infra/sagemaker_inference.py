"""The GPU tier: one SageMaker endpoint per GPU instance type, and every heavy model on it as
an inference component that scales to zero copies.

    GpuEndpoint (one per instance type)          GpuModelComponent (one per GPU-tier model)
    ├── execution role (ExecutionRoleArn)         ├── execution role: pulls the image, reads its
    ├── EndpointConfig: one AllTraffic variant    │   model version, writes its logs
    │   without a model, managed instance         ├── Model: the GPU server image and the model's
    │   scaling (min may be 0), routing           │   own environment (TIERSERVE_MODELS, S3)
    ├── Endpoint tierserve-{family}-{size}        ├── InferenceComponent: accelerators, memory and
    └── log group /aws/sagemaker/Endpoints/...    │   CPU cores from the manifest, startup timeout,
                                                  │   a first copy count (SageMaker refuses 0)
                                                  ├── log group /aws/sagemaker/InferenceComponents/...
                                                  └── copy autoscaling, min copies may be 0:
                                                      target tracking on invocations per copy;
                                                      +1 copy when a request finds none
                                                      (NoCapacityInvocationFailures alarm, the
                                                      step policy SageMaker documents); back to
                                                      the minimum after an idle period

Each model keeps its own SageMaker Model and role, so a model's container can read its own
version's objects and nothing else, as in the Lambda tier; the endpoint's role (which
SageMaker requires once the endpoint hosts components) pulls the image and writes the
endpoint's logs, and reads no model. The server fetches its model from the model bucket by
its manifest: no ``ModelDataUrl``, and a new version is a new Model that the component rolls
onto (its ``Specification`` changes in place).

Volume encryption: a customer-managed KMS key (rotated yearly) on the endpoint's EBS volume,
except on instance types with local NVMe storage (g4dn, g5, g6, p4d, ...), which SageMaker
encrypts in hardware and for which it refuses a ``KmsKeyId`` (CreateEndpointConfig fails):
:func:`needs_volume_key` says which.

What synth cannot know, and docs/gpu-tier.md ("Deploying the GPU tier") spells out: a
component is created with at least one copy, so a deploy runs a GPU until the idle period
passes; ``MinInstanceCount: 0`` is refused in some regions (``gpu_min_instances``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from aws_cdk import Duration, IgnoreMode, RemovalPolicy, Stack
from aws_cdk import aws_applicationautoscaling as appscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

from infra.gpu_instances import ComputeRequirements, has_instance_storage
from infra.nag import acknowledge
from infra.tierserve_function import REPO_ROOT, dockerignore_patterns, model_environment
from infra.trust import service_principal
from tierserve.catalog import Manifest
from tierserve.settings import (
    MAX_BATCH_SIZE_ENV,
    MAX_QUEUE_DELAY_MS_ENV,
    SAGEMAKER_NAME_MAX,
    GpuTarget,
)

GPU_DOCKERFILE = "functions/gpu_server/Dockerfile"
# Docker (BuildKit) reads ``<Dockerfile>.dockerignore``; the asset passes the same patterns.
GPU_DOCKERIGNORE = "functions/gpu_server/Dockerfile.dockerignore"

NAME_PREFIX = "tierserve"
VARIANT_NAME = "AllTraffic"
MANAGED_SCALING_ENABLED = "ENABLED"
COPY_DIMENSION = "sagemaker:inference-component:DesiredCopyCount"
# Application Auto Scaling acts on SageMaker through this service-linked role (it creates it
# on first use); its policy covers inference components (UpdateInferenceComponentRuntimeConfig).
AUTOSCALING_SERVICE_LINKED_ROLE = (
    "aws-service-role/sagemaker.application-autoscaling.amazonaws.com/"
    "AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint"
)
# SageMaker's per-component metrics, 1-minute datapoints.
SAGEMAKER_NAMESPACE = "AWS/SageMaker"
COMPONENT_DIMENSION = "InferenceComponentName"
NO_CAPACITY_METRIC = "NoCapacityInvocationFailures"
INVOCATIONS_METRIC = "Invocations"
INVOCATIONS_PER_COPY_METRIC = "InvocationsPerCopy"
METRIC_PERIOD = Duration.minutes(1)
# SageMaker sends an endpoint's logs to /aws/sagemaker/Endpoints/{endpoint} and a component's
# containers' to /aws/sagemaker/InferenceComponents/{component}; the server's metrics are EMF
# lines there, extracted into METRICS_NAMESPACE by CloudWatch Logs.
ENDPOINT_LOG_GROUP_PREFIX = "/aws/sagemaker/Endpoints"
COMPONENT_LOG_GROUP_PREFIX = "/aws/sagemaker/InferenceComponents"
LOG_WRITE_ACTIONS = (
    "logs:CreateLogGroup",
    "logs:CreateLogStream",
    "logs:DescribeLogStreams",
    "logs:PutLogEvents",
)


def sagemaker_name(*parts: str, prefix: str = NAME_PREFIX) -> str:
    """A deterministic SageMaker resource name, ``{prefix}-{part}-...``: names over 63
    characters keep their start and end in a short digest of the parts, so two long names
    never collide. Example: ``sagemaker_name("big-llm", "g5-xlarge")`` is
    ``"tierserve-big-llm-g5-xlarge"``."""
    name = "-".join((prefix, *parts))
    if len(name) <= SAGEMAKER_NAME_MAX:
        return name
    digest = hashlib.sha256("/".join(parts).encode()).hexdigest()[:8]
    return f"{name[: SAGEMAKER_NAME_MAX - len(digest) - 1].rstrip('-')}-{digest}"


def instance_slug(instance_type: str) -> str:
    """``ml.g5.xlarge`` -> ``g5-xlarge``: an instance type as a name part."""
    return instance_type.removeprefix("ml.").replace(".", "-")


def endpoint_name_for(instance_type: str, *, prefix: str = NAME_PREFIX) -> str:
    """The endpoint that hosts the models on ``instance_type``: ``tierserve-g5-xlarge``."""
    return sagemaker_name(instance_slug(instance_type), prefix=prefix)


def component_name_for(model: str, instance_type: str, *, prefix: str = NAME_PREFIX) -> str:
    """Model ``model``'s inference component on ``instance_type``'s endpoint,
    ``tierserve-big-llm-g5-xlarge``: moving a model to another instance type gives it a new
    component (CloudFormation replaces it), never a clash of names."""
    return sagemaker_name(model, instance_slug(instance_type), prefix=prefix)


def endpoint_arn(scope: Construct, endpoint_name: str) -> str:
    """The ARN of endpoint ``endpoint_name`` in ``scope``'s account and region (IAM
    compares SageMaker ARNs in lowercase; tierserve's names already are)."""
    return Stack.of(scope).format_arn(service="sagemaker", resource="endpoint", resource_name=endpoint_name)


def component_arn(scope: Construct, component_name: str) -> str:
    """The ARN of inference component ``component_name`` in ``scope``'s account and region
    (``arn:…:sagemaker:{region}:{account}:inference-component/{name}``, the resource type IAM
    checks for ``sagemaker:InvokeEndpoint`` beside the endpoint)."""
    return Stack.of(scope).format_arn(
        service="sagemaker", resource="inference-component", resource_name=component_name
    )


def gpu_server_image(
    scope: Construct, construct_id: str = "GpuServerImage", *, root: Path = REPO_ROOT
) -> ecr_assets.DockerImageAsset:
    """The GPU server image (linux/amd64, CUDA), built from the repository root with the
    context narrowed by its ``Dockerfile.dockerignore``; one per stack, shared by every model."""
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


@dataclass(frozen=True)
class InstanceScaling:
    """An endpoint's instances: ``initial`` at creation, then SageMaker's managed instance
    scaling from ``minimum`` (0: none while no model has a copy) to ``maximum``."""

    initial: int
    minimum: int
    maximum: int


@dataclass(frozen=True)
class CopyScaling:
    """A model's copies: ``initial`` at creation (SageMaker refuses 0), then Application Auto
    Scaling from ``minimum`` (0: scale to zero) to ``maximum``: target tracking on
    ``invocations_per_copy`` (per minute) with its cooldowns, one more copy whenever a request
    finds none, and ``minimum`` after ``idle_minutes`` without any request."""

    initial: int
    minimum: int
    maximum: int
    invocations_per_copy: float
    scale_out_cooldown: Duration
    scale_in_cooldown: Duration
    idle_minutes: int


def _execution_role(scope: Construct, construct_id: str, description: str) -> iam.Role:
    """A role only SageMaker may assume, for this account's SageMaker resources (its
    confused-deputy guidance), that may pull ``image`` once granted."""
    role = iam.Role(
        scope,
        construct_id,
        assumed_by=service_principal(
            scope,
            "sagemaker.amazonaws.com",
            source_arn=Stack.of(scope).format_arn(service="sagemaker", resource="*"),
        ),
        description=description,
    )
    acknowledge(
        role,
        "AwsSolutions-IAM5[Resource::*]",
        "ecr:GetAuthorizationToken (pulling the image) supports no resource-level permissions: "
        "Resource '*' is required, and the token only lets the role pull what ecr:BatchGetImage "
        "allows, the assets repository.",
    )
    return role


def _log_group(
    scope: Construct, construct_id: str, name: str, retention: logs.RetentionDays
) -> logs.LogGroup:
    # Created by us to set its retention; a retained named group would block a redeploy.
    return logs.LogGroup(
        scope, construct_id, log_group_name=name, retention=retention, removal_policy=RemovalPolicy.DESTROY
    )


class GpuEndpoint(Construct):
    """The SageMaker endpoint that hosts every GPU-tier model on ``instance_type``, as
    inference components (:class:`GpuModelComponent`); it holds no model itself.

    Attributes: ``instance_type``, ``endpoint_name`` (a plain string, known at synth),
    ``endpoint`` (the CfnEndpoint), ``endpoint_config``, ``role`` (the config's
    ``ExecutionRoleArn``), ``log_group``, ``image``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        instance_type: str,
        image: ecr_assets.DockerImageAsset,
        scaling: InstanceScaling,
        routing_strategy: str,
        volume_key: kms.IKey | None,
        log_retention: logs.RetentionDays,
        prefix: str = NAME_PREFIX,
    ) -> None:
        super().__init__(scope, construct_id)
        if volume_key is not None and has_instance_storage(instance_type):
            raise ValueError(
                f"{instance_type} has local NVMe storage, which SageMaker encrypts itself and for which "
                "it refuses a KMS key: pass volume_key=None (see needs_volume_key)"
            )
        self.instance_type = instance_type
        self.image = image
        self.log_retention = log_retention
        self.prefix = prefix
        self.endpoint_name = endpoint_name_for(instance_type, prefix=prefix)
        self.log_group = _log_group(
            self, "Logs", f"{ENDPOINT_LOG_GROUP_PREFIX}/{self.endpoint_name}", log_retention
        )
        self.role = _execution_role(
            self,
            "ExecutionRole",
            f"tierserve GPU endpoint {self.endpoint_name}: pulls the GPU server image, writes the "
            "endpoint's logs; reads no model",
        )
        image.repository.grant_pull(self.role)
        self.log_group.grant(self.role, *LOG_WRITE_ACTIONS)

        self.endpoint_config = sagemaker.CfnEndpointConfig(
            self,
            "Config",
            # Required once the endpoint hosts inference components.
            execution_role_arn=self.role.role_arn,
            production_variants=[
                sagemaker.CfnEndpointConfig.ProductionVariantProperty(
                    variant_name=VARIANT_NAME,
                    instance_type=instance_type,
                    initial_instance_count=scaling.initial,
                    managed_instance_scaling=sagemaker.CfnEndpointConfig.ManagedInstanceScalingProperty(
                        status=MANAGED_SCALING_ENABLED,
                        min_instance_count=scaling.minimum,
                        max_instance_count=scaling.maximum,
                    ),
                    routing_config=sagemaker.CfnEndpointConfig.RoutingConfigProperty(
                        routing_strategy=routing_strategy
                    ),
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
        self.endpoint.node.add_dependency(self.log_group, self.role)

    @property
    def endpoint_arn(self) -> str:
        """The endpoint's ARN as a token (``Ref``), so whoever uses it deploys after the endpoint."""
        return self.endpoint.ref


class GpuModelComponent(Construct):
    """One GPU-tier model on ``endpoint``: its SageMaker Model (the shared image, the model's
    own environment), its inference component and its copies' autoscaling.

    Attributes: ``manifest``, ``model_name``, ``component_name`` (a plain string, known at
    synth), ``target`` (the :class:`~tierserve.settings.GpuTarget` callers name), ``role``,
    ``model``, ``component``, ``log_group``, ``requirements``, ``scalable_target``,
    ``wake_alarm`` (NoCapacityInvocationFailures), ``idle_alarm``. The stack grants the read
    of the model version's objects (``ModelStore.grant_read_model(component.role, manifest)``).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        endpoint: GpuEndpoint,
        manifest: Manifest,
        requirements: ComputeRequirements,
        scaling: CopyScaling,
        startup_timeout: Duration,
        model_bucket_name: str,
        model_prefix: str,
        max_batch_size: int,
        max_queue_delay_ms: float,
        log_level: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.manifest = manifest
        self.model_name = manifest.name
        self.requirements = requirements
        self.component_name = component_name_for(
            manifest.name, endpoint.instance_type, prefix=endpoint.prefix
        )
        self.target = GpuTarget(endpoint.endpoint_name, self.component_name)
        self.log_group = _log_group(
            self, "Logs", f"{COMPONENT_LOG_GROUP_PREFIX}/{self.component_name}", endpoint.log_retention
        )
        self.role = _execution_role(
            self,
            "ExecutionRole",
            f"tierserve GPU model {manifest.name}: pulls its image, reads its model, writes its logs",
        )
        endpoint.image.repository.grant_pull(self.role)
        for group in (self.log_group, endpoint.log_group):
            group.grant(self.role, *LOG_WRITE_ACTIONS)
        self.log_group.grant(endpoint.role, *LOG_WRITE_ACTIONS)

        self.model = sagemaker.CfnModel(
            self,
            "Model",
            execution_role_arn=self.role.role_arn,
            primary_container=sagemaker.CfnModel.ContainerDefinitionProperty(
                image=endpoint.image.image_uri,
                mode="SingleModel",
                environment={
                    **model_environment(
                        models=[manifest],
                        model_bucket_name=model_bucket_name,
                        model_prefix=model_prefix,
                        log_level=log_level,
                    ),
                    MAX_BATCH_SIZE_ENV: str(max_batch_size),
                    MAX_QUEUE_DELAY_MS_ENV: f"{max_queue_delay_ms:g}",
                },
            ),
            # The server fetches its model from S3 (network isolation would cut it off).
            enable_network_isolation=False,
        )
        # CreateModel checks that the role may pull the image: the policy must exist first.
        self.model.node.add_dependency(self.role)

        timeout = int(startup_timeout.to_seconds())
        self.component = sagemaker.CfnInferenceComponent(
            self,
            "Component",
            inference_component_name=self.component_name,
            endpoint_name=endpoint.endpoint.attr_endpoint_name,
            variant_name=VARIANT_NAME,
            specification=sagemaker.CfnInferenceComponent.InferenceComponentSpecificationProperty(
                model_name=self.model.attr_model_name,
                compute_resource_requirements=(
                    sagemaker.CfnInferenceComponent.InferenceComponentComputeResourceRequirementsProperty(
                        number_of_accelerator_devices_required=requirements.accelerators,
                        min_memory_required_in_mb=requirements.memory_mb,
                        number_of_cpu_cores_required=requirements.cpu_cores,
                    )
                ),
                # /ping answers 503 until the model is fetched, verified, loaded and warmed up
                # (a TensorRT engine build included).
                startup_parameters=sagemaker.CfnInferenceComponent.InferenceComponentStartupParametersProperty(
                    container_startup_health_check_timeout_in_seconds=timeout,
                    model_data_download_timeout_in_seconds=timeout,
                ),
            ),
            # SageMaker refuses a component with 0 copies: it starts with some, and autoscaling
            # takes it down (docs/gpu-tier.md: a deploy runs a GPU for a while).
            runtime_config=sagemaker.CfnInferenceComponent.InferenceComponentRuntimeConfigProperty(
                copy_count=scaling.initial
            ),
        )
        self.component.node.add_dependency(self.log_group)
        self._autoscale(scaling)

    def add_environment(self, key: str, value: str) -> None:
        """One more variable for the model's container (capture, for drift: infra/drift.py)."""
        self.model.add_property_override(f"PrimaryContainer.Environment.{key}", value)

    @property
    def component_arn(self) -> str:
        """The component's ARN as a token, so whoever uses it deploys after the component."""
        return self.component.attr_inference_component_arn

    def _metric(self, name: str) -> cloudwatch.Metric:
        return cloudwatch.Metric(
            namespace=SAGEMAKER_NAMESPACE,
            metric_name=name,
            dimensions_map={COMPONENT_DIMENSION: self.component_name},
            statistic="Sum",
            period=METRIC_PERIOD,
        )

    def _autoscale(self, scaling: CopyScaling) -> None:
        self.scalable_target = appscaling.ScalableTarget(
            self,
            "Copies",
            service_namespace=appscaling.ServiceNamespace.SAGEMAKER,
            scalable_dimension=COPY_DIMENSION,
            resource_id=f"inference-component/{self.component_name}",
            min_capacity=scaling.minimum,
            max_capacity=scaling.maximum,
            role=iam.Role.from_role_arn(
                self,
                "AutoScalingRole",
                Stack.of(self).format_arn(
                    service="iam", region="", resource="role", resource_name=AUTOSCALING_SERVICE_LINKED_ROLE
                ),
                mutable=False,
            ),
        )
        self.scalable_target.node.add_dependency(self.component)
        # Between one copy and the maximum. It cannot leave zero copies (no copy, no ratio).
        self.scalable_target.scale_to_track_metric(
            "InvocationsPerCopy",
            target_value=scaling.invocations_per_copy,
            predefined_metric=appscaling.PredefinedMetric.SAGEMAKER_INFERENCE_COMPONENT_INVOCATIONS_PER_COPY,
            scale_out_cooldown=scaling.scale_out_cooldown,
            scale_in_cooldown=scaling.scale_in_cooldown,
        )
        self.wake_alarm = self._wake_from_zero(scaling)
        self.idle_alarm = self._back_to_minimum_when_idle(scaling)

    def _wake_from_zero(self, scaling: CopyScaling) -> cloudwatch.Alarm:
        """SageMaker's documented path out of zero: a request that finds no copy is counted in
        NoCapacityInvocationFailures, whose alarm adds a copy."""
        wake = appscaling.StepScalingAction(
            self,
            "WakeFromZero",
            scaling_target=self.scalable_target,
            adjustment_type=appscaling.AdjustmentType.CHANGE_IN_CAPACITY,
            metric_aggregation_type=appscaling.MetricAggregationType.MAXIMUM,
            cooldown=scaling.scale_out_cooldown,
        )
        wake.add_adjustment(adjustment=1, lower_bound=0)
        alarm = cloudwatch.Alarm(
            self,
            "NoCapacityAlarm",
            alarm_description=(
                f"tierserve: a request for model {self.model_name} found no copy running "
                f"({self.component_name}); adds one (scale out from zero)"
            ),
            metric=self._metric(NO_CAPACITY_METRIC),
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            evaluation_periods=1,
            datapoints_to_alarm=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm.add_alarm_action(cloudwatch_actions.ApplicationScalingAction(wake))
        return alarm

    def _back_to_minimum_when_idle(self, scaling: CopyScaling) -> cloudwatch.Alarm:
        """After ``idle_minutes`` with no request at all (none served, none refused for want of
        a copy), the minimum copy count. A refused request counts as activity, so a model that
        is waking up from zero is never sent back before the idle period has passed again."""
        rest = appscaling.StepScalingAction(
            self,
            "RestWhenIdle",
            scaling_target=self.scalable_target,
            adjustment_type=appscaling.AdjustmentType.EXACT_CAPACITY,
            cooldown=scaling.scale_in_cooldown,
        )
        rest.add_adjustment(adjustment=scaling.minimum, upper_bound=0)
        # Invocations and InvocationsPerCopy both count served requests: either one published
        # for the component is enough to see that it is busy.
        requests = cloudwatch.MathExpression(
            expression="FILL(served, 0) + FILL(perCopy, 0) + FILL(refused, 0)",
            using_metrics={
                "served": self._metric(INVOCATIONS_METRIC),
                "perCopy": self._metric(INVOCATIONS_PER_COPY_METRIC),
                "refused": self._metric(NO_CAPACITY_METRIC),
            },
            label="requests, served or refused",
            period=METRIC_PERIOD,
        )
        alarm = cloudwatch.Alarm(
            self,
            "IdleAlarm",
            alarm_description=(
                f"tierserve: no request for model {self.model_name} for {scaling.idle_minutes} minutes; "
                f"sets its copies to {scaling.minimum} (scale in when idle)"
            ),
            metric=requests,
            threshold=0,
            comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_OR_EQUAL_TO_THRESHOLD,
            evaluation_periods=scaling.idle_minutes,
            datapoints_to_alarm=scaling.idle_minutes,
            # No datapoint at all is no request at all.
            treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
        )
        alarm.add_alarm_action(cloudwatch_actions.ApplicationScalingAction(rest))
        return alarm
