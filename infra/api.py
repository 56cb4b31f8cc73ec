"""InferenceApi: the REST API shell that speaks the Open Inference Protocol for every model.

The shell is the stage (throttling, tracing, access and execution logs with retention), the
auth mode and its usage plan, the routes no model owns, and API Gateway's own errors in OIP
shape. Models plug in through two route constructs, each keyword-only and composed by the
serving stack:

    GET  /v2, /v2/health/live, /v2/health/ready        mock integrations (no function runs)
    ANY  /v2/models/{model}[/...]  (unknown models)     mock 404 naming the deployed models
    ANY  /v2/models/{name}[/...]                        LambdaModelRoutes (infra/lambda_routes.py)
    GET/POST /v2/models/{name}[/versions/{v}]/...       SageMakerModelRoutes (infra/sagemaker_routes.py)

Each deployed model gets a static ``{name}`` resource (:meth:`InferenceApi.add_model_resource`),
so API Gateway never runs a function for a model it does not serve. A sibling variable
resource answers every other model name with an OIP 404 instead of API Gateway's default 403
"Missing Authentication Token".

Errors raised by API Gateway itself (auth, throttling, timeouts, unknown paths) are gateway
responses rewritten into the OIP shape ``{"error": "..."}``. With IAM auth, an unsigned
request and a request for a path that does not exist are the same gateway response
(MISSING_AUTHENTICATION_TOKEN), raised before routing; it stays a 403 whose message names
both causes, rather than a 404 that would send a caller with a missing signature hunting for
a typo. With ``api_key`` or ``none`` it can only mean an unknown path and becomes a 404.

Bodies: ``binaryMediaTypes`` is :data:`tierserve.protocol.BINARY_MEDIA_TYPES` (``*/*``), so
every request body reaches an integration as the bytes the caller sent. Mock integrations
convert both ways to text (``CONVERT_TO_TEXT``), which keeps their mapping templates working
(docs/architecture.md, "Binary bodies").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsii
from aws_cdk import Annotations, ArnFormat, IResolvable, IResolveContext, RemovalPolicy, Token
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.config import API_GATEWAY_TIMEOUT_SECONDS, AuthMode
from infra.nag import acknowledge, wildcard_resource_finding
from infra.trust import service_principal
from infra.waf import ApiFirewall
from tierserve.protocol import BINARY_MEDIA_TYPES, ROUTE_HELP, server_metadata

# Content types a mock integration accepts; others get a 415 through DEFAULT_4XX.
MOCK_CONTENT_TYPES = ("application/json", "application/octet-stream")
ERROR_TEMPLATE = '{"error": $context.error.messageString}'
MAX_LISTED_MODELS = 20  # in the unknown-model 404; keeps the message readable
# API Gateway writes a stage's execution logs here, creating the group (without retention)
# unless it exists: the API creates it first, with retention.
EXECUTION_LOG_GROUP = "API-Gateway-Execution-Logs_{api_id}/{stage}"


@dataclass(frozen=True)
class KeyLimits:
    """What each API key may do under ``auth=api_key`` (the usage plan's throttle and quota are
    per key): ``rate_limit`` requests/s, ``burst_limit``, and ``quota`` requests per
    ``quota_period`` (``DAY``, ``WEEK`` or ``MONTH``; a quota of 0 is none)."""

    rate_limit: float
    burst_limit: int
    quota: int = 0
    quota_period: str = "DAY"


def error_body(message: str) -> str:
    """An OIP error body, ``{"error": message}``, as a mapping template that outputs it."""
    return json.dumps({"error": message})


def vtl_safe_json(document: Any) -> str:
    """``document`` as JSON that a mapping template outputs as it is: ``$`` and ``#`` (VTL's
    references and directives) can only occur inside JSON strings, where their unicode
    escapes mean the same to every JSON reader."""
    return json.dumps(document).replace("$", "\\u0024").replace("#", "\\u0023")


@jsii.implements(IResolvable)
class _UnknownModelTemplate:
    """The 404 body for a model this API does not serve, listing the models it does.

    A token resolved at synth, so models added after the API was built are listed too (an
    ``IResolvable``: jsii cannot call a Python ``Lazy`` producer on every path CDK resolves
    it). The path parameter is escaped for JSON; escapeJavaScript also turns ' into \\',
    which JSON rejects, so the template undoes that.
    """

    def __init__(self, api: InferenceApi) -> None:
        self._api = api

    @property
    def creation_stack(self) -> list[str]:
        return []

    @property
    def type_hint(self) -> None:
        return None

    def to_string(self) -> str:
        return "tierserve-unknown-model-template"

    def resolve(self, context: IResolveContext) -> str:
        names = self._api.model_names
        if names:
            deployed = ", ".join(names[:MAX_LISTED_MODELS])
            if len(names) > MAX_LISTED_MODELS:
                deployed += f" and {len(names) - MAX_LISTED_MODELS} more"
            hint = f"GET /v2/models/{names[0]} for a deployed model's metadata (deployed: {deployed})"
        else:
            hint = "no models are deployed yet (add them to the catalog and redeploy)"
        return (
            "#set($model = $util.escapeJavaScript($input.params('model')).replaceAll(\"\\\\'\", \"'\"))\n"
            + json.dumps({"error": f"model '$model' is not deployed here; {hint}"})
        )


class InferenceApi(Construct):
    """The OIP REST API shell: stage, auth, usage plan, gateway responses, health and the
    unknown-model 404. Route constructs add models through :meth:`add_model_resource`,
    :meth:`add_method` and :meth:`add_mock`, which apply this API's auth mode and validator.

    ``key_limits`` throttle each API key and give it a quota (api_key auth; without them the
    plan is throttled like the stage). ``waf_rate_limit`` puts an :class:`~infra.waf.ApiFirewall`
    on the stage with that per-IP limit (requests per 5 minutes); None: no web ACL.

    Attributes: ``rest_api``, ``stage``, ``url``, ``access_log_group``,
    ``execution_log_group``, ``auth``, ``api_key`` and ``usage_plan`` (api_key auth only,
    else None), ``firewall`` (None without WAF), ``models_resource`` (``/v2/models``).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        auth: AuthMode,
        throttle_rate_limit: float,
        throttle_burst_limit: int,
        log_retention: logs.RetentionDays,
        manage_cloudwatch_role: bool = True,
        stage_name: str = "prod",
        key_limits: KeyLimits | None = None,
        waf_rate_limit: int | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.auth = auth
        self._models: dict[str, apigw.Resource] = {}

        self.access_log_group = logs.LogGroup(self, "AccessLogs", retention=log_retention)
        self.rest_api = apigw.RestApi(
            self,
            "RestApi",
            description="tierserve: Open Inference Protocol (KServe v2) for every deployed model",
            endpoint_types=[apigw.EndpointType.REGIONAL],
            binary_media_types=list(BINARY_MEDIA_TYPES),
            cloud_watch_role=False,
            deploy_options=apigw.StageOptions(
                stage_name=stage_name,
                throttling_rate_limit=throttle_rate_limit,
                throttling_burst_limit=throttle_burst_limit,
                tracing_enabled=True,
                metrics_enabled=True,
                logging_level=apigw.MethodLoggingLevel.ERROR,
                data_trace_enabled=False,
                access_log_destination=apigw.LogGroupLogDestination(self.access_log_group),
                access_log_format=_access_log_format(),
            ),
        )
        # The stack outputs the URL under a readable name; drop RestApi's hashed duplicate.
        self.rest_api.node.try_remove_child("Endpoint")
        self.stage = self.rest_api.deployment_stage
        self.url = self.rest_api.url
        self.execution_log_group = logs.LogGroup(
            self,
            "ExecutionLogs",
            log_group_name=EXECUTION_LOG_GROUP.format(api_id=self.rest_api.rest_api_id, stage=stage_name),
            retention=log_retention,
        )
        self.stage.node.add_dependency(self.execution_log_group)
        if manage_cloudwatch_role:
            self._account_logging_role()
        self._validator = self.rest_api.add_request_validator(
            "Validator", validate_request_body=True, validate_request_parameters=True
        )

        self.api_key: apigw.IApiKey | None = None
        self.usage_plan: apigw.UsagePlan | None = None
        if auth == "api_key":
            limits = key_limits or KeyLimits(rate_limit=throttle_rate_limit, burst_limit=throttle_burst_limit)
            self.usage_plan = self.rest_api.add_usage_plan(
                "UsagePlan",
                description="tierserve callers: each API key throttled, and within its quota",
                throttle=apigw.ThrottleSettings(rate_limit=limits.rate_limit, burst_limit=limits.burst_limit),
                quota=apigw.QuotaSettings(limit=limits.quota, period=apigw.Period[limits.quota_period])
                if limits.quota
                else None,
                api_stages=[apigw.UsagePlanPerApiStage(api=self.rest_api, stage=self.stage)],
            )
            self.api_key = self.rest_api.add_api_key("ApiKey", description="tierserve caller key")
            self.usage_plan.add_api_key(self.api_key)

        self.firewall: ApiFirewall | None = None
        if waf_rate_limit is not None:
            self.firewall = ApiFirewall(
                self, "Firewall", stage=self.stage, rate_limit=waf_rate_limit, log_retention=log_retention
            )
        self.models_resource = self._add_server_routes()
        self._add_gateway_responses()
        self._acknowledge_auth_rules()

    # ---- what route constructs use --------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        """The models with routes, in the order they were added."""
        return list(self._models)

    def add_model_resource(self, name: str) -> apigw.Resource:
        """``/v2/models/{name}``, registered so the unknown-model 404 lists ``name``.

        Raises ValueError for a model that already has routes.
        """
        if name in self._models:
            raise ValueError(f"model {name!r} already has routes in this API")
        resource = self.models_resource.add_resource(name)
        self._models[name] = resource
        return resource

    def add_method(
        self,
        resource: apigw.IResource,
        http_method: str,
        integration: apigw.Integration,
        *,
        method_responses: list[apigw.MethodResponse] | None = None,
        request_parameters: dict[str, bool] | None = None,
    ) -> apigw.Method:
        """Add a method with this API's auth mode and request validator."""
        return resource.add_method(
            http_method,
            integration,
            authorization_type=apigw.AuthorizationType.IAM
            if self.auth == "iam"
            else apigw.AuthorizationType.NONE,
            api_key_required=self.auth == "api_key",
            request_validator=self._validator,
            request_parameters=request_parameters,
            method_responses=method_responses,
        )

    def add_mock(self, resource: apigw.IResource, http_method: str, status: int, body: str) -> apigw.Method:
        """A method that answers ``status`` with the JSON mapping template ``body``, no backend.

        Both directions convert to text: under the ``*/*`` binary media type every body is
        binary, which a mock cannot take (API Gateway answers 500) and which would turn the
        rendered JSON into base64-decoded bytes on the way out.
        """
        integration = apigw.MockIntegration(
            request_templates={ct: json.dumps({"statusCode": status}) for ct in MOCK_CONTENT_TYPES},
            passthrough_behavior=apigw.PassthroughBehavior.NEVER,
            content_handling=apigw.ContentHandling.CONVERT_TO_TEXT,
            integration_responses=[
                apigw.IntegrationResponse(
                    status_code=str(status),
                    response_templates={"application/json": body},
                    content_handling=apigw.ContentHandling.CONVERT_TO_TEXT,
                )
            ],
        )
        responses = [
            apigw.MethodResponse(
                status_code=str(status), response_models={"application/json": apigw.Model.EMPTY_MODEL}
            )
        ]
        return self.add_method(resource, http_method, integration, method_responses=responses)

    # ---- construction -------------------------------------------------------------------

    def _add_server_routes(self) -> apigw.Resource:
        """Health and server metadata; returns ``/v2/models``, where model routes go."""
        v2 = self.rest_api.root.add_resource("v2")
        self.add_mock(v2, "GET", 200, json.dumps(server_metadata()))
        health = v2.add_resource("health")
        self.add_mock(health.add_resource("live"), "GET", 200, json.dumps({"live": True}))
        self.add_mock(health.add_resource("ready"), "GET", 200, json.dumps({"ready": True}))

        models = v2.add_resource("models")
        unknown = models.add_resource("{model}")
        not_found = Token.as_string(_UnknownModelTemplate(self))
        self.add_mock(unknown, "GET", 404, not_found)
        self.add_mock(unknown.add_resource("{proxy+}"), "ANY", 404, not_found)
        return models

    def _add_gateway_responses(self) -> None:
        if self.auth == "iam":
            unrouted_status = "403"
            unrouted_body = error_body(
                "the request is not signed, or no route matches its path: this API needs requests signed "
                f"with AWS SigV4 (service 'execute-api', auth mode 'iam'); {ROUTE_HELP}"
            )
        else:
            unrouted_status = "404"
            unrouted_body = error_body(f"no route matches this path; {ROUTE_HELP}")
        responses = {
            "MissingToken": (apigw.ResponseType.MISSING_AUTHENTICATION_TOKEN, unrouted_status, unrouted_body),
            "NotFound": (
                apigw.ResponseType.RESOURCE_NOT_FOUND,
                "404",
                error_body(f"no route matches this path; {ROUTE_HELP}"),
            ),
            "TooLarge": (
                apigw.ResponseType.REQUEST_TOO_LARGE,
                "413",
                error_body(
                    "the request body is over API Gateway's 10 MB limit; send tensors with the binary "
                    "tensor data extension, split the batch, or send it as an async job: POST "
                    "/v2/models/{model}/jobs with no body answers an upload URL for inputs of any size"
                ),
            ),
            "Timeout": (
                apigw.ResponseType.INTEGRATION_TIMEOUT,
                "504",
                error_body(
                    f"the model did not answer within API Gateway's {API_GATEWAY_TIMEOUT_SECONDS} s limit; "
                    "retry (the first request may load the model), or send a smaller batch"
                ),
            ),
            "Default4xx": (apigw.ResponseType.DEFAULT_4_XX, None, ERROR_TEMPLATE),
            "Default5xx": (apigw.ResponseType.DEFAULT_5_XX, None, ERROR_TEMPLATE),
        }
        for response_id, (response_type, status, template) in responses.items():
            self.rest_api.add_gateway_response(
                response_id,
                type=response_type,
                status_code=status,
                templates={"application/json": template},
            )

    def _account_logging_role(self) -> None:
        """The account's API Gateway CloudWatch role, which execution and access logs need.

        An inline policy scoped to this account and region instead of the AWS managed
        AmazonAPIGatewayPushToCloudWatchLogs. The setting is one per account and region:
        turn ``api_cloudwatch_role`` off where another stack already manages it. Retained,
        so deleting this stack does not break other APIs' logging.
        """
        log_groups_arn = self.rest_api.stack.format_arn(
            service="logs", resource="log-group", resource_name="*", arn_format=ArnFormat.COLON_RESOURCE_NAME
        )
        role = iam.Role(
            self,
            "CloudWatchRole",
            assumed_by=service_principal(self, "apigateway.amazonaws.com"),
            description="API Gateway account setting: push execution and access logs to CloudWatch Logs",
            inline_policies={
                "PushLogs": iam.PolicyDocument(
                    statements=[
                        iam.PolicyStatement(
                            actions=[
                                "logs:CreateLogGroup",
                                "logs:CreateLogStream",
                                "logs:DescribeLogGroups",
                                "logs:DescribeLogStreams",
                                "logs:PutLogEvents",
                            ],
                            resources=[log_groups_arn],
                        )
                    ]
                )
            },
        )
        role.apply_removal_policy(RemovalPolicy.RETAIN)
        account = apigw.CfnAccount(self, "Account", cloud_watch_role_arn=role.role_arn)
        account.apply_removal_policy(RemovalPolicy.RETAIN)
        self.rest_api.deployment_stage.node.add_dependency(account)
        acknowledge(
            role,
            wildcard_resource_finding(role, log_groups_arn),
            "The account-wide API Gateway role writes execution logs to groups API Gateway names per "
            "API and stage (API-Gateway-Execution-Logs_{api-id}/{stage}) and access logs to each API's "
            "group, for every API in the account and region; scoped to this account and region.",
        )

    def _acknowledge_auth_rules(self) -> None:
        if self.auth == "iam":
            reason = (
                "Callers are AWS principals authorized by IAM (SigV4, context auth=iam), not end "
                "users with Cognito tokens."
            )
        elif self.auth == "api_key":
            reason = (
                "Callers are identified by API key and usage plan (context auth=api_key); "
                "use auth=iam for IAM-authorized callers."
            )
        else:
            reason = (
                "Context auth=none deliberately leaves this API open (a warning says so at synth); "
                "use auth=iam or auth=api_key for anything reachable by others."
            )
        acknowledge(self.rest_api, "AwsSolutions-COG4", reason)
        if self.firewall is None:
            acknowledge(
                self.stage,
                "AwsSolutions-APIG3",
                "Context waf=false turned the web ACL off: stage throttling (context throttle_rate_limit "
                "and throttle_burst_limit) caps every caller, and with auth=iam or auth=api_key API "
                "Gateway rejects unauthenticated requests before any integration runs. Keep waf=true "
                "(the default) when the API is reachable by others.",
            )
        if self.auth != "iam":
            acknowledge(self.rest_api, "AwsSolutions-APIG4", reason)
        if self.auth == "none":
            Annotations.of(self).add_warning_v2(
                "tierserve:apiWithoutAuth",
                "context auth=none: every model in this API can be called by anyone on the internet who "
                "finds its URL (only throttling limits them). Use auth=iam (the default) or auth=api_key.",
            )


def _access_log_format() -> apigw.AccessLogFormat:
    """One JSON object per request. The error message goes in as ``messageString``, which
    API Gateway quotes and escapes itself, so a message with quotes cannot break the line."""
    fields = json.dumps(
        {
            "requestId": "$context.requestId",
            "extendedRequestId": "$context.extendedRequestId",
            "requestTime": "$context.requestTime",
            "ip": "$context.identity.sourceIp",
            "caller": "$context.identity.caller",
            "userArn": "$context.identity.userArn",
            "apiKeyId": "$context.identity.apiKeyId",
            "httpMethod": "$context.httpMethod",
            "resourcePath": "$context.resourcePath",
            "path": "$context.path",
            "protocol": "$context.protocol",
            "status": "$context.status",
            "responseLength": "$context.responseLength",
            "responseLatency": "$context.responseLatency",
            "integrationLatency": "$context.integrationLatency",
            "integrationStatus": "$context.integrationStatus",
            "errorType": "$context.error.responseType",
            "xrayTraceId": "$context.xrayTraceId",
        }
    )
    return apigw.AccessLogFormat.custom(fields[:-1] + ', "errorMessage": $context.error.messageString}')
