"""The real app: every stack from a catalog, cdk-nag clean, per-model grants, deterministic."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_s3 as s3
from cdk_nag import AwsSolutionsChecks

from infra.config import ConfigError, InfraConfig
from infra.nag import acknowledge, add_aws_solutions_checks
from infra.sagemaker_inference import component_name_for, endpoint_name_for
from infra.stacks import BATCH_STACK, PIPELINE_STACK, SERVING_STACK, STORAGE_STACK, build_stacks
from tierserve.catalog import lambda_memory_mb
from tierserve.settings import GPU_ENDPOINTS_ENV, MODEL_BUCKET_ENV, MODELS_ENV, GpuTarget

LAMBDA_MODELS = ("iris", "resnet-50")
GPU_MODELS = ("big-llm", "tiny-on-gpu")


def build_app(make_app, catalog, *, validate: bool, nag: bool, **context: Any) -> cdk.App:
    app = make_app(validate=validate, **context)
    build_stacks(app, config=InfraConfig.from_context(app.node.try_get_context), catalog=catalog)
    if nag:
        add_aws_solutions_checks(app)
    return app


def synth_app(make_app, catalog, *, validate: bool, nag: bool, **context: Any):
    return build_app(make_app, catalog, validate=validate, nag=nag, **context).synth()


@pytest.fixture(scope="module")
def nagged_app(make_app, catalog) -> cdk.App:
    """The app exactly as `cdk synth` builds it: cdk-nag and CloudFormation validation on."""
    return build_app(make_app, catalog, validate=True, nag=True)


@pytest.fixture(scope="module")
def assembly(nagged_app):
    """``nagged_app`` synthesized: a cdk-nag error (or warning) fails this synth with the
    report in the exception."""
    return nagged_app.synth()


@pytest.fixture(scope="module")
def serving(assembly) -> dict[str, Any]:
    return assembly.get_stack_by_name(SERVING_STACK).template


@pytest.fixture(scope="module")
def storage(assembly) -> dict[str, Any]:
    return assembly.get_stack_by_name(STORAGE_STACK).template


@pytest.fixture(scope="module")
def pipeline(assembly) -> dict[str, Any]:
    return assembly.get_stack_by_name(PIPELINE_STACK).template


def of_type(template: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == resource_type}


def functions_by_model(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The API function of each model (the jobs function, which names every model, aside)."""
    functions = of_type(template, "AWS::Lambda::Function")
    return {
        f["Properties"]["Environment"]["Variables"][MODELS_ENV].split("@")[0]: f
        for f in functions.values()
        if f["Properties"].get("ImageConfig", {}).get("Command") != ["jobs.handler"]
    }


def components_by_model(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    components = of_type(template, "AWS::SageMaker::InferenceComponent")
    models = of_type(template, "AWS::SageMaker::Model")
    by_model = {}
    for component in components.values():
        model_id = component["Properties"]["Specification"]["ModelName"]["Fn::GetAtt"][0]
        env = models[model_id]["Properties"]["PrimaryContainer"]["Environment"]
        by_model[env[MODELS_ENV].split("@")[0]] = component
    return by_model


def test_one_sagemaker_endpoint_per_instance_type_hosts_every_gpu_tier_model(serving):
    endpoints = of_type(serving, "AWS::SageMaker::Endpoint")
    assert [e["Properties"]["EndpointName"] for e in endpoints.values()] == [
        endpoint_name_for("ml.g5.xlarge")
    ]
    assert len(of_type(serving, "AWS::SageMaker::EndpointConfig")) == 1
    components = components_by_model(serving)
    assert sorted(components) == sorted(GPU_MODELS), "a component per GPU-tier model, none for Lambda's"
    for name, component in components.items():
        assert component["Properties"]["InferenceComponentName"] == component_name_for(name, "ml.g5.xlarge")
    targets = of_type(serving, "AWS::ApplicationAutoScaling::ScalableTarget")
    assert sorted(t["Properties"]["ResourceId"] for t in targets.values()) == sorted(
        f"inference-component/{component_name_for(name, 'ml.g5.xlarge')}" for name in GPU_MODELS
    )
    assert all(t["Properties"]["MinCapacity"] == 0 for t in targets.values()), "every model scales to zero"
    policies = [
        p["Properties"]["PolicyType"]
        for p in of_type(serving, "AWS::ApplicationAutoScaling::ScalingPolicy").values()
    ]
    assert sorted(policies) == sorted(
        ["TargetTrackingScaling", "StepScaling", "StepScaling"] * len(GPU_MODELS)
    )
    # The wake-from-zero alarms (scaling actions); Monitoring's no-capacity alarms are named.
    alarms = of_type(serving, "AWS::CloudWatch::Alarm")
    assert sum(
        a["Properties"].get("MetricName") == "NoCapacityInvocationFailures"
        and "AlarmName" not in a["Properties"]
        for a in alarms.values()
    ) == len(GPU_MODELS)
    (config,) = of_type(serving, "AWS::SageMaker::EndpointConfig").values()
    (variant,) = config["Properties"]["ProductionVariants"]
    assert variant["ManagedInstanceScaling"] == {
        "Status": "ENABLED",
        "MinInstanceCount": 0,
        "MaxInstanceCount": 4,
    }
    assert "ExecutionRoleArn" in config["Properties"]


def test_gpu_scaling_comes_from_context(make_app, catalog):
    assembly = synth_app(
        make_app,
        catalog,
        validate=False,
        nag=False,
        gpu_instance_type="ml.p3.2xlarge",
        gpu_initial_instance_count="2",
        gpu_min_instances="1",
        gpu_max_instances="8",
        gpu_min_copies="1",
        gpu_initial_copies="2",
        gpu_max_copies="6",
        gpu_invocations_per_copy="75",
        gpu_scale_in_idle_minutes="5",
        gpu_cpu_cores_per_copy="2",
        gpu_memory_headroom="2",
        gpu_base_memory_mb="512",
        gpu_startup_timeout_seconds="1800",
        gpu_routing_strategy="RANDOM",
    )
    template = assembly.get_stack_by_name(SERVING_STACK).template
    # The volume key (the alarm topic has its own, Monitoring's).
    (key_id,) = [k for k in of_type(template, "AWS::KMS::Key") if not k.startswith("MonitoringAlarms")]
    (config,) = of_type(template, "AWS::SageMaker::EndpointConfig").values()
    (variant,) = config["Properties"]["ProductionVariants"]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.p3.2xlarge", 2)
    assert variant["ManagedInstanceScaling"] == {
        "Status": "ENABLED",
        "MinInstanceCount": 1,
        "MaxInstanceCount": 8,
    }
    assert variant["RoutingConfig"] == {"RoutingStrategy": "RANDOM"}
    assert config["Properties"]["KmsKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    big = components_by_model(template)["big-llm"]["Properties"]
    assert big["RuntimeConfig"] == {"CopyCount": 2}
    assert big["Specification"]["ComputeResourceRequirements"] == {
        "NumberOfAcceleratorDevicesRequired": 1,
        "MinMemoryRequiredInMb": 512 + 2 * 2048,
        "NumberOfCpuCoresRequired": 2,
    }
    assert big["Specification"]["StartupParameters"]["ContainerStartupHealthCheckTimeoutInSeconds"] == 1800
    for target in of_type(template, "AWS::ApplicationAutoScaling::ScalableTarget").values():
        assert (target["Properties"]["MinCapacity"], target["Properties"]["MaxCapacity"]) == (1, 6)
    for policy in of_type(template, "AWS::ApplicationAutoScaling::ScalingPolicy").values():
        if policy["Properties"]["PolicyType"] == "TargetTrackingScaling":
            assert policy["Properties"]["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 75
    idle = [
        a["Properties"]
        for a in of_type(template, "AWS::CloudWatch::Alarm").values()
        if "Metrics" in a["Properties"] and "AlarmName" not in a["Properties"]  # not Monitoring's
    ]
    assert [a["EvaluationPeriods"] for a in idle] == [5] * len(GPU_MODELS)


def test_each_instance_type_gets_its_own_endpoint(make_app, catalog):
    assembly = synth_app(
        make_app, catalog, validate=False, nag=True, gpu_instance_types={"tiny-on-gpu": "ml.g6.xlarge"}
    )
    template = assembly.get_stack_by_name(SERVING_STACK).template
    names = sorted(
        e["Properties"]["EndpointName"] for e in of_type(template, "AWS::SageMaker::Endpoint").values()
    )
    assert names == ["tierserve-g5-xlarge", "tierserve-g6-xlarge"]
    endpoints = {
        k: e["Properties"]["EndpointName"] for k, e in of_type(template, "AWS::SageMaker::Endpoint").items()
    }
    placed = {
        name: endpoints[c["Properties"]["EndpointName"]["Fn::GetAtt"][0]]
        for name, c in components_by_model(template).items()
    }
    assert placed == {"big-llm": "tierserve-g5-xlarge", "tiny-on-gpu": "tierserve-g6-xlarge"}
    pipeline = assembly.get_stack_by_name(PIPELINE_STACK).template
    (worker,) = [
        f
        for f in of_type(pipeline, "AWS::Lambda::Function").values()
        if f["Properties"].get("PackageType") == "Image"
    ]
    assert worker["Properties"]["Environment"]["Variables"][GPU_ENDPOINTS_ENV] == (
        "big-llm=tierserve-g5-xlarge/tierserve-big-llm-g5-xlarge,"
        "tiny-on-gpu=tierserve-g6-xlarge/tierserve-tiny-on-gpu-g6-xlarge"
    )


@pytest.mark.parametrize(
    ("context", "fragments"),
    [
        ({"gpu_instance_types": "iris=ml.g5.xlarge"}, ("'gpu_instance_types'", "iris", "GPU tier")),
        ({"gpu_memory_headroom": "10"}, ("big-llm", "ml.g5.xlarge", "'gpu_memory_headroom'")),
        ({"gpu_max_copies": "5"}, ("'gpu_max_copies'", "'gpu_max_instances'")),
    ],
)
def test_gpu_combinations_that_cannot_deploy_stop_synth_naming_the_keys(
    app_main, make_app, catalog, tmp_path, context, fragments
):
    """Checked against the catalog, so at synth (app.py), with the one-line message."""
    catalog.save(tmp_path / "catalog.json")
    with pytest.raises(SystemExit) as raised:
        app_main(make_app(catalog=str(tmp_path / "catalog.json"), **context))
    message = str(raised.value.code)
    assert message.startswith("tierserve: ")
    assert all(fragment in message for fragment in fragments), message


def test_default_gpu_instances_have_hardware_encrypted_storage_and_no_key(serving):
    for config in of_type(serving, "AWS::SageMaker::EndpointConfig").values():
        (variant,) = config["Properties"]["ProductionVariants"]
        assert variant["InstanceType"] == "ml.g5.xlarge"
        assert "KmsKeyId" not in config["Properties"]


def test_gpu_infer_routes_invoke_their_own_component_only(serving):
    (endpoint_id,) = of_type(serving, "AWS::SageMaker::Endpoint")
    components = {
        c["Properties"]["InferenceComponentName"]: k
        for k, c in of_type(serving, "AWS::SageMaker::InferenceComponent").items()
    }
    roles = of_type(serving, "AWS::IAM::Role")
    methods = [
        m["Properties"]
        for m in of_type(serving, "AWS::ApiGateway::Method").values()
        if m["Properties"]["Integration"]["Type"] == "AWS"
    ]
    assert len(methods) == 2 * len(GPU_MODELS), "infer and versions/{v}/infer per model"
    for props in methods:
        uri = json.dumps(props["Integration"]["Uri"])
        assert ":runtime.sagemaker:path/endpoints/tierserve-g5-xlarge/invocations" in uri
        header = props["Integration"]["RequestParameters"][
            "integration.request.header.X-Amzn-SageMaker-Inference-Component"
        ]
        component_id = components[header.strip("'")]
        role = roles[props["Integration"]["Credentials"]["Fn::GetAtt"][0]]["Properties"]
        (policy,) = role["Policies"]
        (statement,) = policy["PolicyDocument"]["Statement"]
        assert statement == {
            "Action": "sagemaker:InvokeEndpoint",
            "Effect": "Allow",
            "Resource": [{"Fn::GetAtt": [component_id, "InferenceComponentArn"]}, {"Ref": endpoint_id}],
        }


def test_gpu_models_read_only_their_own_model_version(serving, catalog):
    models = of_type(serving, "AWS::SageMaker::Model")
    for model in models.values():
        name, version = model["Properties"]["PrimaryContainer"]["Environment"][MODELS_ENV].split("@")
        role_id = model["Properties"]["ExecutionRoleArn"]["Fn::GetAtt"][0]
        statements = [
            s
            for p in of_type(serving, "AWS::IAM::Policy").values()
            if {"Ref": role_id} in p["Properties"]["Roles"]
            for s in p["Properties"]["PolicyDocument"]["Statement"]
        ]
        s3 = json.dumps([s for s in statements if any(a.startswith("s3:") for a in _actions(s))])
        artifact = catalog.get(name).manifest.artifact
        assert (
            f"/models/{name}/{version}/manifest.json" in s3 and f"/models/{name}/{version}/{artifact}" in s3
        )
        assert s3.count("/models/") == 2 and s3.count('"models/') == 1, "two objects, one listing"
        assert not any(f"/models/{other}/" in s3 for other in (*LAMBDA_MODELS, *GPU_MODELS) if other != name)


def test_cdk_nag_reports_nothing_unacknowledged(nagged_app, assembly):
    # The pack's own report on the synthesized app: it exists even when clean (CDK leaves a
    # plugin with nothing to say out of validation-report.json).
    nag = AwsSolutionsChecks(nagged_app).validate_scope(nagged_app)
    assert nag.success is True and nag.violations == []
    report = json.loads((Path(assembly.directory) / "validation-report.json").read_text())
    # Construct annotations land in the report too (@aws-cdk/core:annotationsInValidationReport):
    # the only one by default is ours, the alarms nobody hears (alarm_email is empty).
    plugins = {p["pluginName"]: p for p in report["pluginReports"]}
    assert set(plugins) == {"Construct Annotations"}, report
    annotations = plugins["Construct Annotations"]
    assert annotations["conclusion"] == "success"
    assert [(v["ruleName"], v["severity"]) for v in annotations["violations"]] == [
        ("Annotation::tierserve:alarmsWithoutRecipient", "warning")
    ]


def test_with_alarm_email_the_validation_report_is_empty(make_app, catalog):
    assembly = synth_app(make_app, catalog, validate=False, nag=True, alarm_email="ops@example.com")
    report = Path(assembly.directory) / "validation-report.json"
    assert not report.exists() or json.loads(report.read_text())["pluginReports"] == []


def test_the_nag_harness_fails_on_a_violation(make_app):
    """Guards the test above: an unacknowledged finding must fail synth here too, and the
    pack's own report on the app must list it."""
    app = make_app()
    s3.Bucket(cdk.Stack(app, "Careless"), "Bucket")
    nag = AwsSolutionsChecks(app).validate_scope(app)
    assert nag.success is False and "AwsSolutions-S10" in {v.rule_name for v in nag.violations}
    add_aws_solutions_checks(app)
    with pytest.raises(Exception, match="AwsSolutions-S10"):
        app.synth()


def test_acknowledgments_need_a_real_reason(make_app):
    with pytest.raises(ValueError, match="real reason"):
        acknowledge(cdk.Stack(make_app(), "Lazy"), "AwsSolutions-S1", "not needed")


def test_one_function_per_lambda_tier_model_and_none_for_gpu_models(serving, catalog):
    functions = functions_by_model(serving)
    assert sorted(functions) == sorted(LAMBDA_MODELS)
    for name, function in functions.items():
        manifest = catalog.get(name).manifest
        props = function["Properties"]
        assert props["MemorySize"] == lambda_memory_mb(manifest)
        assert props["Environment"]["Variables"][MODELS_ENV] == f"{manifest.name}@{manifest.version}"
    memory = {functions[name]["Properties"]["MemorySize"] for name in LAMBDA_MODELS}
    assert len(memory) == 2, "the fixture's two models are sized apart"
    assert not set(GPU_MODELS) & set(functions)


def policy_statements_of(template: dict[str, Any], function: dict[str, Any]) -> list[dict[str, Any]]:
    role_id = function["Properties"]["Role"]["Fn::GetAtt"][0]
    statements = []
    for policy in of_type(template, "AWS::IAM::Policy").values():
        if {"Ref": role_id} in policy["Properties"]["Roles"]:
            statements += policy["Properties"]["PolicyDocument"]["Statement"]
    return statements


def test_each_function_reads_only_its_own_model_versions_objects(serving, catalog):
    for name, function in functions_by_model(serving).items():
        statements = policy_statements_of(serving, function)
        s3 = [s for s in statements if any(a.startswith("s3:") for a in _actions(s))]
        assert {a for s in s3 for a in _actions(s)} == {"s3:GetObject", "s3:ListBucket"}
        (get,) = [s for s in s3 if "s3:GetObject" in _actions(s)]
        manifest = catalog.get(name).manifest
        keys = [r["Fn::Join"][1][-1] for r in get["Resource"]]
        assert keys == [
            f"/models/{name}/{manifest.version}/manifest.json",
            f"/models/{name}/{manifest.version}/{manifest.artifact}",
        ]
        others = [other for other in LAMBDA_MODELS if other != name]
        assert not any(f"/models/{other}/" in json.dumps(s3) for other in others)
        (listing,) = [s for s in s3 if "s3:ListBucket" in _actions(s)]
        assert listing["Condition"] == {"StringLike": {"s3:prefix": [f"models/{name}/{manifest.version}/*"]}}


def _resources(statement: dict[str, Any]) -> list[Any]:
    resource = statement["Resource"]
    return resource if isinstance(resource, list) else [resource]


def _actions(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else action


def test_no_role_uses_a_managed_policy(serving, storage, pipeline):
    """Except CDK's own deploy-time handler for bucket notifications (acknowledged, with its reason)."""
    for template in (serving, storage, pipeline):
        for logical_id, role in of_type(template, "AWS::IAM::Role").items():
            if logical_id.startswith("BucketNotificationsHandler"):
                assert template is pipeline
                continue
            if logical_id.startswith("Rollouts"):  # CodeDeploy's, AWS's narrowest for Lambda
                assert [p["Fn::Join"][1][-1] for p in role["Properties"]["ManagedPolicyArns"]] == [
                    ":iam::aws:policy/service-role/AWSCodeDeployRoleForLambdaLimited"
                ]
                continue
            assert "ManagedPolicyArns" not in role["Properties"]


def test_pipeline_serves_every_model_reading_only_their_prefixes(pipeline, catalog):
    (worker,) = [
        f
        for f in of_type(pipeline, "AWS::Lambda::Function").values()
        if f["Properties"].get("PackageType") == "Image"
    ]
    env = worker["Properties"]["Environment"]["Variables"]
    assert env[MODELS_ENV] == ",".join(f"{e.name}@{e.version}" for e in catalog)
    assert env[GPU_ENDPOINTS_ENV] == GpuTarget.join(
        {
            n: GpuTarget(endpoint_name_for("ml.g5.xlarge"), component_name_for(n, "ml.g5.xlarge"))
            for n in GPU_MODELS
        }
    )
    assert worker["Properties"]["MemorySize"] == max(
        lambda_memory_mb(catalog.get(n).manifest) for n in LAMBDA_MODELS
    )
    model_reads = json.dumps(
        [s for s in policy_statements_of(pipeline, worker) if "s3:GetObject" in _actions(s)]
    )
    for name in (*LAMBDA_MODELS, *GPU_MODELS):
        manifest = catalog.get(name).manifest
        assert f"/models/{name}/{manifest.version}/manifest.json" in model_reads
        assert f"/models/{name}/{manifest.version}/{manifest.artifact}" in model_reads
    assert model_reads.count("/models/") == 2 * len(catalog.entries), "two objects per model"
    model_objects = [r for r in json.loads(model_reads) for r in _resources(r) if "/models/" in json.dumps(r)]
    assert not any(r["Fn::Join"][1][-1].endswith("*") for r in model_objects), "no wildcard on models"


def templates_of(assembly) -> dict[str, dict[str, Any]]:
    return {stack.stack_name: stack.template for stack in assembly.stacks}


def test_every_service_role_trusts_its_service_for_this_account_only(assembly):
    """Confused-deputy protection on every trust policy the app writes, CDK's own handler's too."""
    seen = set()
    for stack_name, template in templates_of(assembly).items():
        for logical_id, role in of_type(template, "AWS::IAM::Role").items():
            for statement in role["Properties"]["AssumeRolePolicyDocument"]["Statement"]:
                if "Service" not in statement.get("Principal", {}):
                    continue
                seen.add(statement["Principal"]["Service"])
                condition = statement.get("Condition", {})
                assert condition.get("StringEquals") == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}, (
                    stack_name,
                    logical_id,
                )
                if statement["Principal"]["Service"] == "sagemaker.amazonaws.com":
                    assert ":sagemaker:" in json.dumps(condition["ArnLike"]["aws:SourceArn"])
                if statement["Principal"]["Service"] == "states.amazonaws.com":
                    assert ":stateMachine:*" in json.dumps(condition["ArnLike"]["aws:SourceArn"])
    services = {
        "lambda.amazonaws.com",
        "apigateway.amazonaws.com",
        "sagemaker.amazonaws.com",
        "states.amazonaws.com",
        "codedeploy.amazonaws.com",
    }
    assert seen == services


def test_every_log_group_expires_and_every_function_logs_to_one(make_app, catalog):
    """No group that never expires: each function logs to a group of the stacks' (CDK's
    notification handler included), and API Gateway's execution log group is created first."""
    assembly = synth_app(make_app, catalog, validate=False, nag=False, log_retention_days="7")
    templates = templates_of(assembly)
    for stack_name, template in templates.items():
        groups = of_type(template, "AWS::Logs::LogGroup")
        assert all(g["Properties"]["RetentionInDays"] == 7 for g in groups.values()), stack_name
        for logical_id, function in of_type(template, "AWS::Lambda::Function").items():
            target = function["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
            assert target in groups, (stack_name, logical_id)
    names = [
        json.dumps(g["Properties"].get("LogGroupName"))
        for g in of_type(templates[SERVING_STACK], "AWS::Logs::LogGroup").values()
    ]
    assert sum("API-Gateway-Execution-Logs_" in n for n in names) == 1
    assert sum("/aws/sagemaker/Endpoints/" in n for n in names) == 1, "one endpoint"
    assert sum("/aws/sagemaker/InferenceComponents/" in n for n in names) == len(GPU_MODELS)


def test_the_api_passes_every_body_as_bytes(serving):
    (api,) = of_type(serving, "AWS::ApiGateway::RestApi").values()
    assert api["Properties"]["BinaryMediaTypes"] == ["*/*"]
    for method in of_type(serving, "AWS::ApiGateway::Method").values():
        integration = method["Properties"]["Integration"]
        if integration["Type"] == "MOCK":
            assert integration["ContentHandling"] == "CONVERT_TO_TEXT"
        else:  # Lambda proxy and InvokeEndpoint: the caller's bytes, unconverted
            assert "ContentHandling" not in integration and "RequestTemplates" not in integration


def test_pipeline_deploys_after_storage_and_serving(assembly):
    dependencies = {d.id for d in assembly.get_stack_by_name(PIPELINE_STACK).dependencies}
    assert {STORAGE_STACK, SERVING_STACK} <= dependencies


def test_the_batch_stack_serves_every_model_after_storage_and_serving(assembly, catalog):
    dependencies = {d.id for d in assembly.get_stack_by_name(BATCH_STACK).dependencies}
    assert {STORAGE_STACK, SERVING_STACK} <= dependencies
    template = assembly.get_stack_by_name(BATCH_STACK).template
    assert {"StateMachineArn", "DataBucketName"} <= set(template["Outputs"])
    (function,) = [
        f
        for f in of_type(template, "AWS::Lambda::Function").values()
        if f["Properties"].get("PackageType") == "Image"
    ]
    env = function["Properties"]["Environment"]["Variables"]
    assert env[MODELS_ENV] == ",".join(f"{e.name}@{e.version}" for e in catalog)
    assert env[GPU_ENDPOINTS_ENV] == GpuTarget.join(
        {
            n: GpuTarget(endpoint_name_for("ml.g5.xlarge"), component_name_for(n, "ml.g5.xlarge"))
            for n in GPU_MODELS
        }
    )
    reads = json.dumps([s for s in policy_statements_of(template, function) if "s3:GetObject" in _actions(s)])
    assert reads.count("/models/") == 2 * len(catalog.entries), "each model's manifest and artifact, no more"


def test_other_stacks_import_the_buckets_that_storage_exports(serving, storage, pipeline, assembly):
    model_export, data_export = (
        f"{STORAGE_STACK}-ModelStore-BucketName",
        f"{STORAGE_STACK}-DataStore-BucketName",
    )
    exports = [o["Export"]["Name"] for o in storage["Outputs"].values() if "Export" in o]
    assert sorted(exports) == [data_export, model_export]
    for function in functions_by_model(serving).values():
        bucket = function["Properties"]["Environment"]["Variables"][MODEL_BUCKET_ENV]
        assert bucket == {"Fn::ImportValue": model_export}
    (notifications,) = of_type(pipeline, "Custom::S3BucketNotifications").values()
    assert notifications["Properties"]["BucketName"] == {"Fn::ImportValue": data_export}
    serving_artifact = assembly.get_stack_by_name(SERVING_STACK)
    assert STORAGE_STACK in [d.id for d in serving_artifact.dependencies]


def test_outputs_for_ops(serving, storage, pipeline):
    assert "ApiUrl" in serving["Outputs"]
    assert {"ModelBucketName", "DataBucketName"} <= set(storage["Outputs"])
    assert "DeadLetterQueueUrl" in pipeline["Outputs"]
    assert set(serving["Outputs"]) == {"ApiUrl", "AlarmTopicArn", "DashboardName"}, (
        "one URL output, not CDK's hashed duplicate"
    )


def test_synth_is_deterministic(assembly, make_app, catalog):
    again = synth_app(make_app, catalog, validate=False, nag=True)
    for name in (STORAGE_STACK, SERVING_STACK, PIPELINE_STACK, BATCH_STACK):
        one, two = assembly.get_stack_by_name(name).template, again.get_stack_by_name(name).template
        changed = sorted(
            k
            for k in set(one["Resources"]) | set(two["Resources"])
            if one["Resources"].get(k) != two["Resources"].get(k)
        )
        # (an image asset hash changes if layers/ or functions/ is edited mid-run)
        assert one == two, f"{name}: resources differ between two synths: {changed}"


def test_api_key_mode_passes_cdk_nag(make_app, catalog):
    assembly = synth_app(make_app, catalog, validate=False, nag=True, auth="api_key")
    template = assembly.get_stack_by_name(SERVING_STACK).template
    assert len(of_type(template, "AWS::ApiGateway::ApiKey")) == 1
    assert "ApiKeyId" in template["Outputs"]


def test_no_auth_mode_passes_cdk_nag_with_reasons(make_app, catalog):
    assembly = synth_app(make_app, catalog, validate=False, nag=True, auth="none")
    methods = of_type(assembly.get_stack_by_name(SERVING_STACK).template, "AWS::ApiGateway::Method")
    assert {m["Properties"]["AuthorizationType"] for m in methods.values()} == {"NONE"}


@pytest.fixture(scope="module")
def app_main(repo_root):
    return runpy.run_path(str(repo_root / "app.py"), run_name="tierserve_app")["main"]


def test_app_without_a_catalog_deploys_storage_and_health_routes(app_main, make_app, tmp_path, capsys):
    app = app_main(make_app(catalog=str(tmp_path / "missing.json")))
    assert "no catalog at" in capsys.readouterr().err
    assembly = app.synth()
    assert PIPELINE_STACK not in [s.stack_name for s in assembly.stacks], (
        "no models: nothing to run on inputs"
    )
    serving = assembly.get_stack_by_name(SERVING_STACK).template
    assert of_type(serving, "AWS::Lambda::Function") == {}
    parts = {r["Properties"]["PathPart"] for r in of_type(serving, "AWS::ApiGateway::Resource").values()}
    assert parts == {"v2", "health", "live", "ready", "models", "{model}", "{proxy+}"}
    templates = [
        m["Properties"]["Integration"]["IntegrationResponses"][0]["ResponseTemplates"]["application/json"]
        for m in of_type(serving, "AWS::ApiGateway::Method").values()
    ]
    assert sum("no models are deployed yet" in t for t in templates) == 2
    assert of_type(assembly.get_stack_by_name(STORAGE_STACK).template, "AWS::S3::Bucket")


def test_app_stops_on_bad_context_naming_the_key(app_main, make_app):
    with pytest.raises(SystemExit) as raised:
        app_main(make_app(auth="cognito"))
    assert "'auth'" in str(raised.value.code) and "'cognito'" in str(raised.value.code)


@pytest.mark.slow
def test_app_py_runs_as_the_cdk_cli_runs_it(repo_root, cdk_context, tmp_path):
    """`python3 app.py` with the CLI's environment: context from CDK_CONTEXT_JSON, no catalog."""
    context = {**cdk_context, "catalog": str(tmp_path / "none.json")}
    env = {
        **os.environ,
        "CDK_CONTEXT_JSON": json.dumps(context),
        "CDK_OUTDIR": str(tmp_path / "cdk.out"),
        "CDK_VALIDATION": "false",  # CloudFormation validation runs in the `assembly` fixture
        "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
    }
    done = subprocess.run(
        [sys.executable, "app.py"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no catalog at" in done.stderr
    assert {p.name for p in (tmp_path / "cdk.out").glob("*.template.json")} == {
        f"{STORAGE_STACK}.template.json",
        f"{SERVING_STACK}.template.json",
    }


# ---------------------------------------------------------------- SnapStart, versions, aliases


def alias_of(template: dict[str, Any], function_id: str) -> tuple[str, dict[str, Any]]:
    """The alias (logical id, properties) of a function: ``live``, on a published version."""
    versions = {
        k: v
        for k, v in of_type(template, "AWS::Lambda::Version").items()
        if v["Properties"]["FunctionName"] == {"Ref": function_id}
    }
    (version_id,) = versions
    ((alias_id, alias),) = [
        (k, a["Properties"])
        for k, a in of_type(template, "AWS::Lambda::Alias").items()
        if a["Properties"]["FunctionName"] == {"Ref": function_id}
    ]
    assert alias["Name"] == "live" and alias["FunctionVersion"] == {"Fn::GetAtt": [version_id, "Version"]}
    return alias_id, alias


def test_every_model_function_has_snapstart_on_a_published_version_behind_live(serving):
    functions = of_type(serving, "AWS::Lambda::Function")
    for name in LAMBDA_MODELS:
        (function_id,) = [
            k
            for k, f in functions.items()
            if f["Properties"]["Environment"]["Variables"][MODELS_ENV].startswith(f"{name}@")
            and f["Properties"]["ImageConfig"]["Command"] != ["jobs.handler"]  # the jobs function names all
        ]
        props = functions[function_id]["Properties"]
        assert props["SnapStart"] == {"ApplyOn": "PublishedVersions"}
        assert props["EphemeralStorage"] == {"Size": 512}
        alias_of(serving, function_id)


def test_api_gateway_integrations_and_permissions_name_the_alias_never_latest(serving):
    functions = of_type(serving, "AWS::Lambda::Function")
    aliases = {alias_of(serving, function_id)[0] for function_id in functions}
    lambda_methods = [
        m["Properties"]
        for m in of_type(serving, "AWS::ApiGateway::Method").values()
        if m["Properties"]["Integration"].get("Type") == "AWS_PROXY"
    ]
    # Per Lambda-tier model: GET and {proxy+}, and ANY on versions, versions/{proxy+}, versions/V and
    # versions/V/{proxy+}; per model of either tier, its three jobs routes (the jobs function's alias).
    assert len(lambda_methods) == 6 * len(LAMBDA_MODELS) + 3 * (len(LAMBDA_MODELS) + len(GPU_MODELS))
    for method in lambda_methods:
        uri = json.dumps(method["Integration"]["Uri"])
        assert any(f'{{"Ref": "{alias}"}}' in uri for alias in aliases), uri  # the alias ARN
        assert not any(f'"{function_id}"' in uri for function_id in functions), "never the function ($LATEST)"
    permissions = of_type(serving, "AWS::Lambda::Permission")
    assert permissions and all(
        p["Properties"]["FunctionName"]["Ref"] in aliases for p in permissions.values()
    )


def test_the_pipelines_event_source_invokes_the_workers_alias(pipeline):
    (function_id,) = of_type(pipeline, "AWS::Lambda::Function").keys() & {
        k
        for k, f in of_type(pipeline, "AWS::Lambda::Function").items()
        if f["Properties"].get("PackageType") == "Image"
    }
    alias_id, _ = alias_of(pipeline, function_id)
    (mapping,) = of_type(pipeline, "AWS::Lambda::EventSourceMapping").values()
    name = json.dumps(mapping["Properties"]["FunctionName"])  # function-name:live, from the alias ARN
    assert f'{{"Ref": "{alias_id}"}}' in name and name.endswith('":live"]]}')
    assert "SnapStart" not in of_type(pipeline, "AWS::Lambda::Function")[function_id]["Properties"]


def test_an_impossible_combination_stops_synth_naming_the_keys(make_app, catalog):
    with pytest.raises(ConfigError) as raised:
        build_app(make_app, catalog, validate=False, nag=False, provisioned_concurrency={"iris": 2})
    assert "model iris has both SnapStart (context 'snapstart') and provisioned concurrency" in str(
        raised.value
    )
    with pytest.raises(ConfigError, match="'provisioned_concurrency' names nope, not a Lambda-tier model"):
        build_app(
            make_app, catalog, validate=False, nag=False, snapstart=False, provisioned_concurrency={"nope": 1}
        )
    app = build_app(
        make_app,
        catalog,
        validate=False,
        nag=False,
        snapstart=["resnet-50"],
        provisioned_concurrency={"iris": 2},
    )
    serving = app.synth().get_stack_by_name(SERVING_STACK).template
    aliases = [a["Properties"] for a in of_type(serving, "AWS::Lambda::Alias").values()]
    assert [a.get("ProvisionedConcurrencyConfig") for a in aliases].count(
        {"ProvisionedConcurrentExecutions": 2}
    ) == 1
    snap = [f["Properties"].get("SnapStart") for f in of_type(serving, "AWS::Lambda::Function").values()]
    assert snap.count({"ApplyOn": "PublishedVersions"}) == 1
