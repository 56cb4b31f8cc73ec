"""Async jobs in the app: every model's jobs routes to one jobs function, behind the API's auth;
the function's and the worker's grants exact on jobs/; the data bucket's lifecycle for jobs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from infra.config import InfraConfig
from infra.stacks import SERVING_STACK, STORAGE_STACK, build_stacks
from tierserve.settings import DATA_BUCKET_ENV, JOBS_URL_EXPIRES_S_ENV, MAX_INPUT_MB_ENV, MODELS_ENV

MODELS = {"iris": "3", "resnet-50": "1.2", "big-llm": "7", "tiny-on-gpu": "1"}  # conftest's catalog


@pytest.fixture(scope="module")
def assembly(make_app, catalog):
    app = make_app(jobs_expiry_days=5, jobs_url_expiry_seconds=600, max_input_mb=128, auth="iam")
    build_stacks(app, config=InfraConfig.from_context(app.node.try_get_context), catalog=catalog)
    return app.synth()


@pytest.fixture(scope="module")
def serving(assembly) -> dict[str, Any]:
    return assembly.get_stack_by_name(SERVING_STACK).template


def of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == kind}


def jobs_function(template: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    (found,) = [
        (k, f)
        for k, f in of_type(template, "AWS::Lambda::Function").items()
        if f["Properties"]["ImageConfig"]["Command"] == ["jobs.handler"]
    ]
    return found


def paths(template: dict[str, Any]) -> dict[str, str]:
    """Each API resource's logical id -> its full path."""
    resources = of_type(template, "AWS::ApiGateway::Resource")

    def path_of(key: str) -> str:
        props = resources[key]["Properties"]
        parent = props["ParentId"]
        prefix = path_of(parent["Ref"]) if isinstance(parent, dict) and "Ref" in parent else ""
        return f"{prefix}/{props['PathPart']}"

    return {key: path_of(key) for key in resources}


def test_every_model_of_both_tiers_has_its_jobs_routes_on_the_one_jobs_function(serving):
    function_id, _ = jobs_function(serving)
    (alias_id,) = [
        k
        for k, a in of_type(serving, "AWS::Lambda::Alias").items()
        if a["Properties"]["FunctionName"] == {"Ref": function_id}
    ]
    by_path = paths(serving)
    routes = {}
    for method in of_type(serving, "AWS::ApiGateway::Method").values():
        props = method["Properties"]
        uri = json.dumps(props["Integration"].get("Uri", ""))
        if alias_id in uri:  # the routes invoke the function's alias
            routes[(props["HttpMethod"], by_path[props["ResourceId"]["Ref"]])] = props
    expected = set()
    for name, version in MODELS.items():
        expected |= {
            ("POST", f"/v2/models/{name}/jobs"),
            ("GET", f"/v2/models/{name}/jobs/{{id}}"),
            ("POST", f"/v2/models/{name}/versions/{version}/jobs"),
        }
    assert set(routes) == expected
    for props in routes.values():
        assert props["AuthorizationType"] == "AWS_IAM"  # auth like every other route
        assert props["Integration"]["Type"] == "AWS_PROXY"


def test_the_lambda_tier_routes_everything_else_under_versions_to_the_model(serving):
    by_path = paths(serving)
    methods = [m["Properties"] for m in of_type(serving, "AWS::ApiGateway::Method").values()]
    iris = {by_path[m["ResourceId"]["Ref"]]: m for m in methods if m["HttpMethod"] == "ANY"}
    for path in ("/versions", "/versions/{proxy+}", "/versions/3", "/versions/3/{proxy+}", "/{proxy+}"):
        integration = json.dumps(iris[f"/v2/models/iris{path}"]["Integration"]["Uri"])
        assert "LambdaModelsiris" in integration, path


def test_the_jobs_function_names_every_model_and_its_limits(serving):
    _, function = jobs_function(serving)
    env = function["Properties"]["Environment"]["Variables"]
    assert env[MODELS_ENV] == ",".join(f"{name}@{version}" for name, version in MODELS.items())
    assert env[JOBS_URL_EXPIRES_S_ENV] == "600" and env[MAX_INPUT_MB_ENV] == "128"
    assert "TierserveStorage-DataStore-BucketName" in json.dumps(env[DATA_BUCKET_ENV])


def statements_of(template: dict[str, Any], role_id: str) -> list[dict[str, Any]]:
    found = []
    for policy in of_type(template, "AWS::IAM::Policy").values():
        if {"Ref": role_id} in policy["Properties"]["Roles"]:
            found += policy["Properties"]["PolicyDocument"]["Statement"]
    return found


def _keys(statement: dict[str, Any]) -> list[str]:
    """The key patterns a statement names in the data bucket ("" for the bucket itself)."""
    resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
    keys = []
    for resource in resources:
        parts = resource["Fn::Join"][1]  # ["arn:", partition, ":s3:::", {bucket import}, "/jobs/..."]
        assert "TierserveStorage-DataStore-BucketName" in json.dumps(parts)
        keys.append(parts[-1] if isinstance(parts[-1], str) and parts[-1].startswith("/") else "")
    return keys


def test_the_jobs_functions_grants_are_exactly_the_jobs_prefix(serving):
    _, function = jobs_function(serving)
    role_id = function["Properties"]["Role"]["Fn::GetAtt"][0]
    s3_statements = [s for s in statements_of(serving, role_id) if str(s["Action"]).count("s3:")]
    granted = {}
    for statement in s3_statements:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for key in _keys(statement):
            granted.setdefault(key, set()).update(actions)
            if "s3:ListBucket" in actions:
                assert statement["Condition"] == {"StringLike": {"s3:prefix": ["jobs/*"]}}
    assert granted == {
        "/jobs/*/job.json": {"s3:PutObject", "s3:GetObject"},
        "/jobs/*/input.*": {"s3:PutObject", "s3:GetObject"},
        "/jobs/*/output.json": {"s3:GetObject"},
        "/jobs/*/error.json": {"s3:GetObject"},
        "": {"s3:ListBucket"},  # the bucket, listed under jobs/ only
    }


def test_jobs_expire_by_the_data_buckets_lifecycle(assembly):
    storage = assembly.get_stack_by_name(STORAGE_STACK).template
    buckets = of_type(storage, "AWS::S3::Bucket")
    (data,) = [b for k, b in buckets.items() if k.startswith("DataStore")]
    rules = {rule.get("Id"): rule for rule in data["Properties"]["LifecycleConfiguration"]["Rules"]}
    expire = rules["jobs-expire"]
    assert expire["Prefix"] == "jobs/" and expire["ExpirationInDays"] == 5 and expire["Status"] == "Enabled"
    assert expire["NoncurrentVersionExpiration"] == {"NoncurrentDays": 1}
    assert rules["jobs-delete-markers"] == {
        "Id": "jobs-delete-markers",
        "Prefix": "jobs/",
        "ExpiredObjectDeleteMarker": True,
        "Status": "Enabled",
    }
    assert "CorsConfiguration" not in data["Properties"]  # no browser uploads: docs/architecture.md


def test_api_gateway_may_invoke_the_jobs_alias_for_the_jobs_routes_only(serving):
    function_id, _ = jobs_function(serving)
    (alias_id,) = [
        k
        for k, a in of_type(serving, "AWS::Lambda::Alias").items()
        if a["Properties"]["FunctionName"] == {"Ref": function_id}
    ]
    permissions = [
        p["Properties"]
        for p in of_type(serving, "AWS::Lambda::Permission").values()
        if p["Properties"]["FunctionName"] == {"Ref": alias_id}
    ]
    assert {p["Principal"] for p in permissions} == {"apigateway.amazonaws.com"}
    # arn:...:execute-api:REGION:ACCOUNT:{api}/{stage}/METHOD/PATH
    tails = sorted(p["SourceArn"]["Fn::Join"][1][-1].lstrip("/") for p in permissions)
    assert tails == ["GET/v2/models/*/jobs/*", "POST/v2/models/*/jobs", "POST/v2/models/*/versions/*/jobs"]
