"""LambdaModelRoutes in a bare stack: every route of a Lambda-tier model to its own function."""

from __future__ import annotations

import aws_cdk as cdk
import pytest
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs

from infra.api import InferenceApi
from infra.lambda_routes import LambdaModelRoutes
from support.rest_api import integration_function, methods, route

MODELS = ("iris", "resnet-50")


def inline_function(stack: cdk.Stack, name: str) -> lambda_.Function:
    return lambda_.Function(
        stack,
        f"Fn-{name}",
        runtime=lambda_.Runtime.PYTHON_3_13,
        handler="index.handler",
        code=lambda_.Code.from_inline("def handler(event, context):\n    return {}\n"),
        description=name,
    )


@pytest.fixture(scope="module")
def stack(make_app) -> cdk.Stack:
    stack = cdk.Stack(make_app(), "LambdaRoutes")
    api = InferenceApi(
        stack,
        "Api",
        auth="iam",
        throttle_rate_limit=50,
        throttle_burst_limit=100,
        log_retention=logs.RetentionDays.ONE_MONTH,
    )
    for name in MODELS:
        LambdaModelRoutes(
            stack, f"{name}Routes", api=api, model_name=name, function=inline_function(stack, name)
        )
    return stack


@pytest.fixture(scope="module")
def template(stack, template_of):
    return template_of(stack)


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
    ],
)
def test_every_oip_route_of_a_lambda_model_reaches_its_resource(template, method, path, expected):
    assert route(template, method, path) == expected


def test_each_models_routes_invoke_its_own_function_by_proxy(template):
    table = methods(template)
    for name in MODELS:
        for key in (("GET", f"/v2/models/{name}"), ("ANY", f"/v2/models/{name}/{{proxy+}}")):
            integration = table[key]["Integration"]
            assert integration["Type"] == "AWS_PROXY"
            assert integration_function(template, table[key]) == name
            # The proxy hands the function the body as the caller sent it (base64 under */*).
            assert "ContentHandling" not in integration and "RequestTemplates" not in integration
        assert table[("ANY", f"/v2/models/{name}/{{proxy+}}")]["RequestParameters"] == {
            "method.request.path.proxy": True
        }


def test_api_gateway_may_invoke_each_function_only_from_its_own_routes(template, find):
    (stage_id,) = template.find_resources("AWS::ApiGateway::Stage")
    permissions = find(template, "AWS::Lambda::Permission")
    assert len(permissions) == 2 * len(MODELS), "one per method, no test-invoke permissions"
    by_function: dict[str, set[str]] = {}
    for permission in permissions:
        props = permission["Properties"]
        assert props["Principal"] == "apigateway.amazonaws.com"
        parts = props["SourceArn"]["Fn::Join"][1]
        assert {"Ref": stage_id} in parts, "this stage only"
        by_function.setdefault(props["FunctionName"]["Fn::GetAtt"][0], set()).add(parts[-1])
    assert sorted(by_function.values(), key=sorted) == [
        {f"/GET/v2/models/{name}", f"/*/v2/models/{name}/*"} for name in MODELS
    ]


def test_routes_expose_their_parts_and_register_the_model(stack):
    routes = [c for c in stack.node.children if isinstance(c, LambdaModelRoutes)]
    assert [r.model_name for r in routes] == list(MODELS)
    assert all(len(r.methods) == 2 and r.proxy_resource.path.endswith("/{proxy+}") for r in routes)
    api = next(c for c in stack.node.children if isinstance(c, InferenceApi))
    assert api.model_names == list(MODELS)
    with pytest.raises(ValueError, match="already has routes"):
        LambdaModelRoutes(
            stack, "Again", api=api, model_name="iris", function=stack.node.find_child("Fn-iris")
        )
