"""The GPU tier in a bare stack: one SageMaker endpoint per instance type, every heavy model on it
as an inference component whose copies scale to zero, least privilege."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_logs as logs

from infra.config import ConfigError
from infra.gpu_instances import (
    INSTANCE_SPECS,
    ComputeRequirements,
    check_fits,
    has_instance_storage,
    needs_volume_key,
)
from infra.model_store import grant_model_read
from infra.sagemaker_inference import (
    GPU_DOCKERFILE,
    CopyScaling,
    GpuEndpoint,
    GpuModelComponent,
    InstanceScaling,
    component_name_for,
    endpoint_name_for,
    gpu_server_image,
    gpu_volume_key,
)
from support.images import import_from_context
from tierserve.catalog import MB
from tierserve.settings import (
    COMPONENT_NAME_PATTERN,
    ENDPOINT_NAME_PATTERN,
    MAX_BATCH_SIZE_ENV,
    MAX_QUEUE_DELAY_MS_ENV,
    MODEL_BUCKET_ENV,
    MODEL_PREFIX_ENV,
    MODELS_ENV,
    GpuTarget,
)

BIG, SMALL = "big-llm", "tiny-on-gpu"
SCALING = CopyScaling(
    initial=1,
    minimum=0,
    maximum=3,
    invocations_per_copy=150,
    scale_out_cooldown=cdk.Duration.seconds(45),
    scale_in_cooldown=cdk.Duration.seconds(240),
    idle_minutes=7,
)
HEADROOM, BASE_MB, CORES = 1.5, 1024, 2


def requirements_of(manifest) -> ComputeRequirements:
    return ComputeRequirements.of(manifest, memory_headroom=HEADROOM, base_memory_mb=BASE_MB, cpu_cores=CORES)


def build(make_app, manifests, *, instance_type: str, name: str) -> cdk.Stack:
    stack = cdk.Stack(make_app(), name)
    endpoint = GpuEndpoint(
        stack,
        "Endpoint",
        instance_type=instance_type,
        image=gpu_server_image(stack),
        scaling=InstanceScaling(initial=1, minimum=0, maximum=3),
        routing_strategy="LEAST_OUTSTANDING_REQUESTS",
        volume_key=gpu_volume_key(stack) if needs_volume_key(instance_type) else None,
        log_retention=logs.RetentionDays.ONE_MONTH,
    )
    bucket = cdk.aws_s3.Bucket.from_bucket_name(stack, "Models", "models-bucket")
    for manifest in manifests:
        component = GpuModelComponent(
            stack,
            manifest.name,
            endpoint=endpoint,
            manifest=manifest,
            requirements=requirements_of(manifest),
            scaling=SCALING,
            startup_timeout=cdk.Duration.minutes(20),
            model_bucket_name="models-bucket",
            model_prefix="models",
            max_batch_size=16,
            max_queue_delay_ms=2.5,
            log_level="INFO",
        )
        grant_model_read(bucket, component.role, manifest)
    return stack


@pytest.fixture(scope="module")
def manifests(manifest_factory):
    return [manifest_factory(BIG, "7", 2048 * MB), manifest_factory(SMALL, "1", 2 * 1024, tier="gpu")]


@pytest.fixture(scope="module")
def g5_stack(make_app, manifests):
    return build(make_app, manifests, instance_type="ml.g5.xlarge", name="GpuG5")


@pytest.fixture(scope="module")
def g5(g5_stack, template_of):
    return template_of(g5_stack)


@pytest.fixture(scope="module")
def p3(make_app, manifests, template_of):
    return template_of(build(make_app, manifests[:1], instance_type="ml.p3.2xlarge", name="GpuP3"))


def by_type(template, resource_type: str) -> dict[str, dict[str, Any]]:
    return template.find_resources(resource_type)


def component(template, model: str) -> dict[str, Any]:
    (found,) = [
        c["Properties"]
        for c in by_type(template, "AWS::SageMaker::InferenceComponent").values()
        if c["Properties"]["InferenceComponentName"] == component_name_for(model, "ml.g5.xlarge")
    ]
    return found


def model_of(template, model: str) -> tuple[str, dict[str, Any]]:
    (found,) = [
        (logical_id, m["Properties"])
        for logical_id, m in by_type(template, "AWS::SageMaker::Model").items()
        if m["Properties"]["PrimaryContainer"]["Environment"][MODELS_ENV].startswith(f"{model}@")
    ]
    return found


# ---------------------------------------------------------------- one endpoint, a component per model


def test_one_endpoint_hosts_every_model_as_a_component(g5):
    (endpoint,) = by_type(g5, "AWS::SageMaker::Endpoint").values()
    assert (
        endpoint["Properties"]["EndpointName"] == "tierserve-g5-xlarge" == endpoint_name_for("ml.g5.xlarge")
    )
    assert len(by_type(g5, "AWS::SageMaker::EndpointConfig")) == 1
    components = by_type(g5, "AWS::SageMaker::InferenceComponent")
    assert sorted(c["Properties"]["InferenceComponentName"] for c in components.values()) == [
        "tierserve-big-llm-g5-xlarge",
        "tierserve-tiny-on-gpu-g5-xlarge",
    ]
    (endpoint_id,) = by_type(g5, "AWS::SageMaker::Endpoint")
    for c in components.values():
        assert c["Properties"]["EndpointName"] == {"Fn::GetAtt": [endpoint_id, "EndpointName"]}
        assert c["Properties"]["VariantName"] == "AllTraffic"
    assert len(by_type(g5, "AWS::SageMaker::Model")) == 2, "a Model (and role) per model"


def test_the_variant_holds_no_model_and_its_instances_scale_from_zero(g5):
    (config,) = by_type(g5, "AWS::SageMaker::EndpointConfig").values()
    (variant,) = config["Properties"]["ProductionVariants"]
    assert "ModelName" not in variant, "the models are components"
    assert variant["InstanceType"] == "ml.g5.xlarge"
    assert variant["InitialInstanceCount"] == 1
    assert variant["ManagedInstanceScaling"] == {
        "Status": "ENABLED",
        "MinInstanceCount": 0,
        "MaxInstanceCount": 3,
    }
    assert variant["RoutingConfig"] == {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"}
    assert "DataCaptureConfig" not in config["Properties"]
    assert "EndpointConfigName" not in config["Properties"], "immutable: generated name, replaced on change"


def test_the_endpoint_config_has_the_execution_role_components_need(g5):
    (config,) = by_type(g5, "AWS::SageMaker::EndpointConfig").values()
    role_id = config["Properties"]["ExecutionRoleArn"]["Fn::GetAtt"][0]
    role = by_type(g5, "AWS::IAM::Role")[role_id]["Properties"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {
        "Service": "sagemaker.amazonaws.com"
    }
    assert "endpoint tierserve-g5-xlarge" in role["Description"]


def test_a_component_asks_for_what_its_manifest_needs(g5, manifests):
    big = component(g5, BIG)
    requirements = big["Specification"]["ComputeResourceRequirements"]
    assert requirements == {
        "NumberOfAcceleratorDevicesRequired": 1,
        "MinMemoryRequiredInMb": math.ceil(BASE_MB + HEADROOM * 2048),
        "NumberOfCpuCoresRequired": CORES,
    }
    small = component(g5, SMALL)["Specification"]["ComputeResourceRequirements"]
    assert small["MinMemoryRequiredInMb"] == BASE_MB + 1, "the base, and the model's few KB rounded up"
    assert big["Specification"]["StartupParameters"] == {
        "ContainerStartupHealthCheckTimeoutInSeconds": 1200,
        "ModelDataDownloadTimeoutInSeconds": 1200,
    }
    assert big["RuntimeConfig"] == {"CopyCount": 1}, "SageMaker refuses 0 copies at creation"
    model_id, _ = model_of(g5, BIG)
    assert big["Specification"]["ModelName"] == {"Fn::GetAtt": [model_id, "ModelName"]}


def test_each_model_has_the_shared_image_and_its_own_environment(g5):
    images = set()
    for name, version in ((BIG, "7"), (SMALL, "1")):
        _, model = model_of(g5, name)
        container = model["PrimaryContainer"]
        env = container["Environment"]
        assert env[MODELS_ENV] == f"{name}@{version}"
        assert (env[MODEL_BUCKET_ENV], env[MODEL_PREFIX_ENV]) == ("models-bucket", "models")
        assert (env[MAX_BATCH_SIZE_ENV], env[MAX_QUEUE_DELAY_MS_ENV]) == ("16", "2.5")
        assert container["Mode"] == "SingleModel"
        assert "ModelDataUrl" not in container, "the server reads the model from S3 by its manifest"
        assert model["EnableNetworkIsolation"] is False
        images.add(json.dumps(container["Image"]))
    assert len(images) == 1, "one GPU server image for every model"


def test_a_manifest_may_ask_for_more_gpus_per_copy(manifest_factory):
    two = replace(manifest_factory(BIG, "7", 2048 * MB), extra={"gpu_accelerators": 2})
    assert requirements_of(two).accelerators == 2
    for bad in (0, 9, 1.5, "2", True):
        with pytest.raises(ConfigError, match=r"extra\.gpu_accelerators"):
            requirements_of(replace(two, extra={"gpu_accelerators": bad}))


@pytest.mark.parametrize(
    ("requirements", "instance_type", "keys"),
    [
        (ComputeRequirements(1, 17 * 1024, 1), "ml.g5.xlarge", ("gpu_memory_headroom", "gpu_instance_types")),
        (ComputeRequirements(2, 1024, 1), "ml.g5.2xlarge", ("extra.gpu_accelerators", "gpu_instance_type")),
        (ComputeRequirements(1, 1024, 8), "ml.g5.xlarge", ("gpu_cpu_cores_per_copy",)),
    ],
)
def test_a_copy_that_cannot_fit_its_instance_type_is_refused_at_synth(requirements, instance_type, keys):
    with pytest.raises(ConfigError) as raised:
        check_fits("big-llm", requirements, instance_type, max_copies=1, max_instances=1)
    assert all(key in str(raised.value) for key in keys)
    assert "big-llm" in str(raised.value) and instance_type in str(raised.value)


def test_more_copies_than_the_instances_hold_is_refused_and_unknown_types_are_not_checked():
    one_gpu = ComputeRequirements(1, 1024, 1)
    assert check_fits("m", one_gpu, "ml.g5.12xlarge", max_copies=8, max_instances=2) is True
    with pytest.raises(ConfigError, match=r"'gpu_max_copies'.*'gpu_max_instances'"):
        check_fits("m", one_gpu, "ml.g5.xlarge", max_copies=5, max_instances=4)
    assert (
        check_fits("m", ComputeRequirements(8, 10**6, 999), "ml.x9.huge", max_copies=1, max_instances=1)
        is False
    )


def test_the_instance_table_is_consistent():
    for instance_type, spec in INSTANCE_SPECS.items():
        assert re.fullmatch(r"ml\.[a-z0-9]+\.\d*x?large", instance_type), instance_type
        assert spec.gpus in (1, 4, 8) and spec.vcpus >= 4 and spec.memory_gib >= 16
    assert INSTANCE_SPECS["ml.g5.xlarge"].memory_mb == 16 * 1024


def test_names_are_deterministic_valid_and_distinct_when_long():
    long_a, long_b = "a" * 60 + "-one", "a" * 60 + "-two"
    names = {component_name_for(long_a, "ml.g5.xlarge"), component_name_for(long_b, "ml.g5.xlarge")}
    assert len(names) == 2
    for name in names:
        assert len(name) <= 63 and COMPONENT_NAME_PATTERN.match(name)
    assert component_name_for(long_a, "ml.g5.xlarge") == component_name_for(long_a, "ml.g5.xlarge")
    assert ENDPOINT_NAME_PATTERN.match(endpoint_name_for("ml.g6e.48xlarge"))
    assert component_name_for(BIG, "ml.g5.xlarge") != component_name_for(BIG, "ml.g6.xlarge"), (
        "a model moved to another type gets a new component, not a clash with its old name"
    )


def test_components_expose_the_target_callers_name(g5_stack):
    components = [c for c in g5_stack.node.children if isinstance(c, GpuModelComponent)]
    assert {c.model_name: c.target for c in components} == {
        BIG: GpuTarget("tierserve-g5-xlarge", "tierserve-big-llm-g5-xlarge"),
        SMALL: GpuTarget("tierserve-g5-xlarge", "tierserve-tiny-on-gpu-g5-xlarge"),
    }


# ---------------------------------------------------------------- copies scale to zero


def scaling_of(template, model: str) -> dict[str, Any]:
    """The scalable target, its policies and the alarms that drive them, for ``model``."""
    name = component_name_for(model, "ml.g5.xlarge")
    (target_id,) = [
        k
        for k, t in by_type(template, "AWS::ApplicationAutoScaling::ScalableTarget").items()
        if t["Properties"]["ResourceId"] == f"inference-component/{name}"
    ]
    policies = {
        k: p["Properties"]
        for k, p in by_type(template, "AWS::ApplicationAutoScaling::ScalingPolicy").items()
        if p["Properties"]["ScalingTargetId"] == {"Ref": target_id}
    }
    alarms = [
        a["Properties"]
        for a in by_type(template, "AWS::CloudWatch::Alarm").values()
        if name in json.dumps(a["Properties"].get("Dimensions", a["Properties"].get("Metrics")))
    ]
    return {"target_id": target_id, "policies": policies, "alarms": alarms}


def test_each_components_copies_are_a_scalable_target_down_to_zero(g5):
    for model in (BIG, SMALL):
        scaling = scaling_of(g5, model)
        target = by_type(g5, "AWS::ApplicationAutoScaling::ScalableTarget")[scaling["target_id"]]
        props = target["Properties"]
        assert (props["MinCapacity"], props["MaxCapacity"]) == (0, 3)
        assert props["ServiceNamespace"] == "sagemaker"
        assert props["ScalableDimension"] == "sagemaker:inference-component:DesiredCopyCount"
        assert "AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint" in json.dumps(props["RoleARN"])
        (component_id,) = [
            k
            for k, c in by_type(g5, "AWS::SageMaker::InferenceComponent").items()
            if c["Properties"]["InferenceComponentName"] == component_name_for(model, "ml.g5.xlarge")
        ]
        assert component_id in target["DependsOn"], "registered once the component exists"


def test_target_tracking_on_invocations_per_copy(g5):
    policies = scaling_of(g5, BIG)["policies"].values()
    (tracking,) = [
        p["TargetTrackingScalingPolicyConfiguration"]
        for p in policies
        if p["PolicyType"] == "TargetTrackingScaling"
    ]
    assert tracking == {
        "PredefinedMetricSpecification": {
            "PredefinedMetricType": "SageMakerInferenceComponentInvocationsPerCopy"
        },
        "TargetValue": 150,
        "ScaleOutCooldown": 45,
        "ScaleInCooldown": 240,
    }


def test_a_request_that_finds_no_copy_adds_one(g5):
    scaling = scaling_of(g5, BIG)
    (alarm,) = [a for a in scaling["alarms"] if a.get("MetricName") == "NoCapacityInvocationFailures"]
    assert alarm["Namespace"] == "AWS/SageMaker"
    assert alarm["Dimensions"] == [{"Name": "InferenceComponentName", "Value": "tierserve-big-llm-g5-xlarge"}]
    assert (alarm["Statistic"], alarm["Period"]) == ("Sum", 60)
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanOrEqualToThreshold", 1)
    assert (alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"]) == (1, 1)
    assert alarm["TreatMissingData"] == "notBreaching"
    (policy_ref,) = alarm["AlarmActions"]
    step = scaling["policies"][policy_ref["Ref"]]
    assert step["PolicyType"] == "StepScaling"
    assert step["StepScalingPolicyConfiguration"] == {
        "AdjustmentType": "ChangeInCapacity",
        "MetricAggregationType": "Maximum",
        "Cooldown": 45,
        "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}],
    }


def test_after_the_idle_period_without_any_request_copies_go_to_the_minimum(g5):
    scaling = scaling_of(g5, BIG)
    (alarm,) = [a for a in scaling["alarms"] if "Metrics" in a]
    (expression,) = [m for m in alarm["Metrics"] if "Expression" in m]
    assert expression["Expression"] == "FILL(served, 0) + FILL(perCopy, 0) + FILL(refused, 0)"
    metrics = {m["Id"]: m["MetricStat"] for m in alarm["Metrics"] if "MetricStat" in m}
    assert {k: m["Metric"]["MetricName"] for k, m in metrics.items()} == {
        "served": "Invocations",
        "perCopy": "InvocationsPerCopy",
        "refused": "NoCapacityInvocationFailures",
    }, "a request refused while waking up counts as activity: no scale-in in the middle of a wake"
    for stat in metrics.values():
        assert stat["Metric"]["Dimensions"] == [
            {"Name": "InferenceComponentName", "Value": "tierserve-big-llm-g5-xlarge"}
        ]
        assert (stat["Stat"], stat["Period"]) == ("Sum", 60)
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("LessThanOrEqualToThreshold", 0)
    assert (alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"]) == (7, 7), "the idle minutes"
    assert alarm["TreatMissingData"] == "breaching", "no datapoint is no request"
    (policy_ref,) = alarm["AlarmActions"]
    rest = scaling["policies"][policy_ref["Ref"]]["StepScalingPolicyConfiguration"]
    assert rest["AdjustmentType"] == "ExactCapacity"
    assert rest["StepAdjustments"] == [{"MetricIntervalUpperBound": 0, "ScalingAdjustment": 0}]


# ---------------------------------------------------------------- least privilege, logs, encryption


def _statements(template, role_id: str) -> list[dict]:
    return [
        s
        for p in by_type(template, "AWS::IAM::Policy").values()
        if {"Ref": role_id} in p["Properties"]["Roles"]
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]


def _actions(statement) -> list[str]:
    return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]


def _groups(template) -> dict[str, str]:
    return {g["Properties"]["LogGroupName"]: k for k, g in by_type(template, "AWS::Logs::LogGroup").items()}


SAGEMAKER_TRUST = {
    "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}},
    "ArnLike": {
        "aws:SourceArn": {
            "Fn::Join": [
                "",
                [
                    "arn:",
                    {"Ref": "AWS::Partition"},
                    ":sagemaker:",
                    {"Ref": "AWS::Region"},
                    ":",
                    {"Ref": "AWS::AccountId"},
                    ":*",
                ],
            ]
        }
    },
}


def test_every_role_is_sagemakers_for_this_accounts_resources_only(g5):
    roles = by_type(g5, "AWS::IAM::Role")
    assert len(roles) == 3, "the endpoint's and one per model"
    for role in roles.values():
        (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        assert trust["Principal"] == {"Service": "sagemaker.amazonaws.com"}
        assert trust["Condition"] == SAGEMAKER_TRUST
        assert "ManagedPolicyArns" not in role["Properties"]


def test_a_models_role_pulls_reads_its_model_and_writes_logs(g5):
    groups = _groups(g5)
    model_id, model = model_of(g5, BIG)
    role_id = model["ExecutionRoleArn"]["Fn::GetAtt"][0]
    by_action = {a: s for s in _statements(g5, role_id) for a in _actions(s)}
    assert set(by_action) == {
        "ecr:BatchCheckLayerAvailability",
        "ecr:BatchGetImage",
        "ecr:GetDownloadUrlForLayer",
        "ecr:GetAuthorizationToken",
        "logs:CreateLogGroup",
        "logs:CreateLogStream",
        "logs:DescribeLogStreams",
        "logs:PutLogEvents",
        "s3:GetObject",
        "s3:ListBucket",
    }, "no cloudwatch:PutMetricData: metrics are EMF in the logs, and SageMaker's namespace drives scaling"
    objects = [json.dumps(r) for r in by_action["s3:GetObject"]["Resource"]]
    assert [o.split("models-bucket/")[-1] for o in objects] == [
        'models/big-llm/7/manifest.json"]]}',
        'models/big-llm/7/model.onnx.zst"]]}',
    ], "the manifest and the artifact it names, nothing else"
    assert by_action["s3:ListBucket"]["Condition"] == {"StringLike": {"s3:prefix": ["models/big-llm/7/*"]}}
    assert sorted(r["Fn::GetAtt"][0] for r in by_action["logs:PutLogEvents"]["Resource"]) == sorted(
        [
            groups["/aws/sagemaker/InferenceComponents/tierserve-big-llm-g5-xlarge"],
            groups["/aws/sagemaker/Endpoints/tierserve-g5-xlarge"],
        ]
    ), "its component's group and its endpoint's, no other model's"
    (star,) = [s for s in _statements(g5, role_id) if s["Resource"] == "*"]
    assert _actions(star) == ["ecr:GetAuthorizationToken"], "the only statement on every resource"
    (policy_id,) = [
        k
        for k, p in by_type(g5, "AWS::IAM::Policy").items()
        if p["Properties"]["Roles"] == [{"Ref": role_id}]
    ]
    depends = by_type(g5, "AWS::SageMaker::Model")[model_id]["DependsOn"]
    assert policy_id in depends, "CreateModel checks the image pull: the Model waits for the role's policy"


def test_the_endpoints_role_reads_no_model(g5):
    (config,) = by_type(g5, "AWS::SageMaker::EndpointConfig").values()
    role_id = config["Properties"]["ExecutionRoleArn"]["Fn::GetAtt"][0]
    actions = {a for s in _statements(g5, role_id) for a in _actions(s)}
    assert not [a for a in actions if a.startswith("s3:")]
    assert "ecr:BatchGetImage" in actions and "logs:PutLogEvents" in actions


def test_logs_have_retention_and_resources_wait_for_their_groups(g5):
    groups = _groups(g5)
    assert set(groups) == {
        "/aws/sagemaker/Endpoints/tierserve-g5-xlarge",
        "/aws/sagemaker/InferenceComponents/tierserve-big-llm-g5-xlarge",
        "/aws/sagemaker/InferenceComponents/tierserve-tiny-on-gpu-g5-xlarge",
    }
    for group_id in groups.values():
        group = by_type(g5, "AWS::Logs::LogGroup")[group_id]
        assert group["Properties"]["RetentionInDays"] == 30
        assert group["DeletionPolicy"] == "Delete", "a retained named group would block a redeploy"
    (endpoint,) = by_type(g5, "AWS::SageMaker::Endpoint").values()
    assert groups["/aws/sagemaker/Endpoints/tierserve-g5-xlarge"] in endpoint["DependsOn"]
    for c in by_type(g5, "AWS::SageMaker::InferenceComponent").values():
        name = c["Properties"]["InferenceComponentName"]
        assert groups[f"/aws/sagemaker/InferenceComponents/{name}"] in c["DependsOn"]


@pytest.mark.parametrize(
    ("instance_type", "local"),
    [
        ("ml.g5.xlarge", True),
        ("ml.g4dn.xlarge", True),
        ("ml.g6e.2xlarge", True),
        ("ml.p4d.24xlarge", True),
        ("ml.m5d.large", True),
        ("ml.p3.2xlarge", False),
        ("ml.inf2.xlarge", False),
        ("ml.c5.xlarge", False),
    ],
)
def test_instance_storage_families(instance_type, local):
    assert has_instance_storage(instance_type) is local
    assert needs_volume_key(instance_type) is not local


def test_ebs_volumes_use_a_rotated_customer_managed_key(p3):
    (config,) = by_type(p3, "AWS::SageMaker::EndpointConfig").values()
    (key_id,) = p3.find_resources("AWS::KMS::Key", {"Properties": {"EnableKeyRotation": True}})
    assert config["Properties"]["KmsKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    (endpoint,) = by_type(p3, "AWS::SageMaker::Endpoint").values()
    assert endpoint["Properties"]["EndpointName"] == "tierserve-p3-2xlarge"


def test_no_key_where_sagemaker_refuses_one(g5, make_app):
    """Instance storage (g5) is encrypted in hardware; CreateEndpointConfig fails with a KmsKeyId."""
    (config,) = by_type(g5, "AWS::SageMaker::EndpointConfig").values()
    assert "KmsKeyId" not in config["Properties"]
    assert by_type(g5, "AWS::KMS::Key") == {}
    stack = cdk.Stack(make_app(), "Refused")
    with pytest.raises(ValueError, match="local NVMe storage"):
        GpuEndpoint(
            stack,
            "e",
            instance_type="ml.g5.xlarge",
            image=gpu_server_image(stack),
            scaling=InstanceScaling(1, 0, 1),
            routing_strategy="RANDOM",
            volume_key=gpu_volume_key(stack),
            log_retention=logs.RetentionDays.ONE_DAY,
        )


def test_image_is_the_gpu_server_built_for_amd64_from_a_narrow_context(g5_stack):
    assembly = g5_stack.node.root.synth()
    manifest = json.loads((Path(assembly.directory) / "GpuG5.assets.json").read_text())
    (image,) = manifest["dockerImages"].values()
    assert image["source"]["dockerFile"] == GPU_DOCKERFILE
    assert image["source"]["platform"] == "linux/amd64"
    asset_dir = Path(assembly.directory) / image["source"]["directory"]
    files = {p.relative_to(asset_dir).as_posix() for p in asset_dir.rglob("*") if p.is_file()}
    assert GPU_DOCKERFILE in files and "functions/gpu_server/server.py" in files
    assert "layers/tierserve/python/tierserve/sagemaker_hosting.py" in files
    assert not any(f.startswith("layers/tierserve/python/tierserve/tools/") for f in files)
    imported = import_from_context(asset_dir, "functions/gpu_server", ["server"])
    assert "tierserve.sagemaker_hosting" in imported["loaded"]
    assert not [m for m in imported["loaded"] if m.startswith("tierserve.tools")]
    assert all(f.startswith(str(asset_dir)) for f in imported["files"])
    outside = {f for f in files if not f.startswith(("layers/tierserve/python/", "functions/gpu_server/"))}
    assert outside == set()
