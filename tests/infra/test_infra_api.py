"""InferenceApi in a bare stack: OIP routes per model, mocks, errors in OIP shape, auth modes."""

from __future__ import annotations

import json
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk.assertions import Annotations, Match

from infra.api import InferenceApi

MODELS = ("iris", "resnet-50")


def build(make_app, *, auth: str = "iam", manage_cloudwatch_role: bool = True) -> cdk.Stack:
    stack = cdk.Stack(make_app(), f"Api{auth.title().replace('_', '')}")
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
        function = lambda_.Function(
            stack,
            f"Fn-{name}",
            runtime=lambda_.Runtime.PYTHON_3_13,
            handler="index.handler",
            code=lambda_.Code.from_inline("def handler(event, context):\n    return {}\n"),
            description=name,
        )
        api.add_lambda_model(name, function)
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


def paths(template) -> dict[str, str]:
    """Resource logical id -> full path, rebuilt from PathPart/ParentId (the root is '')."""
    parts = {k: r["Properties"] for k, r in template.find_resources("AWS::ApiGateway::Resource").items()}

    def path_of(ref: dict[str, Any]) -> str:
        if "Ref" not in ref:
            return ""  # Fn::GetAtt RestApi.RootResourceId
        props = parts[ref["Ref"]]
        return f"{path_of(props['ParentId'])}/{props['PathPart']}"

    return {logical_id: path_of({"Ref": logical_id}) for logical_id in parts}


def methods(template) -> dict[tuple[str, str], dict[str, Any]]:
    """(HTTP method, path) -> the method's properties."""
    by_id = paths(template)
    found = {}
    for method in template.find_resources("AWS::ApiGateway::Method").values():
        props = method["Properties"]
        resource = props["ResourceId"]
        path = by_id[resource["Ref"]] if "Ref" in resource else ""
        found[(props["HttpMethod"], path)] = props
    return found


def route(template, method: str, path: str) -> tuple[str, str]:
    """The (method, resource path) API Gateway picks for a request: static over variable
    segments, a greedy {proxy+} last, ANY when no exact method."""
    table = methods(template)
    resources = {tuple(p.strip("/").split("/")) for _, p in table}

    def score(candidate: tuple[str, ...]) -> tuple[int, ...] | None:
        segments = tuple(path.strip("/").split("/"))
        ranks = []
        for i, part in enumerate(candidate):
            if part == "{proxy+}":
                return (*ranks, 0) if len(segments) > i else None
            if i >= len(segments):
                return None
            if part == segments[i]:
                ranks.append(2)
            elif part.startswith("{"):
                ranks.append(1)
            else:
                return None
        return (*tuple(ranks), 3) if len(candidate) == len(segments) else None

    scored = [(score(c), c) for c in resources]
    best = max((s, c) for s, c in scored if s is not None)[1]
    resource = "/" + "/".join(best)
    return (method if (method, resource) in table else "ANY"), resource


def integration_function(template, props) -> str:
    """The Description of the function a Lambda proxy integration invokes."""
    uri = json.dumps(props["Integration"]["Uri"])
    functions = template.find_resources("AWS::Lambda::Function")
    (description,) = [f["Properties"]["Description"] for k, f in functions.items() if f'"{k}"' in uri]
    return description


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v2/models/iris", ("GET", "/v2/models/iris")),
        ("GET", "/v2/models/iris/ready", ("ANY", "/v2/models/iris/{proxy+}")),
        ("POST", "/v2/models/iris/infer", ("ANY", "/v2/models/iris/{proxy+}")),
        ("GET", "/v2/models/resnet-50/versions/1.2", ("ANY", "/v2/models/resnet-50/{proxy+}")),
        ("GET", "/v2/models/resnet-50/versions/1.2/ready", ("ANY", "/v2/models/resnet-50/{proxy+}")),
        ("POST", "/v2/models/resnet-50/versions/1.2/infer", ("ANY", "/v2/models/resnet-50/{proxy+}")),
        ("GET", "/v2/models/nope", ("GET", "/v2/models/{model}")),
        ("POST", "/v2/models/nope/versions/1/infer", ("ANY", "/v2/models/{model}/{proxy+}")),
        ("GET", "/v2/health/live", ("GET", "/v2/health/live")),
        ("GET", "/v2/health/ready", ("GET", "/v2/health/ready")),
        ("GET", "/v2", ("GET", "/v2")),
    ],
)
def test_every_oip_route_reaches_the_right_resource(iam_api, method, path, expected):
    assert route(iam_api, method, path) == expected


def test_each_models_routes_invoke_its_own_function(iam_api):
    table = methods(iam_api)
    for name in MODELS:
        for key in (("GET", f"/v2/models/{name}"), ("ANY", f"/v2/models/{name}/{{proxy+}}")):
            assert table[key]["Integration"]["Type"] == "AWS_PROXY"
            assert integration_function(iam_api, table[key]) == name


def test_the_model_list_is_on_the_api(iam_stack):
    api = next(c for c in iam_stack.node.children if isinstance(c, InferenceApi))
    assert api.model_names == list(MODELS)
    with pytest.raises(ValueError, match="already has routes"):
        api.add_model("iris", cdk.aws_apigateway.MockIntegration())


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
        assert "deployed: iris, resnet-50" in body["error"]
        request = props["Integration"]["RequestTemplates"]
        assert json.loads(request["application/json"]) == {"statusCode": 404}
        assert json.loads(request["application/octet-stream"]) == {"statusCode": 404}


def test_health_and_server_metadata_are_answered_without_a_function(iam_api):
    from tierserve.protocol import server_metadata

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


def test_binary_tensors_pass_as_binary(iam_api, find):
    (api,) = find(iam_api, "AWS::ApiGateway::RestApi")
    assert api["Properties"]["BinaryMediaTypes"] == ["application/octet-stream"]
    assert api["Properties"]["EndpointConfiguration"] == {"Types": ["REGIONAL"]}


def gateway_responses(template) -> dict[str, dict[str, Any]]:
    found = template.find_resources("AWS::ApiGateway::GatewayResponse").values()
    return {r["Properties"]["ResponseType"]: r["Properties"] for r in found}


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


def test_account_logging_role_is_inline_and_optional(iam_api, open_stack, template_of, find):
    (account,) = find(iam_api, "AWS::ApiGateway::Account")
    assert "CloudWatchRoleArn" in account["Properties"]
    trust = {"Statement": [Match.object_like({"Principal": {"Service": "apigateway.amazonaws.com"}})]}
    (role,) = find(iam_api, "AWS::IAM::Role", {"AssumeRolePolicyDocument": Match.object_like(trust)})
    assert "ManagedPolicyArns" not in role["Properties"]
    assert [p["PolicyName"] for p in role["Properties"]["Policies"]] == ["PushLogs"]
    assert role["DeletionPolicy"] == "Retain", "other APIs in the account keep logging"
    assert find(template_of(open_stack), "AWS::ApiGateway::Account") == []
