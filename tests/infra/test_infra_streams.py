"""StreamInference in a bare stack, and the TierserveStream stack in the app: the event source
mapping (partial batch responses, bisection, retries, the on-failure destination), the
streams' encryption, the worker's environment and grants."""

from __future__ import annotations

import json
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from cdk_nag import AwsSolutionsChecks

from infra.config import ConfigError, InfraConfig
from infra.nag import add_aws_solutions_checks
from infra.stacks import STREAM_STACK, build_stacks
from infra.streams import StreamInference
from tierserve.catalog import MB
from tierserve.settings import GPU_ENDPOINTS_ENV, MODELS_ENV, OUTPUT_STREAM_ENV, STREAM_MODEL_ENV, GpuTarget


def build(
    make_app, manifest, *, name: str, gpu: dict[str, GpuTarget] | None = None, **overrides: Any
) -> cdk.Stack:
    stack = cdk.Stack(make_app(), name)
    options: dict[str, Any] = {"shards": 2, "batch_size": 250, "max_retry_attempts": 4}
    options.update(overrides)
    StreamInference(
        stack,
        "Streams",
        manifest=manifest,
        gpu_endpoints=gpu or {},
        architecture=lambda_.Architecture.X86_64,
        model_bucket_name="models-bucket",
        model_prefix="models",
        worker_timeout=cdk.Duration.seconds(120),
        ephemeral_storage_mb=2048,
        log_retention=logs.RetentionDays.ONE_MONTH,
        log_level="INFO",
        **options,
    )
    return stack


@pytest.fixture(scope="module")
def streams_stack(make_app, manifest_factory):
    return build(make_app, manifest_factory("iris", "3", 4 * 1024), name="Streams")


@pytest.fixture(scope="module")
def streams(streams_stack, template_of):
    return template_of(streams_stack)


def logical_id(template, resource_type: str, fragment: str) -> str:
    (found,) = [k for k in template.find_resources(resource_type) if fragment in k]
    return found


def test_the_mapping_reports_partial_failures_bisects_retries_and_sends_failures_to_sqs(streams, find):
    (mapping,) = find(streams, "AWS::Lambda::EventSourceMapping")
    props = mapping["Properties"]
    assert props["EventSourceArn"] == {
        "Fn::GetAtt": [logical_id(streams, "AWS::Kinesis::Stream", "Records"), "Arn"]
    }
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert props["BisectBatchOnFunctionError"] is True
    assert props["MaximumRetryAttempts"] == 4
    assert props["BatchSize"] == 250
    assert props["ParallelizationFactor"] == 1, "one batch per shard at a time: results in order"
    assert props["StartingPosition"] == "TRIM_HORIZON"
    failures = logical_id(streams, "AWS::SQS::Queue", "Failures")
    assert props["DestinationConfig"] == {"OnFailure": {"Destination": {"Fn::GetAtt": [failures, "Arn"]}}}


def test_both_streams_are_encrypted_with_kinesis_own_key(streams, find):
    for stream in find(streams, "AWS::Kinesis::Stream"):
        assert stream["Properties"]["ShardCount"] == 2
        assert stream["Properties"]["StreamEncryption"] == {
            "EncryptionType": "KMS",
            "KeyId": "alias/aws/kinesis",
        }


def test_the_failure_queue_is_encrypted_tls_only_and_alarmed(streams, find):
    (queue,) = find(streams, "AWS::SQS::Queue")
    assert queue["Properties"]["SqsManagedSseEnabled"] is True
    assert queue["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600
    (policy,) = find(streams, "AWS::SQS::QueuePolicy")
    deny = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
    assert deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    (alarm,) = find(streams, "AWS::CloudWatch::Alarm")
    assert alarm["Properties"]["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert alarm["Properties"]["Threshold"] == 0


def worker(template) -> dict[str, Any]:
    (function,) = template.find_resources("AWS::Lambda::Function").values()
    return function["Properties"]


def test_the_worker_runs_the_stream_handler_of_the_image_for_its_model(streams):
    props = worker(streams)
    assert props["ImageConfig"] == {"Command": ["stream.handler"]}
    env = props["Environment"]["Variables"]
    assert env[MODELS_ENV] == "iris@3" and env[STREAM_MODEL_ENV] == "iris"
    assert env[OUTPUT_STREAM_ENV] == {"Ref": logical_id(streams, "AWS::Kinesis::Stream", "Results")}
    assert GPU_ENDPOINTS_ENV not in env


def statements(template) -> list[dict[str, Any]]:
    return [
        s
        for p in template.find_resources("AWS::IAM::Policy").values()
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]


def _actions(statement: dict[str, Any]) -> list[str]:
    return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]


def test_the_worker_reads_the_records_writes_the_results_and_sends_only_to_its_failure_queue(streams):
    records = logical_id(streams, "AWS::Kinesis::Stream", "Records")
    results = logical_id(streams, "AWS::Kinesis::Stream", "Results")
    kinesis = [s for s in statements(streams) if any(a.startswith("kinesis:") for a in _actions(s))]
    writes = [s for s in kinesis if "kinesis:PutRecords" in _actions(s)]
    assert writes and all(s["Resource"] == {"Fn::GetAtt": [results, "Arn"]} for s in writes)
    reads = [s for s in kinesis if "kinesis:GetRecords" in _actions(s)]
    assert reads and all(json.dumps(s["Resource"]).count(records) == 1 for s in reads)
    assert not [
        s for s in kinesis if "kinesis:PutRecords" in _actions(s) and records in json.dumps(s["Resource"])
    ]
    sends = [s for s in statements(streams) if "sqs:SendMessage" in _actions(s)]
    failures = logical_id(streams, "AWS::SQS::Queue", "Failures")
    assert sends and all(s["Resource"] == {"Fn::GetAtt": [failures, "Arn"]} for s in sends)


def test_a_gpu_tier_stream_model_runs_on_its_endpoint(make_app, manifest_factory, template_of):
    heavy = manifest_factory("big-llm", "7", 2048 * MB)
    template = template_of(
        build(
            make_app,
            heavy,
            name="GpuStream",
            gpu={"big-llm": GpuTarget("tierserve-g5-xlarge", "tierserve-big-llm"), "other": GpuTarget("x")},
        )
    )
    env = worker(template)["Environment"]["Variables"]
    assert env[GPU_ENDPOINTS_ENV] == "big-llm=tierserve-g5-xlarge/tierserve-big-llm"
    invokes = [s for s in statements(template) if "sagemaker:InvokeEndpoint" in _actions(s)]
    assert len(invokes) == 1
    endpoint, component = (json.dumps(r) for r in invokes[0]["Resource"])
    assert endpoint.endswith(':endpoint/tierserve-g5-xlarge"]]}')
    assert component.endswith(':inference-component/tierserve-big-llm"]]}')


def test_the_construct_is_cdk_nag_clean_with_reasons(streams_stack):
    app = streams_stack.node.root
    report = AwsSolutionsChecks(app).validate_scope(app)
    assert report.success is True and report.violations == []


def test_the_stream_stack_exists_only_when_context_names_a_catalog_model(make_app, catalog):
    app = make_app(stream="iris")
    stacks = build_stacks(app, config=InfraConfig.from_context(app.node.try_get_context), catalog=catalog)
    assert stacks.stream is not None and stacks.stream.stack_name == STREAM_STACK
    outputs = cdk.assertions.Template.from_stack(stacks.stream).to_json()["Outputs"]
    assert {"RecordsStreamName", "ResultsStreamName", "FailureQueueUrl"} <= set(outputs)
    plain = make_app()
    assert (
        build_stacks(
            plain, config=InfraConfig.from_context(plain.node.try_get_context), catalog=catalog
        ).stream
        is None
    )
    add_aws_solutions_checks(app)
    app.synth()  # cdk-nag clean in the app too (a finding fails this synth)
    missing = make_app(stream="resnet")
    with pytest.raises(ConfigError, match="context 'stream' is 'resnet', which the catalog does not hold"):
        build_stacks(missing, config=InfraConfig.from_context(missing.node.try_get_context), catalog=catalog)


def test_a_gpu_tier_stream_model_that_scales_to_zero_warns_at_synth(make_app, catalog):
    """Records cannot wait for a cold model as S3 inputs do: synth says so, and how to fix it."""
    cold = make_app(stream="big-llm")
    stacks = build_stacks(cold, config=InfraConfig.from_context(cold.node.try_get_context), catalog=catalog)
    cdk.assertions.Annotations.from_stack(stacks.stream).has_warning(
        "*", cdk.assertions.Match.string_like_regexp("scales to zero.*set gpu_min_copies to 1 or more")
    )
    warm = make_app(stream="big-llm", gpu_min_copies=1)
    stacks = build_stacks(warm, config=InfraConfig.from_context(warm.node.try_get_context), catalog=catalog)
    found = cdk.assertions.Annotations.from_stack(stacks.stream).find_warning(
        "*", cdk.assertions.Match.string_like_regexp("scales to zero")
    )
    assert found == []
