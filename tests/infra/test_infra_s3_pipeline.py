"""InferencePipeline and DataStore in bare stacks: S3 -> SQS (DLQ) -> worker, least privilege."""

from __future__ import annotations

import json
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk.assertions import Annotations, Match

from infra.monitoring import AlarmTopic
from infra.s3_pipeline import DataStore, InferencePipeline
from tierserve.catalog import MB, lambda_memory_mb
from tierserve.settings import (
    CACHE_MAX_MB_ENV,
    DATA_BUCKET_ENV,
    GPU_ENDPOINTS_ENV,
    MODEL_BUCKET_ENV,
    MODELS_ENV,
    GpuTarget,
    parse_gpu_targets,
)

WORKER_TIMEOUT = 120


BIG_TARGET = GpuTarget("tierserve-g5-xlarge", "tierserve-big-llm-g5-xlarge")


def build(make_app, manifests, *, name: str, gpu: dict[str, GpuTarget], **overrides: Any) -> cdk.Stack:
    stack = cdk.Stack(make_app(), name)
    if overrides.get("alarm_topic") == "the app's":
        overrides["alarm_topic"] = AlarmTopic(stack, "Alarms", email="ops@example.com").topic
    options: dict[str, Any] = {
        "worker_timeout": cdk.Duration.seconds(WORKER_TIMEOUT),
        "max_receive_count": 5,
        "batch_size": 10,
        "batching_window": cdk.Duration.seconds(5),
        "reserved_concurrency": None,
        "alarm_topic": None,
    }
    options.update(overrides)
    InferencePipeline(
        stack,
        "Pipeline",
        data_bucket=s3.Bucket.from_bucket_name(stack, "Data", "data-bucket"),
        models=manifests,
        gpu_endpoints=gpu,
        architecture=lambda_.Architecture.X86_64,
        model_bucket_name="models-bucket",
        model_prefix="models",
        ephemeral_storage_mb=2048,
        log_retention=logs.RetentionDays.ONE_MONTH,
        log_level="INFO",
        **options,
    )
    return stack


@pytest.fixture(scope="module")
def manifests(manifest_factory):
    return [
        manifest_factory("iris", "3", 4 * 1024),
        manifest_factory("resnet-50", "1.2", 300 * MB),
        manifest_factory("big-llm", "7", 2048 * MB),
    ]


@pytest.fixture(scope="module")
def pipeline_stack(make_app, manifests):
    return build(make_app, manifests, name="Pipeline", gpu={"big-llm": BIG_TARGET})


@pytest.fixture(scope="module")
def pipeline(pipeline_stack, template_of):
    return template_of(pipeline_stack)


@pytest.fixture(scope="module")
def with_alarm_email_stack(make_app, manifests):
    return build(
        make_app,
        manifests[:1],
        name="PipelineWithEmail",
        gpu={},
        alarm_topic="the app's",
        reserved_concurrency=20,
        batching_window=cdk.Duration.seconds(0),
    )


@pytest.fixture(scope="module")
def with_alarm_email(with_alarm_email_stack, template_of):
    return template_of(with_alarm_email_stack)


def queues(template) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(main queue properties, DLQ logical id, DLQ properties)."""
    found = template.find_resources("AWS::SQS::Queue")
    (main,) = [q for q in found.values() if "RedrivePolicy" in q["Properties"]]
    (dlq_id,) = [k for k, q in found.items() if "RedrivePolicy" not in q["Properties"]]
    return main["Properties"], dlq_id, found[dlq_id]["Properties"]


def test_object_created_under_inputs_notifies_the_queue(pipeline, find):
    (notifications,) = find(pipeline, "Custom::S3BucketNotifications")
    props = notifications["Properties"]
    assert props["BucketName"] == "data-bucket"
    config, *jobs = props["NotificationConfiguration"]["QueueConfigurations"]
    assert config["Events"] == ["s3:ObjectCreated:*"]
    assert config["Filter"] == {"Key": {"FilterRules": [{"Name": "prefix", "Value": "inputs/"}]}}
    main_id = next(
        k for k, q in pipeline.find_resources("AWS::SQS::Queue").items() if "RedrivePolicy" in q["Properties"]
    )
    assert config["QueueArn"] == {"Fn::GetAtt": [main_id, "Arn"]}
    # Async jobs: only a job's input (jobs/{model}/{caller}/{id}/{version}/input.{ext}) triggers.
    rules = [{(rule["Name"], rule["Value"]) for rule in job["Filter"]["Key"]["FilterRules"]} for job in jobs]
    assert rules == [
        {("prefix", "jobs/"), ("suffix", f"/input{ext}")} for ext in (".json", ".jsonl", ".npy", ".bin")
    ]
    assert all(job["QueueArn"] == config["QueueArn"] and job["Events"] == config["Events"] for job in jobs)
    assert "QueueConfigurations" in props["NotificationConfiguration"]
    assert set(props["NotificationConfiguration"]) == {"QueueConfigurations"}


def test_queues_are_encrypted_and_redrive_to_the_dlq(pipeline):
    main, dlq_id, dlq = queues(pipeline)
    assert main["SqsManagedSseEnabled"] is True and dlq["SqsManagedSseEnabled"] is True
    assert main["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": [dlq_id, "Arn"]},
        "maxReceiveCount": 5,
    }
    assert main["VisibilityTimeout"] >= 6 * WORKER_TIMEOUT
    assert main["VisibilityTimeout"] == 6 * WORKER_TIMEOUT + 5, "plus the batching window"
    assert dlq["MessageRetentionPeriod"] == 14 * 24 * 3600


def test_queues_refuse_plain_http_and_only_the_bucket_may_send(pipeline, find):
    policies = find(pipeline, "AWS::SQS::QueuePolicy")
    assert len(policies) == 2
    for policy in policies:
        statements = policy["Properties"]["PolicyDocument"]["Statement"]
        deny = [s for s in statements if s["Effect"] == "Deny"]
        assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    sends = [
        s
        for p in policies
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if s["Effect"] == "Allow" and s.get("Principal") == {"Service": "s3.amazonaws.com"}
    ]
    (send,) = sends
    assert "data-bucket" in json.dumps(send["Condition"]["ArnLike"]["aws:SourceArn"])


def test_event_source_batches_and_reports_item_failures(pipeline, find):
    (mapping,) = find(pipeline, "AWS::Lambda::EventSourceMapping")
    props = mapping["Properties"]
    assert props["BatchSize"] == 10
    assert props["MaximumBatchingWindowInSeconds"] == 5
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert "ScalingConfig" not in props


def test_reserved_concurrency_caps_the_poller_too(with_alarm_email, find):
    assert worker(with_alarm_email)["ReservedConcurrentExecutions"] == 20
    (mapping,) = find(with_alarm_email, "AWS::Lambda::EventSourceMapping")
    assert mapping["Properties"]["ScalingConfig"] == {"MaximumConcurrency": 20}
    assert "MaximumBatchingWindowInSeconds" not in mapping["Properties"], "no window: 0 s"


def worker(template) -> dict[str, Any]:
    functions = template.find_resources("AWS::Lambda::Function", {"Properties": {"PackageType": "Image"}})
    (function,) = functions.values()
    return function["Properties"]


def test_worker_runs_the_api_image_with_its_own_handler(pipeline, manifests):
    props = worker(pipeline)
    assert props["ImageConfig"] == {"Command": ["worker.handler"]}
    assert props["Timeout"] == WORKER_TIMEOUT
    assert props["TracingConfig"] == {"Mode": "Active"}
    lambda_tier = [m for m in manifests if m.name != "big-llm"]
    assert props["MemorySize"] == max(lambda_memory_mb(m) for m in lambda_tier) == 1280


def test_worker_environment(pipeline):
    env = worker(pipeline)["Environment"]["Variables"]
    assert env[DATA_BUCKET_ENV] == "data-bucket"
    assert env[MODEL_BUCKET_ENV] == "models-bucket"
    assert env[MODELS_ENV] == "iris@3,resnet-50@1.2,big-llm@7"
    assert env[GPU_ENDPOINTS_ENV] == "big-llm=tierserve-g5-xlarge/tierserve-big-llm-g5-xlarge"
    assert env[CACHE_MAX_MB_ENV] == "1536"


def test_gpu_endpoints_parse_as_the_worker_reads_them(pipeline):
    env = worker(pipeline)["Environment"]["Variables"]
    assert parse_gpu_targets(env[GPU_ENDPOINTS_ENV]) == {"big-llm": BIG_TARGET}


def worker_statements(template) -> list[dict[str, Any]]:
    role_id = worker(template)["Role"]["Fn::GetAtt"][0]
    return [
        s
        for p in template.find_resources("AWS::IAM::Policy").values()
        if {"Ref": role_id} in p["Properties"]["Roles"]
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]


def _actions(statement: dict[str, Any]) -> list[str]:
    return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]


def _resources(statement: dict[str, Any]) -> list[str]:
    resource = statement["Resource"]
    return [json.dumps(r) for r in (resource if isinstance(resource, list) else [resource])]


def test_worker_never_writes_under_inputs(pipeline):
    for statement in worker_statements(pipeline):
        writes = {"s3:PutObject", "s3:DeleteObject", "s3:*"} & set(_actions(statement))
        if writes:
            resources = _resources(statement)
            assert not any("/inputs/" in r or "/input." in r for r in resources), resources
            results = ('/outputs/*"]]}', '/errors/*"]]}', '/jobs/*/output.json"]]}', '/jobs/*/error.json"]]}')
            assert all(r.endswith(results) for r in resources), resources


def test_worker_data_bucket_grants_are_by_prefix(pipeline):
    by_resource: dict[str, set[str]] = {}
    for statement in worker_statements(pipeline):
        for resource in _resources(statement):
            if "data-bucket" in resource:
                by_resource.setdefault(resource.split("data-bucket")[-1], set()).update(_actions(statement))
    assert by_resource == {
        '/inputs/*"]]}': {"s3:GetObject", "s3:GetObjectVersion"},
        '/outputs/*"]]}': {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"},
        '/errors/*"]]}': {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"},
        '"]]}': {"s3:ListBucket"},
        # async jobs: read the input, write the result beside it; never an input or a record
        '/jobs/*/input.*"]]}': {"s3:GetObject", "s3:GetObjectVersion"},
        '/jobs/*/output.json"]]}': {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"},
        '/jobs/*/error.json"]]}': {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"},
    }


def test_worker_may_invoke_only_the_gpu_models_components(pipeline):
    statements = worker_statements(pipeline)
    (invoke,) = [s for s in statements if "sagemaker:InvokeEndpoint" in _actions(s)]
    assert _actions(invoke) == ["sagemaker:InvokeEndpoint"]
    endpoint, component = _resources(invoke)
    assert endpoint.endswith(':endpoint/tierserve-g5-xlarge"]]}')
    assert component.endswith(':inference-component/tierserve-big-llm-g5-xlarge"]]}')
    assert not any(a.startswith("sagemaker:") for s in statements if s is not invoke for a in _actions(s))


def test_worker_consumes_the_queue_and_may_requeue_into_it_and_nothing_else_of_sqs(pipeline):
    """Consuming, and for a cold GPU model (s3_pipeline/cold.py) extending a message's visibility,
    reading the redrive policy and sending a delayed copy: on the inputs queue only."""
    statements = [s for s in worker_statements(pipeline) if any(a.startswith("sqs:") for a in _actions(s))]
    sqs = {a for s in statements for a in _actions(s)}
    assert sqs == {
        "sqs:ReceiveMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueUrl",
        "sqs:DeleteMessage",
        "sqs:GetQueueAttributes",
        "sqs:SendMessage",
    }
    found = pipeline.find_resources("AWS::SQS::Queue")
    (inputs_id,) = [k for k, q in found.items() if "RedrivePolicy" in q["Properties"]]
    for statement in statements:
        assert _resources(statement) == [f'{{"Fn::GetAtt": ["{inputs_id}", "Arn"]}}'], statement


def test_without_gpu_models_the_worker_sends_nothing_to_sqs(with_alarm_email):
    assert not any("sqs:SendMessage" in _actions(s) for s in worker_statements(with_alarm_email))


def test_no_gpu_models_means_no_sagemaker_access(with_alarm_email):
    env = worker(with_alarm_email)["Environment"]["Variables"]
    assert GPU_ENDPOINTS_ENV not in env
    assert not any("sagemaker:InvokeEndpoint" in _actions(s) for s in worker_statements(with_alarm_email))


def test_dead_letters_raise_an_alarm(pipeline, find):
    (alarm,) = find(pipeline, "AWS::CloudWatch::Alarm")
    props = alarm["Properties"]
    _, dlq_id, _ = queues(pipeline)
    assert props["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert props["Namespace"] == "AWS/SQS"
    assert props["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": [dlq_id, "QueueName"]}}]
    assert (props["ComparisonOperator"], props["Threshold"]) == ("GreaterThanThreshold", 0)
    assert props["TreatMissingData"] == "notBreaching"
    assert "AlarmActions" not in props
    assert find(pipeline, "AWS::SNS::Topic") == []


def test_an_alarm_without_a_topic_is_a_synth_warning_that_says_the_fix(
    pipeline_stack, with_alarm_email_stack
):
    warning = Match.string_like_regexp(r"nobody is told\. Pass the app's alarm topic")
    Annotations.from_stack(pipeline_stack).has_warning("/Pipeline/Pipeline", warning)
    assert Annotations.from_stack(with_alarm_email_stack).find_warning("*", Match.any_value()) == []


def test_dead_letters_publish_to_the_apps_alarm_topic(with_alarm_email, find):
    (topic_id,) = with_alarm_email.find_resources("AWS::SNS::Topic")
    (alarm,) = find(with_alarm_email, "AWS::CloudWatch::Alarm")
    assert alarm["Properties"]["AlarmActions"] == [{"Ref": topic_id}]
    assert alarm["Properties"]["OKActions"] == [{"Ref": topic_id}]


def test_the_worker_is_a_tierserve_function_with_retention_and_account_trust(pipeline):
    props = worker(pipeline)
    groups = pipeline.find_resources("AWS::Logs::LogGroup")
    worker_group = props["LoggingConfig"]["LogGroup"]["Ref"]
    assert groups[worker_group]["Properties"]["RetentionInDays"] == 30
    role_id = props["Role"]["Fn::GetAtt"][0]
    (trust,) = pipeline.find_resources("AWS::IAM::Role")[role_id]["Properties"]["AssumeRolePolicyDocument"][
        "Statement"
    ]
    assert trust["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}


def test_cdks_notification_handler_logs_with_retention_and_trusts_only_this_account(pipeline, find):
    """CDK's deploy-time handler would log to a group Lambda creates without retention, under
    a role any account's Lambda could assume."""
    (handler_id, handler), *others = [
        (k, f)
        for k, f in pipeline.find_resources("AWS::Lambda::Function").items()
        if f["Properties"].get("PackageType") != "Image"
    ]
    assert others == []
    assert handler_id.startswith("BucketNotificationsHandler")
    group_id = handler["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
    assert pipeline.find_resources("AWS::Logs::LogGroup")[group_id]["Properties"]["RetentionInDays"] == 30
    role_id = handler["Properties"]["Role"]["Fn::GetAtt"][0]
    (trust,) = pipeline.find_resources("AWS::IAM::Role")[role_id]["Properties"]["AssumeRolePolicyDocument"][
        "Statement"
    ]
    assert trust["Principal"] == {"Service": "lambda.amazonaws.com"}
    assert trust["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}


def test_gpu_endpoints_must_be_served_models(make_app, manifests):
    with pytest.raises(ValueError, match="does not serve"):
        build(make_app, manifests[:1], name="Wrong", gpu={"big-llm": BIG_TARGET})


@pytest.fixture(scope="module")
def data_store(make_app, template_of):
    stack = cdk.Stack(make_app(), "Data")
    logs_bucket = s3.Bucket(stack, "Logs", enforce_ssl=True)
    DataStore(stack, "DataStore", access_log_bucket=logs_bucket)
    return template_of(stack)


def test_data_bucket_is_private_encrypted_versioned_logged_and_retained(data_store):
    buckets = data_store.find_resources(
        "AWS::S3::Bucket", {"Properties": {"VersioningConfiguration": {"Status": "Enabled"}}}
    )
    (bucket,) = buckets.values()
    props = bucket["Properties"]
    assert props["PublicAccessBlockConfiguration"]["BlockPublicPolicy"] is True
    rule = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert props["LoggingConfiguration"]["LogFilePrefix"] == "data-bucket/"
    assert bucket["DeletionPolicy"] == "Retain"
    (bucket_id,) = buckets
    policies = data_store.find_resources(
        "AWS::S3::BucketPolicy", {"Properties": {"Bucket": {"Ref": bucket_id}}}
    )
    (policy,) = policies.values()
    denies = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
    assert {"Bool": {"aws:SecureTransport": "false"}} in [s["Condition"] for s in denies]
