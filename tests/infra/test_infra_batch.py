"""BatchInference in a bare stack: the Distributed Map state machine (item readers, batching,
limits, retries, result writer), the batch function, and least privilege for both."""

from __future__ import annotations

import json
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from cdk_nag import AwsSolutionsChecks

from infra.batch import LAMBDA_TRANSIENT_ERRORS, BatchInference
from tierserve.batch import BATCH_RETRY, READERS
from tierserve.catalog import MB
from tierserve.settings import DATA_BUCKET_ENV, GPU_ENDPOINTS_ENV, MODELS_ENV, GpuTarget

TIMEOUT = 600


def build(make_app, manifests, *, name: str, **overrides: Any) -> cdk.Stack:
    stack = cdk.Stack(make_app(), name)
    options: dict[str, Any] = {
        "items_per_batch": 250,
        "max_concurrency": 40,
        "tolerated_failure_percentage": 2.5,
        "gpu_endpoints": {"big-llm": GpuTarget("tierserve-g5-xlarge", "tierserve-big-llm")},
    }
    options.update(overrides)
    BatchInference(
        stack,
        "Batch",
        data_bucket=s3.Bucket.from_bucket_name(stack, "Data", "data-bucket"),
        models=manifests,
        architecture=lambda_.Architecture.X86_64,
        model_bucket_name="models-bucket",
        model_prefix="models",
        function_timeout=cdk.Duration.seconds(TIMEOUT),
        ephemeral_storage_mb=2048,
        log_retention=logs.RetentionDays.ONE_MONTH,
        log_level="INFO",
        **options,
    )
    return stack


@pytest.fixture(scope="module")
def manifests(manifest_factory):
    return [manifest_factory("iris", "3", 4 * 1024), manifest_factory("big-llm", "7", 2048 * MB)]


@pytest.fixture(scope="module")
def batch_stack(make_app, manifests):
    return build(make_app, manifests, name="Batch")


@pytest.fixture(scope="module")
def batch(batch_stack, template_of):
    return template_of(batch_stack)


def definition(template) -> dict[str, Any]:
    """The state machine's ASL, with CloudFormation references written as <Name>."""
    (machine,) = template.find_resources("AWS::StepFunctions::StateMachine").values()
    parts = machine["Properties"]["DefinitionString"]["Fn::Join"][1]
    text = "".join(p if isinstance(p, str) else f"<{_ref(p)}>" for p in parts)
    return json.loads(text)


def _ref(node: dict[str, Any]) -> str:
    if "Ref" in node:
        return node["Ref"]
    if "Fn::ImportValue" in node:
        return node["Fn::ImportValue"]
    return ".".join(node["Fn::GetAtt"])


def maps(template) -> dict[str, dict[str, Any]]:
    states = definition(template)["States"]
    return {name.removeprefix("Serve "): s for name, s in states.items() if s["Type"] == "Map"}


def test_the_run_input_chooses_one_distributed_map_per_reader(batch):
    asl = definition(batch)
    choice = asl["States"][asl["StartAt"]]
    assert choice["Type"] == "Choice"
    assert {c["StringEquals"]: c["Next"] for c in choice["Choices"]} == {r: f"Serve {r}" for r in READERS}
    assert asl["States"][choice["Default"]]["Type"] == "Fail"
    assert sorted(maps(batch)) == sorted(READERS)
    for state in maps(batch).values():
        assert state["ItemProcessor"]["ProcessorConfig"] == {
            "Mode": "DISTRIBUTED",
            "ExecutionType": "STANDARD",
        }


def test_item_readers_list_the_prefix_or_read_the_manifest_the_run_names(batch):
    readers = {name: state["ItemReader"] for name, state in maps(batch).items()}
    assert readers["prefix"]["Resource"].endswith(":states:::s3:listObjectsV2")
    assert readers["prefix"]["Parameters"] == {"Bucket": "data-bucket", "Prefix.$": "$.key"}
    assert readers["csv"]["ReaderConfig"] == {"InputType": "CSV", "CSVHeaderLocation": "FIRST_ROW"}
    assert readers["json"]["ReaderConfig"] == {"InputType": "JSON"}
    assert readers["inventory"]["ReaderConfig"] == {"InputType": "MANIFEST"}
    for name in ("csv", "json", "inventory"):
        assert readers[name]["Resource"].endswith(":states:::s3:getObject")
        assert readers[name]["Parameters"] == {"Bucket": "data-bucket", "Key.$": "$.key"}


def test_batches_limits_and_the_summary_come_from_context(batch):
    for name, state in maps(batch).items():
        assert state["ItemBatcher"] == {
            "MaxItemsPerBatch": 250,
            "BatchInput": {"bucket": "data-bucket", "model.$": "$.model", "reader": name},
        }
        assert state["MaxConcurrency"] == 40
        assert state["ToleratedFailurePercentage"] == 2.5
        assert state["ResultWriter"]["Resource"].endswith(":states:::s3:putObject")
        assert state["ResultWriter"]["Parameters"] == {"Bucket": "data-bucket", "Prefix": "batch-summaries"}


def test_each_batch_runs_the_batch_function_with_the_shared_retry_policy(batch):
    function_id = next(iter(batch.find_resources("AWS::Lambda::Function")))
    for state in maps(batch).values():
        (task,) = state["ItemProcessor"]["States"].values()
        assert task["Type"] == "Task" and task["Resource"] == f"<{function_id}.Arn>"
        assert task["Retry"] == [
            {
                "ErrorEquals": [*BATCH_RETRY.errors, *LAMBDA_TRANSIENT_ERRORS],
                "IntervalSeconds": BATCH_RETRY.interval_s,
                "MaxAttempts": BATCH_RETRY.max_attempts,
                "BackoffRate": BATCH_RETRY.backoff_rate,
            },
            {  # a batch that waits for a GPU model with no copy running: minutes, not seconds
                "ErrorEquals": ["BatchModelStarting"],
                "IntervalSeconds": 60,
                "MaxAttempts": 25,
                "BackoffRate": 2,
                "MaxDelaySeconds": 300,
            },
        ]
        assert "PoisonItems" not in json.dumps(task["Retry"]), "a batch that can never succeed is not retried"


def test_the_state_machine_logs_every_event_and_is_traced(batch):
    (machine,) = batch.find_resources("AWS::StepFunctions::StateMachine").values()
    props = machine["Properties"]
    assert props["StateMachineType"] == "STANDARD"
    assert props["TracingConfiguration"] == {"Enabled": True}
    assert props["LoggingConfiguration"]["Level"] == "ALL"
    assert props["LoggingConfiguration"]["IncludeExecutionData"] is False
    groups = batch.find_resources("AWS::Logs::LogGroup")
    assert all(g["Properties"]["RetentionInDays"] == 30 for g in groups.values())


def the_function(template) -> dict[str, Any]:
    (function,) = template.find_resources("AWS::Lambda::Function").values()
    return function["Properties"]


def test_the_batch_function_is_the_workers_twin(batch):
    props = the_function(batch)
    assert props["ImageConfig"] == {"Command": ["batch.handler"]}
    assert props["Timeout"] == TIMEOUT
    env = props["Environment"]["Variables"]
    assert env[DATA_BUCKET_ENV] == "data-bucket"
    assert env[MODELS_ENV] == "iris@3,big-llm@7"
    assert env[GPU_ENDPOINTS_ENV] == "big-llm=tierserve-g5-xlarge/tierserve-big-llm"


def statements_of(template, role_fragment: str) -> list[dict[str, Any]]:
    return [
        s
        for logical_id, p in template.find_resources("AWS::IAM::Policy").items()
        if role_fragment in logical_id
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]


def _actions(statement: dict[str, Any]) -> list[str]:
    return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]


def _resources(statement: dict[str, Any]) -> list[str]:
    found = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
    return [json.dumps(r) for r in found]


def test_the_state_machine_lists_inputs_reads_manifests_and_writes_summaries_only(batch):
    s3_statements = [
        s for s in statements_of(batch, "StateMachineRole") if any(a.startswith("s3:") for a in _actions(s))
    ]
    by_action = {tuple(sorted(_actions(s))): s for s in s3_statements}
    listing = by_action[("s3:ListBucket",)]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["inputs/*"]}}
    reads = by_action[("s3:GetObject",)]
    assert sorted(r.split("data-bucket/")[1].strip('"]}') for r in _resources(reads)) == [
        "inventory/*",
        "manifests/*",
    ]
    summary = by_action[
        ("s3:AbortMultipartUpload", "s3:GetObject", "s3:ListMultipartUploadParts", "s3:PutObject")
    ]
    assert [r.split("data-bucket/")[1].strip('"]}') for r in _resources(summary)] == ["batch-summaries/*"]
    assert len(s3_statements) == 3, "nothing on the whole bucket, nothing under inputs/ or outputs/"
    invokes = [s for s in statements_of(batch, "StateMachineRole") if "lambda:InvokeFunction" in _actions(s)]
    assert len(invokes) == 1 and all("BatchFunction" in r for r in _resources(invokes[0]))


def test_the_batch_function_reads_inputs_and_writes_results_as_the_worker_does(batch):
    statements = statements_of(batch, "FunctionRole")
    writes = [s for s in statements if "s3:PutObject" in _actions(s)]
    (write,) = writes
    assert sorted(r.split("data-bucket/")[1].strip('"]}') for r in _resources(write)) == [
        "errors/*",
        "outputs/*",
    ]
    reads = [s for s in statements if _actions(s) == ["s3:GetObject", "s3:GetObjectVersion"]]
    assert [r.split("data-bucket/")[1].strip('"]}') for r in _resources(reads[0])] == ["inputs/*"]
    (invoke,) = [s for s in statements if "sagemaker:InvokeEndpoint" in _actions(s)]
    endpoint, component = _resources(invoke)
    assert endpoint.endswith(':endpoint/tierserve-g5-xlarge"]]}')
    assert component.endswith(':inference-component/tierserve-big-llm"]]}')


def test_the_construct_is_cdk_nag_clean_with_reasons(batch_stack):
    app = batch_stack.node.root
    report = AwsSolutionsChecks(app).validate_scope(app)
    assert report.success is True and report.violations == []


def test_a_tolerance_of_zero_is_the_default_and_renders_none(make_app, manifests, template_of):
    template = template_of(
        build(make_app, manifests[:1], name="Strict", tolerated_failure_percentage=0, gpu_endpoints={})
    )
    assert all("ToleratedFailurePercentage" not in state for state in maps(template).values())
    assert GPU_ENDPOINTS_ENV not in the_function(template)["Environment"]["Variables"]
