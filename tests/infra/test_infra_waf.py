"""ApiFirewall on the API stage, and per-key limits of the usage plan: synthesized in a bare
stack (the shell) and in the real app (context ``waf``, ``waf_rate_limit``, ``api_key_*``)."""

from __future__ import annotations

import aws_cdk as cdk
import pytest
from aws_cdk import aws_logs as logs
from cdk_nag import AwsSolutionsChecks

from infra.api import InferenceApi, KeyLimits
from infra.waf import COUNTED_RULES, REDACTED_HEADERS


def shell(make_app, *, auth: str = "iam", waf_rate_limit: int | None = 2000, key_limits=None) -> cdk.Stack:
    stack = cdk.Stack(make_app(), "Shell")
    api = InferenceApi(
        stack,
        "Api",
        auth=auth,
        throttle_rate_limit=50,
        throttle_burst_limit=100,
        log_retention=logs.RetentionDays.ONE_MONTH,
        key_limits=key_limits,
        waf_rate_limit=waf_rate_limit,
    )
    api.add_model_resource("iris")
    return stack


@pytest.fixture(scope="module")
def firewalled(make_app):
    return shell(make_app, waf_rate_limit=1500)


@pytest.fixture(scope="module")
def template(firewalled, template_of):
    return template_of(firewalled)


def rules_by_name(template) -> dict:
    (acl,) = template.find_resources("AWS::WAFv2::WebACL").values()
    return {rule["Name"]: rule for rule in acl["Properties"]["Rules"]}


def test_the_web_acl_is_regional_allows_by_default_and_is_associated_with_the_stage(template, find):
    (acl,) = find(template, "AWS::WAFv2::WebACL")
    assert acl["Properties"]["Scope"] == "REGIONAL"
    assert acl["Properties"]["DefaultAction"] == {"Allow": {}}
    (association,) = find(template, "AWS::WAFv2::WebACLAssociation")
    (stage_id,) = template.find_resources("AWS::ApiGateway::Stage")
    (api_id,) = template.find_resources("AWS::ApiGateway::RestApi")
    arn = association["Properties"]["ResourceArn"]["Fn::Join"][1]
    assert {"Ref": api_id} in arn and {"Ref": stage_id} in arn and "/stages/" in arn
    (acl_id,) = template.find_resources("AWS::WAFv2::WebACL")
    assert association["Properties"]["WebACLArn"] == {"Fn::GetAtt": [acl_id, "Arn"]}


def test_managed_rule_sets_with_the_body_size_rule_counted(template):
    rules = rules_by_name(template)
    common = rules["CommonRuleSet"]["Statement"]["ManagedRuleGroupStatement"]
    assert (common["VendorName"], common["Name"]) == ("AWS", "AWSManagedRulesCommonRuleSet")
    assert common["RuleActionOverrides"] == [
        {"Name": name, "ActionToUse": {"Count": {}}} for name in COUNTED_RULES
    ]
    assert "SizeRestrictions_BODY" in COUNTED_RULES
    bad = rules["KnownBadInputs"]["Statement"]["ManagedRuleGroupStatement"]
    assert bad["Name"] == "AWSManagedRulesKnownBadInputsRuleSet" and "RuleActionOverrides" not in bad
    for name in ("CommonRuleSet", "KnownBadInputs"):
        assert rules[name]["OverrideAction"] == {"None": {}}  # the groups' own actions block


def test_a_rate_rule_per_client_ip_from_context_answers_429(template):
    rule = rules_by_name(template)["PerClientIpRate"]
    statement = rule["Statement"]["RateBasedStatement"]
    assert statement == {"AggregateKeyType": "IP", "Limit": 1500, "EvaluationWindowSec": 300}
    assert rule["Action"]["Block"]["CustomResponse"]["ResponseCode"] == 429
    assert rule["Priority"] == min(r["Priority"] for r in rules_by_name(template).values())


def test_every_rule_has_metrics_and_the_acl_logs_with_credentials_redacted(template, find):
    (acl,) = find(template, "AWS::WAFv2::WebACL")
    configs = [
        acl["Properties"]["VisibilityConfig"],
        *(r["VisibilityConfig"] for r in rules_by_name(template).values()),
    ]
    for config in configs:
        assert config["CloudWatchMetricsEnabled"] is True and config["SampledRequestsEnabled"] is True
    (logging,) = find(template, "AWS::WAFv2::LoggingConfiguration")
    redacted = [field["SingleHeader"]["Name"] for field in logging["Properties"]["RedactedFields"]]
    assert redacted == list(REDACTED_HEADERS)
    groups = [
        g
        for g in find(template, "AWS::Logs::LogGroup")
        if "aws-waf-logs-" in str(g["Properties"].get("LogGroupName"))
    ]
    assert len(groups) == 1 and groups[0]["Properties"]["RetentionInDays"] == 30


def acknowledged_rules(app: cdk.App) -> set[str]:
    return {
        key.removeprefix("Annotation::")
        for construct in app.node.find_all()
        for entry in construct.node.metadata
        if entry.type == "aws:cdk:acknowledged-rules"
        for key in entry.data
    }


def test_with_the_firewall_apig3_is_met_not_acknowledged(firewalled):
    app = firewalled.node.root
    assert "AwsSolutions-APIG3" not in acknowledged_rules(app)
    assert_no_nag_findings(app)


def assert_no_nag_findings(app) -> None:
    nag = AwsSolutionsChecks(app).validate_scope(app)
    assert nag.success is True, [v.rule_name for v in nag.violations]


def test_without_waf_there_is_no_web_acl_and_apig3_is_acknowledged_with_its_reason(
    make_app, template_of, find
):
    stack = shell(make_app, waf_rate_limit=None)
    template = template_of(stack)
    assert find(template, "AWS::WAFv2::WebACL") == []
    assert "AwsSolutions-APIG3" in acknowledged_rules(stack.node.root)
    assert_no_nag_findings(stack.node.root)


def test_rate_limits_outside_wafs_range_are_refused(make_app):
    with pytest.raises(ValueError, match="rate limit"):
        shell(make_app, waf_rate_limit=5)


def test_each_api_key_is_throttled_and_has_a_quota(make_app, template_of, find):
    stack = shell(
        make_app,
        auth="api_key",
        key_limits=KeyLimits(rate_limit=5, burst_limit=10, quota=1000, quota_period="WEEK"),
    )
    (plan,) = find(template_of(stack), "AWS::ApiGateway::UsagePlan")
    assert plan["Properties"]["Throttle"] == {"RateLimit": 5, "BurstLimit": 10}
    assert plan["Properties"]["Quota"] == {"Limit": 1000, "Period": "WEEK"}


def test_a_quota_of_zero_is_none(make_app, template_of, find):
    stack = shell(make_app, auth="api_key", key_limits=KeyLimits(rate_limit=5, burst_limit=10, quota=0))
    (plan,) = find(template_of(stack), "AWS::ApiGateway::UsagePlan")
    assert "Quota" not in plan["Properties"]


def test_the_app_puts_waf_and_key_limits_from_context(make_app, catalog, find):
    from infra.config import InfraConfig
    from infra.stacks import build_stacks

    app = make_app(auth="api_key", waf_rate_limit=300, api_key_quota=50, api_key_quota_period="month")
    config = InfraConfig.from_context(app.node.try_get_context)
    stacks = build_stacks(app, config=config, catalog=catalog)
    template = cdk.assertions.Template.from_stack(stacks.serving)
    (acl,) = find(template, "AWS::WAFv2::WebACL")
    assert acl["Properties"]["Rules"][0]["Statement"]["RateBasedStatement"]["Limit"] == 300
    (plan,) = find(template, "AWS::ApiGateway::UsagePlan")
    assert plan["Properties"]["Quota"] == {"Limit": 50, "Period": "MONTH"}
    assert plan["Properties"]["Throttle"] == {"RateLimit": 10, "BurstLimit": 20}

    off = make_app(waf="false")
    stacks = build_stacks(off, config=InfraConfig.from_context(off.node.try_get_context), catalog=catalog)
    assert find(cdk.assertions.Template.from_stack(stacks.serving), "AWS::WAFv2::WebACL") == []
