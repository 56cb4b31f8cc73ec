"""InferenceApi (the shell) in a bare stack: stage, auth modes, usage plan, gateway responses,
health mocks, the unknown-model 404, logs with retention, and bodies kept byte for byte."""

from __future__ import annotations

import json
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_logs as logs
from aws_cdk.assertions import Annotations, Match, Template

from infra.api import EXECUTION_LOG_GROUP, InferenceApi
from support.rest_api import gateway_responses, methods, mock_integrations, route
from tierserve.protocol import BINARY_MEDIA_TYPES, server_metadata

MODELS = ("iris", "resnet-50", "big-llm")


def build(make_app, *, auth: str = "iam", manage_cloudwatch_role: bool = True) -> cdk.Stack:
    stack = cdk.Stack(make_app(), f"Shell{auth.title().replace('_', '')}")
    api = InferenceApi(
        stack,
        "Api",
        auth=auth,
        throttle_rate_limit=50,
        throttle_burst_limit=100,
        log_retention=logs.RetentionDays.ONE_MONTH,
        manage_cloudwatch_role=manage_cloudwatch_role,
    )
    for name in MODELS:
        api.add_model_resource(name)
    return stack


@pytest.fixture(scope="module")
def iam_stack(make_app):
    return build(make_app)


@pytest.fixture(scope="module")
def iam_api(iam_stack, template_of):
    return template_of(iam_stack)


@pytest.fixture(scope="module")
def api_key_api(make_app, template_of):
    return template_of(build(make_app, auth="api_key"))


@pytest.fixture(scope="module")
def open_stack(make_app):
    return build(make_app, auth="none", manage_cloudwatch_role=False)


def the_api(stack: cdk.Stack) -> InferenceApi:
    return next(c for c in stack.node.children if isinstance(c, InferenceApi))


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v2/health/live", ("GET", "/v2/health/live")),
        ("GET", "/v2/health/ready", ("GET", "/v2/health/ready")),
        ("GET", "/v2", ("GET", "/v2")),
        ("GET", "/v2/models/nope", ("GET", "/v2/models/{model}")),
        ("POST", "/v2/models/nope/versions/1/infer", ("ANY", "/v2/models/{model}/{proxy+}")),
    ],
)
def test_routes_no_model_owns(iam_api, method, path, expected):
    assert route(iam_api, method, path) == expected


def test_model_resources_are_registered_once(iam_stack, iam_api):
    api = the_api(iam_stack)
    assert api.model_names == list(MODELS)
    with pytest.raises(ValueError, match="already has routes"):
        api.add_model_resource("iris")
    parts = {
        r["Properties"]["PathPart"] for r in iam_api.find_resources("AWS::ApiGateway::Resource").values()
    }
    assert set(MODELS) <= parts


def render_unknown_model(template_text: str, model: str) -> dict[str, Any]:
    """Apply the VTL the way API Gateway would for a plain model name."""
    first, _, body = template_text.partition("\n")
    assert first.startswith("#set($model = $util.escapeJavaScript($input.params('model'))")
    return json.loads(body.replace("$model", model))


def test_unknown_models_get_an_oip_404_naming_the_deployed_ones(iam_api):
    table = methods(iam_api)
    for key in (("GET", "/v2/models/{model}"), ("ANY", "/v2/models/{model}/{proxy+}")):
        props = table[key]
        assert props["Integration"]["Type"] == "MOCK"
        (response,) = props["Integration"]["IntegrationResponses"]
        assert response["StatusCode"] == "404"
        assert [r["StatusCode"] for r in props["MethodResponses"]] == ["404"]
        body = render_unknown_model(response["ResponseTemplates"]["application/json"], "nope")
        assert body["error"].startswith("model 'nope' is not deployed here; GET /v2/models/iris")
        assert "deployed: iris, resnet-50, big-llm" in body["error"]
        request = props["Integration"]["RequestTemplates"]
        assert json.loads(request["application/json"]) == {"statusCode": 404}
        assert json.loads(request["application/octet-stream"]) == {"statusCode": 404}


def test_health_and_server_metadata_are_answered_without_a_function(iam_api):
    table = methods(iam_api)
    expected = {
        "/v2": server_metadata(),
        "/v2/health/live": {"live": True},
        "/v2/health/ready": {"ready": True},
    }
    for path, body in expected.items():
        props = table[("GET", path)]
        assert props["Integration"]["Type"] == "MOCK"
        (response,) = props["Integration"]["IntegrationResponses"]
        assert response["StatusCode"] == "200"
        assert json.loads(response["ResponseTemplates"]["application/json"]) == body
    assert server_metadata() == {
        "name": "tierserve",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }


def test_every_request_body_is_binary_and_passes_byte_for_byte(iam_api, find):
    """*/* matches every Content-Type (and requests without one): API Gateway hands every
    body on as the caller's bytes, and a Lambda proxy gets it base64-encoded."""
    (api,) = find(iam_api, "AWS::ApiGateway::RestApi")
    assert api["Properties"]["BinaryMediaTypes"] == ["*/*"] == list(BINARY_MEDIA_TYPES)
    assert api["Properties"]["EndpointConfiguration"] == {"Types": ["REGIONAL"]}


def test_mocks_convert_both_ways_to_text(iam_api):
    """Under */* every body is binary: a mock cannot take one (API Gateway answers 500), and
    its rendered JSON would be base64-decoded on the way out for any Accept. CONVERT_TO_TEXT
    on the request and on the response keeps the templates working."""
    mocks = mock_integrations(iam_api)
    assert len(mocks) == 5  # /v2, live, ready, and the unknown model's two
    for integration in mocks:
        assert integration["ContentHandling"] == "CONVERT_TO_TEXT"
        assert integration["PassthroughBehavior"] == "NEVER"
        for response in integration["IntegrationResponses"]:
            assert response["ContentHandling"] == "CONVERT_TO_TEXT"


def test_iam_auth_and_the_validator_on_every_method(iam_api):
    (validator_id,) = iam_api.find_resources(
        "AWS::ApiGateway::RequestValidator",
        {"Properties": {"ValidateRequestBody": True, "ValidateRequestParameters": True}},
    )
    for props in methods(iam_api).values():
        assert props["AuthorizationType"] == "AWS_IAM"
        assert props.get("ApiKeyRequired") in (None, False)
        assert props["RequestValidatorId"] == {"Ref": validator_id}


def test_stage_throttles_traces_and_logs(iam_api, find):
    (stage,) = find(iam_api, "AWS::ApiGateway::Stage")
    props = stage["Properties"]
    (setting,) = props["MethodSettings"]
    assert setting["HttpMethod"] == "*" and setting["ResourcePath"] == "/*"
    assert (setting["ThrottlingRateLimit"], setting["ThrottlingBurstLimit"]) == (50, 100)
    assert setting["MetricsEnabled"] is True
    assert setting["LoggingLevel"] == "ERROR"
    assert props["TracingEnabled"] is True
    line = props["AccessLogSetting"]["Format"]
    # What API Gateway writes: $context.error.messageString arrives already quoted.
    access_log = json.loads(line.replace("$context.error.messageString", '"Forbidden"'))
    assert access_log["requestId"] == "$context.requestId"
    assert access_log["status"] == "$context.status"
    assert access_log["errorMessage"] == "Forbidden"


def test_access_and_execution_logs_expire(iam_api):
    """API Gateway creates API-Gateway-Execution-Logs_{api}/{stage} without retention unless it
    exists: the stack creates it first (the stage waits for it), with the configured days."""
    groups = iam_api.find_resources("AWS::Logs::LogGroup")
    assert [g["Properties"]["RetentionInDays"] for g in groups.values()] == [30, 30]
    (api_id,) = iam_api.find_resources("AWS::ApiGateway::RestApi")
    named = {k: g for k, g in groups.items() if "LogGroupName" in g["Properties"]}
    ((execution_id, execution),) = named.items()
    prefix, stage = EXECUTION_LOG_GROUP.split("{api_id}")
    assert execution["Properties"]["LogGroupName"] == {
        "Fn::Join": ["", [prefix, {"Ref": api_id}, stage.format(stage="prod")]]
    }
    (stage_resource,) = iam_api.find_resources("AWS::ApiGateway::Stage").values()
    assert execution_id in stage_resource["DependsOn"]
    (access_id,) = set(groups) - {execution_id}
    assert json.dumps(access_id) in json.dumps(stage_resource["Properties"]["AccessLogSetting"])


def test_gateway_errors_are_oip_json(iam_api):
    responses = gateway_responses(iam_api)
    for default in ("DEFAULT_4XX", "DEFAULT_5XX"):
        assert responses[default]["ResponseTemplates"] == {
            "application/json": '{"error": $context.error.messageString}'
        }
        assert "StatusCode" not in responses[default], "each error keeps its own status"
    assert responses["RESOURCE_NOT_FOUND"]["StatusCode"] == "404"
    for response_type in ("RESOURCE_NOT_FOUND", "REQUEST_TOO_LARGE", "INTEGRATION_TIMEOUT"):
        body = json.loads(responses[response_type]["ResponseTemplates"]["application/json"])
        assert set(body) == {"error"}
    too_large = json.loads(responses["REQUEST_TOO_LARGE"]["ResponseTemplates"]["application/json"])
    assert "POST /v2/models/{model}/jobs" in too_large["error"]  # where a large input goes


def test_with_iam_a_missing_signature_stays_403_and_says_both_causes(iam_api):
    response = gateway_responses(iam_api)["MISSING_AUTHENTICATION_TOKEN"]
    assert response["StatusCode"] == "403"
    message = json.loads(response["ResponseTemplates"]["application/json"])["error"]
    assert "not signed" in message and "no route" in message and "SigV4" in message


def test_without_iam_an_unknown_path_is_a_404(api_key_api):
    response = gateway_responses(api_key_api)["MISSING_AUTHENTICATION_TOKEN"]
    assert response["StatusCode"] == "404"
    assert json.loads(response["ResponseTemplates"]["application/json"])["error"].startswith("no route")


def test_api_key_mode_requires_a_key_and_throttles_the_plan(api_key_api, find):
    for props in methods(api_key_api).values():
        assert props["ApiKeyRequired"] is True
        assert props["AuthorizationType"] == "NONE"
    (plan,) = find(api_key_api, "AWS::ApiGateway::UsagePlan")
    assert plan["Properties"]["Throttle"] == {"RateLimit": 50, "BurstLimit": 100}
    assert len(plan["Properties"]["ApiStages"]) == 1
    assert len(find(api_key_api, "AWS::ApiGateway::ApiKey")) == 1
    assert len(find(api_key_api, "AWS::ApiGateway::UsagePlanKey")) == 1


def test_no_auth_is_open_and_says_so_loudly(open_stack, template_of, find):
    template = template_of(open_stack)
    for props in methods(template).values():
        assert props["AuthorizationType"] == "NONE"
        assert props.get("ApiKeyRequired") in (None, False)
    assert find(template, "AWS::ApiGateway::ApiKey") == []
    Annotations.from_stack(open_stack).has_warning("*", Match.string_like_regexp("auth=none"))


def test_account_logging_role_is_inline_optional_and_for_this_account(iam_api, open_stack, template_of, find):
    (account,) = find(iam_api, "AWS::ApiGateway::Account")
    assert "CloudWatchRoleArn" in account["Properties"]
    (role,) = find(iam_api, "AWS::IAM::Role", {"Policies": [Match.object_like({"PolicyName": "PushLogs"})]})
    (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "apigateway.amazonaws.com"}
    assert trust["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}
    assert "ManagedPolicyArns" not in role["Properties"]
    assert [p["PolicyName"] for p in role["Properties"]["Policies"]] == ["PushLogs"]
    (statement,) = role["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    assert sorted(statement["Action"]) == [  # writes only: nothing that reads the logs back
        "logs:CreateLogGroup",
        "logs:CreateLogStream",
        "logs:DescribeLogGroups",
        "logs:DescribeLogStreams",
        "logs:PutLogEvents",
    ]
    assert role["DeletionPolicy"] == "Retain", "other APIs in the account keep logging"
    assert find(template_of(open_stack), "AWS::ApiGateway::Account") == []


def test_a_shell_without_models_says_none_are_deployed(make_app):
    stack = cdk.Stack(make_app(), "Empty")
    InferenceApi(
        stack,
        "Api",
        auth="iam",
        throttle_rate_limit=1,
        throttle_burst_limit=1,
        log_retention=logs.RetentionDays.ONE_DAY,
    )
    props = methods(Template.from_stack(stack))[("GET", "/v2/models/{model}")]
    text = props["Integration"]["IntegrationResponses"][0]["ResponseTemplates"]["application/json"]
    assert "no models are deployed yet" in render_unknown_model(text, "x")["error"]
