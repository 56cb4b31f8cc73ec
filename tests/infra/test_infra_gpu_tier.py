"""GpuModelEndpoint in a bare stack: one SageMaker endpoint per heavy model, least privilege."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aws_cdk as cdk
import pytest
from aws_cdk import aws_logs as logs

from infra.gpu_tier import (
    ENDPOINT_NAME_MAX,
    GPU_DOCKERFILE,
    GpuModelEndpoint,
    gpu_endpoint_name,
    gpu_server_image,
    gpu_volume_key,
    has_instance_storage,
    needs_volume_key,
)
from infra.model_store import grant_model_read
from support.images import import_from_context
from tierserve.catalog import MB
from tierserve.settings import (
    MAX_BATCH_SIZE_ENV,
    MAX_QUEUE_DELAY_MS_ENV,
    MODEL_BUCKET_ENV,
    MODEL_PREFIX_ENV,
    MODELS_ENV,
)

MODEL = "big-llm"


def build(make_app, manifest, *, instance_type: str, name: str) -> cdk.Stack:
    stack = cdk.Stack(make_app(), name)
    key = gpu_volume_key(stack) if needs_volume_key(instance_type) else None
    endpoint = GpuModelEndpoint(
        stack,
        manifest.name,
        manifest=manifest,
        image=gpu_server_image(stack),
        model_bucket_name="models-bucket",
        model_prefix="models",
        instance_type=instance_type,
        initial_instance_count=2,
        min_instances=2,
        max_instances=6,
        invocations_per_instance=150,
        max_batch_size=16,
        max_queue_delay_ms=2.5,
        volume_key=key,
        log_retention=logs.RetentionDays.ONE_MONTH,
        log_level="INFO",
    )
    bucket = cdk.aws_s3.Bucket.from_bucket_name(stack, "Models", "models-bucket")
    grant_model_read(bucket, endpoint.role, manifest)
    return stack


@pytest.fixture(scope="module")
def manifest(manifest_factory):
    return manifest_factory(MODEL, "7", 2048 * MB)


@pytest.fixture(scope="module")
def g5_stack(make_app, manifest):
    return build(make_app, manifest, instance_type="ml.g5.xlarge", name="GpuG5")


@pytest.fixture(scope="module")
def g5(g5_stack, template_of):
    return template_of(g5_stack)


@pytest.fixture(scope="module")
def p3(make_app, manifest, template_of):
    return template_of(build(make_app, manifest, instance_type="ml.p3.2xlarge", name="GpuP3"))


def test_one_model_config_and_endpoint(g5, find):
    for resource_type in (
        "AWS::SageMaker::Model",
        "AWS::SageMaker::EndpointConfig",
        "AWS::SageMaker::Endpoint",
    ):
        assert len(find(g5, resource_type)) == 1, resource_type


def test_endpoint_name_is_derived_from_the_model_name(g5, find):
    (endpoint,) = find(g5, "AWS::SageMaker::Endpoint")
    assert endpoint["Properties"]["EndpointName"] == "tierserve-big-llm" == gpu_endpoint_name(MODEL)
    (config,) = find(g5, "AWS::SageMaker::EndpointConfig")
    (model,) = find(g5, "AWS::SageMaker::Model")
    assert "EndpointConfigName" not in config["Properties"], "immutable: generated names, replaced on change"
    assert "ModelName" not in model["Properties"]


def test_long_model_names_keep_a_valid_unique_endpoint_name():
    long_a, long_b = "a" * 60 + "-one", "a" * 60 + "-two"
    names = {gpu_endpoint_name(long_a), gpu_endpoint_name(long_b)}
    assert len(names) == 2
    for name in names:
        assert len(name) <= ENDPOINT_NAME_MAX
        assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name)
    assert gpu_endpoint_name(long_a) == gpu_endpoint_name(long_a), "deterministic"


def test_instance_type_and_count_and_one_variant(g5, find):
    (config,) = find(g5, "AWS::SageMaker::EndpointConfig")
    (variant,) = config["Properties"]["ProductionVariants"]
    assert variant["InstanceType"] == "ml.g5.xlarge"
    assert variant["InitialInstanceCount"] == 2
    assert variant["VariantName"] == "AllTraffic"
    assert "DataCaptureConfig" not in config["Properties"]


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


def test_ebs_volumes_use_a_rotated_customer_managed_key(p3, find):
    (config,) = find(p3, "AWS::SageMaker::EndpointConfig")
    (key_id,) = p3.find_resources("AWS::KMS::Key", {"Properties": {"EnableKeyRotation": True}})
    assert config["Properties"]["KmsKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}


def test_no_key_where_sagemaker_refuses_one(g5, find, make_app, manifest):
    """Instance storage (g5) is encrypted in hardware; CreateEndpointConfig fails with a KmsKeyId."""
    (config,) = find(g5, "AWS::SageMaker::EndpointConfig")
    assert "KmsKeyId" not in config["Properties"]
    assert find(g5, "AWS::KMS::Key") == []
    stack = cdk.Stack(make_app(), "Refused")
    with pytest.raises(ValueError, match="local NVMe storage"):
        GpuModelEndpoint(
            stack,
            "m",
            manifest=manifest,
            image=gpu_server_image(stack),
            model_bucket_name="b",
            model_prefix="models",
            instance_type="ml.g5.xlarge",
            initial_instance_count=1,
            min_instances=1,
            max_instances=1,
            invocations_per_instance=1,
            max_batch_size=1,
            max_queue_delay_ms=0,
            volume_key=gpu_volume_key(stack),
            log_retention=logs.RetentionDays.ONE_DAY,
            log_level="INFO",
        )


def test_container_environment(g5, find):
    (model,) = find(g5, "AWS::SageMaker::Model")
    container = model["Properties"]["PrimaryContainer"]
    env = container["Environment"]
    assert env[MODEL_BUCKET_ENV] == "models-bucket"
    assert env[MODEL_PREFIX_ENV] == "models"
    assert env[MODELS_ENV] == "big-llm@7"
    assert env[MAX_BATCH_SIZE_ENV] == "16"
    assert env[MAX_QUEUE_DELAY_MS_ENV] == "2.5"
    assert container["Mode"] == "SingleModel"
    assert "ModelDataUrl" not in container, "the server reads the model from S3 by its manifest"
    assert model["Properties"]["EnableNetworkIsolation"] is False


def test_autoscaling_tracks_invocations_per_instance(g5, find):
    (target,) = find(g5, "AWS::ApplicationAutoScaling::ScalableTarget")
    props = target["Properties"]
    assert (props["MinCapacity"], props["MaxCapacity"]) == (2, 6)
    assert props["ServiceNamespace"] == "sagemaker"
    assert props["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    (endpoint_id,) = g5.find_resources("AWS::SageMaker::Endpoint")
    assert props["ResourceId"] == {
        "Fn::Join": ["", ["endpoint/", {"Fn::GetAtt": [endpoint_id, "EndpointName"]}, "/variant/AllTraffic"]]
    }
    assert "AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint" in json.dumps(props["RoleARN"])
    (policy,) = find(g5, "AWS::ApplicationAutoScaling::ScalingPolicy")
    tracking = policy["Properties"]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 150
    assert tracking["PredefinedMetricSpecification"] == {
        "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
    }


def _statements(template) -> list[dict]:
    return [
        s
        for p in template.find_resources("AWS::IAM::Policy").values()
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]


def _actions(statement) -> list[str]:
    return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]


def test_execution_role_is_sagemakers_for_this_accounts_resources_only(g5, find):
    (role,) = find(g5, "AWS::IAM::Role")
    (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    assert trust["Action"] == "sts:AssumeRole"
    assert trust["Condition"] == {
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


def test_execution_role_pulls_reads_its_model_and_logs(g5, find):
    (role,) = find(g5, "AWS::IAM::Role")
    assert "ManagedPolicyArns" not in role["Properties"]
    by_action = {a: s for s in _statements(g5) for a in _actions(s)}
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
    assert "container-assets" in json.dumps(by_action["ecr:BatchGetImage"]["Resource"])
    objects = [json.dumps(r) for r in by_action["s3:GetObject"]["Resource"]]
    assert [o.split("models-bucket/")[-1] for o in objects] == [
        'models/big-llm/7/manifest.json"]]}',
        'models/big-llm/7/model.onnx.zst"]]}',
    ], "the manifest and the artifact it names, nothing else"
    assert by_action["s3:ListBucket"]["Condition"] == {"StringLike": {"s3:prefix": ["models/big-llm/7/*"]}}
    (group_id,) = g5.find_resources("AWS::Logs::LogGroup")
    assert by_action["logs:PutLogEvents"]["Resource"] == {"Fn::GetAtt": [group_id, "Arn"]}
    (star,) = [s for s in _statements(g5) if s["Resource"] == "*"]
    assert _actions(star) == ["ecr:GetAuthorizationToken"], "the only statement on every resource"


def test_endpoint_logs_have_retention_and_the_endpoint_waits_for_them(g5):
    (group_id, group), *_ = g5.find_resources("AWS::Logs::LogGroup").items()
    assert group["Properties"]["LogGroupName"] == "/aws/sagemaker/Endpoints/tierserve-big-llm"
    assert group["Properties"]["RetentionInDays"] == 30
    (endpoint,) = g5.find_resources("AWS::SageMaker::Endpoint").values()
    assert group_id in endpoint["DependsOn"]


def test_model_waits_for_the_image_pull_policy(g5):
    (model,) = g5.find_resources("AWS::SageMaker::Model").values()
    (policy_id,) = g5.find_resources("AWS::IAM::Policy")
    assert policy_id in model["DependsOn"]


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
