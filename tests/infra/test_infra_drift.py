"""Drift in the app: capture where the models context ``capture`` names are served (API
functions, GPU components), capture's
retention on the data bucket, and the scheduled drift job (rule, function, alarm) with least
privilege; cdk-nag clean."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cdk_nag import AwsSolutionsChecks

from app import main as app_main
from infra.config import InfraConfig
from infra.nag import add_aws_solutions_checks
from infra.stacks import PIPELINE_STACK, SERVING_STACK, STORAGE_STACK, build_stacks
from support.images import import_from_context
from tierserve.capture import CAPTURE_ENV
from tierserve.settings import DATA_BUCKET_ENV, MODELS_ENV

CAPTURE = {"iris": {"rate": 0.1, "outputs": False}}


def build(make_app, catalog, **context: Any):
    app = make_app(**context)
    build_stacks(app, config=InfraConfig.from_context(app.node.try_get_context), catalog=catalog)
    add_aws_solutions_checks(app)
    return app


@pytest.fixture(scope="module")
def app(make_app, catalog):
    return build(make_app, catalog, capture=CAPTURE, alarm_email="ops@example.com", drift_window_hours=6)


@pytest.fixture(scope="module")
def assembly(app):
    return app.synth()


@pytest.fixture(scope="module")
def templates(assembly) -> dict[str, dict[str, Any]]:
    return {
        name: assembly.get_stack_by_name(name).template
        for name in (STORAGE_STACK, SERVING_STACK, PIPELINE_STACK)
    }


def of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == kind}


def function_of(template: dict[str, Any], models: str) -> tuple[str, dict[str, Any]]:
    return next(
        (k, f)
        for k, f in of_type(template, "AWS::Lambda::Function").items()
        if f["Properties"].get("Environment", {}).get("Variables", {}).get(MODELS_ENV) == models
    )


def statements_of(template: dict[str, Any], function: dict[str, Any]) -> list[dict[str, Any]]:
    role = function["Properties"]["Role"]["Fn::GetAtt"][0]
    return [
        s
        for p in of_type(template, "AWS::IAM::Policy").values()
        if {"Ref": role} in p["Properties"]["Roles"]
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]


def s3_grants(statements: list[dict[str, Any]]) -> dict[str, str]:
    """S3 action -> the resources it is allowed on (as JSON text, to search)."""
    grants: dict[str, str] = {}
    for s in statements:
        for action in [s["Action"]] if isinstance(s["Action"], str) else s["Action"]:
            if action.startswith("s3:"):
                grants[action] = (
                    grants.get(action, "") + json.dumps(s["Resource"]) + json.dumps(s.get("Condition", {}))
                )
    return grants


def test_the_app_with_capture_is_cdk_nag_clean_with_reasons(app, assembly):
    nag = AwsSolutionsChecks(app).validate_scope(app)
    assert nag.success is True and nag.violations == []
    report = Path(assembly.directory) / "validation-report.json"
    assert not report.exists() or json.loads(report.read_text())["pluginReports"] == []


def test_only_the_named_models_api_function_captures_and_writes_only_its_prefix(templates):
    serving = templates[SERVING_STACK]
    _, iris = function_of(serving, "iris@3")
    variables = iris["Properties"]["Environment"]["Variables"]
    assert variables[CAPTURE_ENV] == "iris:0.1"
    assert DATA_BUCKET_ENV in variables
    grants = s3_grants(statements_of(serving, iris))
    assert "capture/iris/3/*" in grants["s3:PutObject"]
    assert "capture/*" not in grants["s3:PutObject"].replace("capture/iris/3/*", "")
    _, resnet = function_of(serving, "resnet-50@1.2")
    assert CAPTURE_ENV not in resnet["Properties"]["Environment"]["Variables"]
    assert "s3:PutObject" not in s3_grants(statements_of(serving, resnet))


def test_capture_expires_after_its_retention(templates, make_app, catalog):
    (bucket,) = [
        b
        for b in of_type(templates[STORAGE_STACK], "AWS::S3::Bucket").values()
        if "LifecycleConfiguration" in b["Properties"]
        and any(r.get("Prefix") == "capture/" for r in b["Properties"]["LifecycleConfiguration"]["Rules"])
    ]
    (rule,) = [
        r for r in bucket["Properties"]["LifecycleConfiguration"]["Rules"] if r.get("Prefix") == "capture/"
    ]
    assert rule["ExpirationInDays"] == 30 and rule["Status"] == "Enabled"
    other = build(make_app, catalog, capture=CAPTURE, capture_retention_days=7).synth()
    storage = other.get_stack_by_name(STORAGE_STACK).template
    rules = [
        r
        for b in of_type(storage, "AWS::S3::Bucket").values()
        for r in b["Properties"].get("LifecycleConfiguration", {}).get("Rules", [])
    ]
    assert {r["ExpirationInDays"] for r in rules if r.get("Prefix") == "capture/"} == {7}


def test_a_rule_runs_the_drift_function_every_window(templates):
    pipeline = templates[PIPELINE_STACK]
    key, function = function_of(pipeline, "iris@3")
    assert function["Properties"]["ImageConfig"]["Command"] == ["drift.handler"]
    variables = function["Properties"]["Environment"]["Variables"]
    assert variables["TIERSERVE_DRIFT_WINDOW_HOURS"] == "6"
    assert variables["TIERSERVE_DRIFT_PSI_THRESHOLD"] == "0.25"
    assert variables["TIERSERVE_DRIFT_MIN_ROWS"] == "100"
    (rule,) = of_type(pipeline, "AWS::Events::Rule").values()
    assert rule["Properties"]["ScheduleExpression"] == "rate(6 hours)"
    (target,) = rule["Properties"]["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": [key, "Arn"]}
    assert target["RetryPolicy"]["MaximumRetryAttempts"] == 2
    permissions = of_type(pipeline, "AWS::Lambda::Permission").values()
    assert any(p["Properties"]["Principal"] == "events.amazonaws.com" for p in permissions)


def test_each_captured_model_has_a_drift_alarm_that_mails_ops(templates):
    pipeline = templates[PIPELINE_STACK]
    alarms = [a["Properties"] for a in of_type(pipeline, "AWS::CloudWatch::Alarm").values()]
    (drift,) = [a for a in alarms if a.get("MetricName") == "DriftMaxPSI"]
    assert drift["Namespace"] == "Tierserve"
    assert {d["Name"]: d["Value"] for d in drift["Dimensions"]} == {
        "model": "iris",
        "version": "3",
        "service": "tierserve",
    }
    assert drift["Threshold"] == 0.25
    assert drift["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert drift["Statistic"] == "Maximum" and drift["Period"] == 6 * 3600
    assert drift["TreatMissingData"] == "notBreaching"
    assert drift["AlarmActions"] and drift["AlarmActions"] == drift["OKActions"]


def test_the_drift_function_reads_capture_and_baselines_and_writes_reports_only(templates):
    pipeline = templates[PIPELINE_STACK]
    _, function = function_of(pipeline, "iris@3")
    grants = s3_grants(statements_of(pipeline, function))
    assert set(grants) == {"s3:GetObject", "s3:ListBucket", "s3:PutObject"}
    assert "capture/*" in grants["s3:GetObject"]
    assert "models/iris/3/manifest.json" in grants["s3:GetObject"]
    assert "models/iris/3/baseline.json" in grants["s3:GetObject"]
    assert "models/iris/3/*" not in grants["s3:GetObject"]  # never the artifact
    assert "drift-reports/*" in grants["s3:PutObject"] and "capture" not in grants["s3:PutObject"]
    assert '"s3:prefix": ["capture/*"]' in grants["s3:ListBucket"]


def test_without_capture_there_is_no_drift_job(make_app, catalog):
    assembly = build(make_app, catalog).synth()
    pipeline = assembly.get_stack_by_name(PIPELINE_STACK).template
    assert of_type(pipeline, "AWS::Events::Rule") == {}
    commands = [
        f["Properties"].get("ImageConfig", {}) for f in of_type(pipeline, "AWS::Lambda::Function").values()
    ]
    assert {"Command": ["drift.handler"]} not in commands


def test_capture_of_a_model_the_catalog_lacks_stops_synth(make_app, tmp_path, catalog):
    catalog.save(tmp_path / "catalog.json")
    with pytest.raises(SystemExit, match="'capture' names nope, which the catalog does not hold"):
        app_main(make_app(catalog=str(tmp_path / "catalog.json"), capture="nope:0.1"))


def test_a_gpu_tier_model_captures_in_its_container_and_writes_only_its_prefix(make_app, catalog):
    app = build(make_app, catalog, capture="big-llm:0.5", alarm_email="ops@example.com")
    assembly = app.synth()
    serving = assembly.get_stack_by_name(SERVING_STACK).template
    [(_, model)] = [
        (k, m)
        for k, m in of_type(serving, "AWS::SageMaker::Model").items()
        if m["Properties"]["PrimaryContainer"]["Environment"][MODELS_ENV].startswith("big-llm@")
    ]
    variables = model["Properties"]["PrimaryContainer"]["Environment"]
    version = variables[MODELS_ENV].split("@")[1]
    assert variables[CAPTURE_ENV] == "big-llm:0.5" and DATA_BUCKET_ENV in variables
    role = model["Properties"]["ExecutionRoleArn"]["Fn::GetAtt"][0]
    statements = [
        s
        for p in of_type(serving, "AWS::IAM::Policy").values()
        if {"Ref": role} in p["Properties"]["Roles"]
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]
    puts = s3_grants(statements)["s3:PutObject"]
    assert f"capture/big-llm/{version}/*" in puts
    assert "capture/" not in puts.replace(f"capture/big-llm/{version}/*", "")
    others = [m for m in of_type(serving, "AWS::SageMaker::Model").values() if m is not model]
    assert all(CAPTURE_ENV not in m["Properties"]["PrimaryContainer"]["Environment"] for m in others)
    pipeline = assembly.get_stack_by_name(PIPELINE_STACK).template
    alarms = json.dumps(of_type(pipeline, "AWS::CloudWatch::Alarm"))
    assert "big-llm" in alarms  # the drift job checks it, and alarms on it
    nag = AwsSolutionsChecks(app).validate_scope(app)
    assert nag.success is True and nag.violations == []
    report = Path(assembly.directory) / "validation-report.json"
    rules = (
        {v["ruleName"] for p in json.loads(report.read_text())["pluginReports"] for v in p["violations"]}
        if report.exists()
        else set()
    )
    assert not {r for r in rules if "capture" in r}


def test_the_image_context_holds_what_the_drift_handler_imports(app, assembly):
    (asset_dir,) = {
        p for p in Path(assembly.directory).glob("asset.*") if (p / "functions/inference").is_dir()
    }
    imported = import_from_context(
        asset_dir,
        "functions/inference",
        ["drift", "api"],
        {
            "TIERSERVE_MODELS": "iris@3",
            "TIERSERVE_MODEL_BUCKET": "models-b",
            "TIERSERVE_DATA_BUCKET": "data-b",
        },
    )
    assert "tierserve.drift.job" in imported["loaded"] and "tierserve.capture" in imported["loaded"]
    assert not [m for m in imported["loaded"] if m.startswith("tierserve.tools")]
