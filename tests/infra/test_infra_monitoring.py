"""Monitoring in the real app: one dashboard with a row per model and the pipeline, each
model's alarms, every alarm of the app publishing to the one encrypted topic, and the warning
when nobody is subscribed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk.assertions import Annotations, Match
from cdk_nag import AwsSolutionsChecks

from infra.config import InfraConfig
from infra.monitoring import LATENCY_MS, METRICS_NAMESPACE
from infra.stacks import PIPELINE_STACK, SERVING_STACK, STREAM_STACK, build_stacks

LAMBDA = ("iris", "resnet-50")
GPU = ("big-llm", "tiny-on-gpu")
TOPIC_EXPORT = f"{SERVING_STACK}-AlarmTopicArn"


def build(make_app, catalog, **context: Any):
    app = make_app(**context)
    return build_stacks(app, config=InfraConfig.from_context(app.node.try_get_context), catalog=catalog)


@pytest.fixture(scope="module")
def stacks(make_app, catalog):
    return build(make_app, catalog, stream="iris", latency_budget_ms={"iris": 150}, error_rate_percent=2)


@pytest.fixture(scope="module")
def templates(stacks) -> dict[str, dict[str, Any]]:
    assembly = stacks.serving.node.root.synth()
    return {s.stack_name: s.template for s in assembly.stacks}


@pytest.fixture(scope="module")
def serving(templates):
    return templates[SERVING_STACK]


def of_type(template: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == resource_type}


def flatten(value: Any) -> str:
    """A dashboard body (``Fn::Join`` of strings and references) as text, references as <ref>."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        return value["Fn::Join"][0].join(flatten(v) for v in value["Fn::Join"][1])
    return "<ref>"


def dashboard(serving) -> dict[str, Any]:
    (board,) = of_type(serving, "AWS::CloudWatch::Dashboard").values()
    text = flatten(board["Properties"]["DashboardBody"])
    return json.loads(text.replace('"<ref>"', '"ref"').replace("<ref>", "ref"))


def model_alarms(serving) -> dict[str, dict[str, Any]]:
    """Monitoring's alarms by name (the scaling alarms of the GPU tier have no fixed name)."""
    alarms = of_type(serving, "AWS::CloudWatch::Alarm").values()
    return {a["Properties"]["AlarmName"]: a["Properties"] for a in alarms if "AlarmName" in a["Properties"]}


def test_one_dashboard_with_a_row_per_model_and_the_pipeline(serving):
    body = dashboard(serving)
    titles = [w["properties"].get("title") or w["properties"].get("markdown", "") for w in body["widgets"]]
    for model in (*LAMBDA, *GPU):
        row = [t for t in titles if t.startswith(f"{model}:")]
        assert len(row) == 4, (model, row)
    text = json.dumps(body)
    for needed in (
        "InferenceRequests", "InferenceServerErrors", "InferenceClientErrors", LATENCY_MS, "InferenceMs",
        "ColdStart", "SnapStartRestore", "ModelFetchMs", "ConcurrentExecutions", "Throttles",
        "NoCapacityInvocationFailures", "ModelLatency", "InvocationsPerCopy",
        "ApproximateNumberOfMessagesVisible", "ApproximateAgeOfOldestMessage", "PipelineOutput",
    ):  # fmt: skip
        assert needed in text, needed
    assert f'QueueName=\\"{PIPELINE_STACK}\\"' in text
    assert 'Resource=\\"/v2/models/iris/{proxy+}\\"' in text
    assert any(w["type"] == "alarm" for w in body["widgets"])


def test_per_model_metrics_carry_the_model_and_version(serving):
    text = json.dumps(dashboard(serving))
    assert (
        f'["{METRICS_NAMESPACE}", "InferenceRequests", "model", "iris", "service", "tierserve", "version", "3"'
        in text
    )


def test_each_lambda_model_has_its_four_alarms_and_each_gpu_model_three(serving):
    names = set(model_alarms(serving))
    for model in LAMBDA:
        for what in ("server-errors", "latency", "function-errors", "throttles"):
            assert f"{SERVING_STACK}-{model}-{what}" in names
    for model in GPU:
        for what in ("server-errors", "latency", "no-capacity"):
            assert f"{SERVING_STACK}-{model}-{what}" in names


def test_thresholds_come_from_context(serving):
    alarms = model_alarms(serving)
    latency = alarms[f"{SERVING_STACK}-iris-latency"]
    assert latency["Threshold"] == 150
    (guarded,) = [m for m in latency["Metrics"] if "Expression" in m]
    assert guarded["Expression"] == "IF(FILL(requests, 0) >= 5, latency, 0)"
    p99 = next(m for m in latency["Metrics"] if m["Id"] == "latency")["MetricStat"]
    assert (p99["Metric"]["MetricName"], p99["Stat"]) == (LATENCY_MS, "p99")
    assert alarms[f"{SERVING_STACK}-resnet-50-latency"]["Threshold"] == 1000  # the default budget
    assert alarms[f"{SERVING_STACK}-big-llm-latency"]["Threshold"] == 1000 * 1000  # ModelLatency is in μs
    errors = alarms[f"{SERVING_STACK}-iris-server-errors"]
    assert errors["Threshold"] == 2
    (rate,) = [m for m in errors["Metrics"] if "Expression" in m]
    assert rate["Expression"] == "IF(FILL(errors, 0) >= 3, 100 * FILL(errors, 0) / requests, 0)"
    dims = next(m for m in errors["Metrics"] if m["Id"] == "errors")["MetricStat"]["Metric"]["Dimensions"]
    assert {d["Name"]: d["Value"] for d in dims} == {"service": "tierserve", "model": "iris", "version": "3"}
    no_capacity = alarms[f"{SERVING_STACK}-big-llm-no-capacity"]
    assert no_capacity["EvaluationPeriods"] == no_capacity["DatapointsToAlarm"] == 10 + 5


def test_every_alarm_publishes_to_the_one_topic(templates, serving):
    (topic_id,) = of_type(serving, "AWS::SNS::Topic")
    for props in model_alarms(serving).values():
        assert props["AlarmActions"] == [{"Ref": topic_id}] and props["OKActions"] == [{"Ref": topic_id}]
    imported = {"Fn::ImportValue": TOPIC_EXPORT}
    for stack in (PIPELINE_STACK, STREAM_STACK):
        (alarm,) = of_type(templates[stack], "AWS::CloudWatch::Alarm").values()
        assert alarm["Properties"]["AlarmActions"] == [imported], stack
        assert of_type(templates[stack], "AWS::SNS::Topic") == {}
    assert serving["Outputs"]["AlarmTopicArn"]["Export"]["Name"] == TOPIC_EXPORT
    topics = [t for s in templates.values() for t in of_type(s, "AWS::SNS::Topic")]
    assert len(topics) == 1


def test_the_topic_is_encrypted_with_a_rotated_key_cloudwatch_may_use(serving):
    (topic,) = of_type(serving, "AWS::SNS::Topic").values()
    key_id = topic["Properties"]["KmsMasterKeyId"]["Fn::GetAtt"][0]
    key = serving["Resources"][key_id]["Properties"]
    assert key["EnableKeyRotation"] is True
    (statement,) = [
        s
        for s in key["KeyPolicy"]["Statement"]
        if s.get("Principal") == {"Service": "cloudwatch.amazonaws.com"}
    ]
    assert sorted(statement["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey*"]
    assert statement["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}
    (policy,) = of_type(serving, "AWS::SNS::TopicPolicy").values()
    (deny,) = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_without_alarm_email_synth_warns_that_nobody_is_told(stacks, serving):
    assert of_type(serving, "AWS::SNS::Subscription") == {}
    Annotations.from_stack(stacks.serving).has_warning(
        "/TierserveServing/Monitoring/Alarms", Match.string_like_regexp("nobody is told. Set alarm_email")
    )


def test_alarm_email_subscribes_to_the_topic_and_silences_the_warning(make_app, catalog):
    stacks = build(make_app, catalog, alarm_email="ops@example.com")
    template = stacks.serving.node.root.synth().get_stack_by_name(SERVING_STACK).template
    (subscription,) = of_type(template, "AWS::SNS::Subscription").values()
    assert (subscription["Properties"]["Protocol"], subscription["Properties"]["Endpoint"]) == (
        "email",
        "ops@example.com",
    )
    warnings = Annotations.from_stack(stacks.serving).find_warning(
        "*", Match.string_like_regexp("nobody is told")
    )
    assert warnings == []


@pytest.mark.parametrize(
    "context",
    [
        {"auth": "api_key", "stream": "iris", "alarm_email": "ops@example.com"},
        {"auth": "none", "waf": "false", "rollout": "all_at_once"},
    ],
)
def test_cdk_nag_is_clean_in_other_modes(make_app, catalog, context):
    app = build(make_app, catalog, **context).serving.node.root
    nag = AwsSolutionsChecks(app).validate_scope(app)
    assert nag.success is True, [
        (v.rule_name, [r.construct_path for r in v.violating_resources]) for v in nag.violations
    ]
