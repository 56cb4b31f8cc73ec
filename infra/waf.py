"""ApiFirewall: an AWS WAF web ACL in front of the API stage (context ``waf``, on by default).

Rules, cheapest first (WAF evaluates by priority and stops at the first block):

    0 PerClientIpRate          rate-based, per client IP: more than ``waf_rate_limit`` requests
                               in 5 minutes are blocked (429) until the rate falls again
    1 KnownBadInputs           AWS managed AWSManagedRulesKnownBadInputsRuleSet (Log4j, Java
                               deserialization, host-header tricks)
    2 CommonRuleSet            AWS managed AWSManagedRulesCommonRuleSet, with its body-size rule
                               SizeRestrictions_BODY set to count, not block

Why count, not exclude, the body-size rule: it blocks every body over 8 KB, and Open Inference
Protocol requests are routinely larger (a 1x3x224x224 FP32 image is 600 KB in binary, several MB
as JSON). Bodies are already bounded where they are read: API Gateway's 10 MB, then the
function's ``TIERSERVE_MAX_REQUEST_MB`` (a 413 naming the jobs route). Counting keeps the rule's
metric, so ops see how many requests it would have blocked; excluding it would hide them.

The other body rules of the common set stay blocking: WAF reads the first 16 KB of a body
(API Gateway's default inspection size) and JSON tensors are numbers, which match none of
them. A binary tensor body is arbitrary bytes; its chance to hold one of their patterns
(``<script``, ``../../``) is small but not nil: a caller that is refused with WAF's 403 shows
in the web ACL's sampled requests and in the ``CommonRuleSet`` metric, and that rule can be
set to count the same way (``COUNTED_RULES``).

Visibility: CloudWatch metrics and sampled requests for every rule and the ACL (namespace
``AWS/WAFV2``), and full logs to a log group named ``aws-waf-logs-…`` (the prefix WAF
requires) with the stacks' retention, ``authorization`` and ``x-api-key`` redacted.
"""

from __future__ import annotations

from aws_cdk import ArnFormat, RemovalPolicy, Stack
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_logs as logs
from aws_cdk import aws_wafv2 as wafv2
from constructs import Construct

RATE_WINDOW_SECONDS = 300  # WAF's default evaluation window for rate-based rules
# WAF's bounds for a rate-based rule's limit (requests per evaluation window).
MIN_RATE_LIMIT = 10
MAX_RATE_LIMIT = 2_000_000_000
# Rules of AWSManagedRulesCommonRuleSet that count instead of block (see the module docstring).
COUNTED_RULES = ("SizeRestrictions_BODY",)
# WAF logs every header; these carry credentials (SigV4 signatures, API keys).
REDACTED_HEADERS = ("authorization", "x-api-key")
WAF_LOG_GROUP_PREFIX = "aws-waf-logs-"  # WAF delivers only to log groups named so
WAF_METRICS_NAMESPACE = "AWS/WAFV2"


def _visibility(metric_name: str) -> wafv2.CfnWebACL.VisibilityConfigProperty:
    return wafv2.CfnWebACL.VisibilityConfigProperty(
        cloud_watch_metrics_enabled=True, metric_name=metric_name, sampled_requests_enabled=True
    )


def _managed_rule(
    name: str, priority: int, rule_group: str, counted: tuple[str, ...] = ()
) -> wafv2.CfnWebACL.RuleProperty:
    overrides = [
        wafv2.CfnWebACL.RuleActionOverrideProperty(
            name=rule, action_to_use=wafv2.CfnWebACL.RuleActionProperty(count={})
        )
        for rule in counted
    ]
    return wafv2.CfnWebACL.RuleProperty(
        name=name,
        priority=priority,
        statement=wafv2.CfnWebACL.StatementProperty(
            managed_rule_group_statement=wafv2.CfnWebACL.ManagedRuleGroupStatementProperty(
                vendor_name="AWS", name=rule_group, rule_action_overrides=overrides or None
            )
        ),
        override_action=wafv2.CfnWebACL.OverrideActionProperty(none={}),
        visibility_config=_visibility(name),
    )


def _rate_rule(name: str, priority: int, limit: int) -> wafv2.CfnWebACL.RuleProperty:
    return wafv2.CfnWebACL.RuleProperty(
        name=name,
        priority=priority,
        statement=wafv2.CfnWebACL.StatementProperty(
            rate_based_statement=wafv2.CfnWebACL.RateBasedStatementProperty(
                aggregate_key_type="IP", limit=limit, evaluation_window_sec=RATE_WINDOW_SECONDS
            )
        ),
        action=wafv2.CfnWebACL.RuleActionProperty(
            block=wafv2.CfnWebACL.BlockActionProperty(
                custom_response=wafv2.CfnWebACL.CustomResponseProperty(
                    response_code=429, custom_response_body_key="TooManyRequests"
                )
            )
        ),
        visibility_config=_visibility(name),
    )


class ApiFirewall(Construct):
    """A regional web ACL (the rules above) associated with ``stage``, and its logs.

    ``rate_limit``: requests per client IP per 5 minutes before WAF answers 429.

    Attributes: ``web_acl``, ``association``, ``log_group``, ``logging``, ``metric_name`` (the
    ACL's ``AWS/WAFV2`` metric name), ``rule_names``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        stage: apigw.Stage,
        rate_limit: int,
        log_retention: logs.RetentionDays,
    ) -> None:
        super().__init__(scope, construct_id)
        if not MIN_RATE_LIMIT <= rate_limit <= MAX_RATE_LIMIT:
            raise ValueError(f"a WAF rate limit is {MIN_RATE_LIMIT} to {MAX_RATE_LIMIT:,}, not {rate_limit}")
        self.metric_name = "TierserveApi"
        rules = [
            _rate_rule("PerClientIpRate", 0, rate_limit),
            _managed_rule("KnownBadInputs", 1, "AWSManagedRulesKnownBadInputsRuleSet"),
            _managed_rule("CommonRuleSet", 2, "AWSManagedRulesCommonRuleSet", COUNTED_RULES),
        ]
        self.rule_names = [rule.name for rule in rules]
        self.web_acl = wafv2.CfnWebACL(
            self,
            "WebAcl",
            scope="REGIONAL",
            description="tierserve API: per-IP rate limit, AWS managed known-bad-inputs and common rules",
            default_action=wafv2.CfnWebACL.DefaultActionProperty(allow={}),
            rules=rules,
            custom_response_bodies={
                "TooManyRequests": wafv2.CfnWebACL.CustomResponseBodyProperty(
                    content_type="APPLICATION_JSON",
                    content='{"error": "too many requests from this address; slow down and retry later"}',
                )
            },
            visibility_config=_visibility(self.metric_name),
        )
        self.association = wafv2.CfnWebACLAssociation(
            self, "Association", resource_arn=stage.stage_arn, web_acl_arn=self.web_acl.attr_arn
        )
        self.log_group = logs.LogGroup(
            self,
            "Logs",
            log_group_name=f"{WAF_LOG_GROUP_PREFIX}{Stack.of(self).stack_name}",
            retention=log_retention,
            removal_policy=RemovalPolicy.DESTROY,
        )
        # WAF wants the group's ARN without the ":*" that LogGroup.log_group_arn ends with.
        destination = Stack.of(self).format_arn(
            service="logs",
            resource="log-group",
            resource_name=self.log_group.log_group_name,
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        self.logging = wafv2.CfnLoggingConfiguration(
            self,
            "Logging",
            resource_arn=self.web_acl.attr_arn,
            log_destination_configs=[destination],
            redacted_fields=[
                wafv2.CfnLoggingConfiguration.FieldToMatchProperty(single_header={"Name": header})
                for header in REDACTED_HEADERS
            ],
        )
        self.logging.node.add_dependency(self.log_group)
