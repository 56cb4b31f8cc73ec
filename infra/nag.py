"""cdk-nag acknowledgments, each with a reason, and the finding ids they need.

cdk-nag 3 runs as a CDK validation plugin (``Validations.of(app).add_plugins(...)``) and
reads acknowledgments that ``Validations.of(construct).acknowledge(...)`` records on the
construct or any of its parents. Rules that report one finding per resource or action
(IAM5) are acknowledged per finding, ``RuleId[Resource::<flattened arn>]``; the flattened
form is computed here from the ARN token, never typed by hand, so an acknowledgment cannot
drift from the policy it excuses.
"""

from __future__ import annotations

import json
from typing import Any

from aws_cdk import Acknowledgment, Stack, Stage, Validations
from aws_cdk import aws_iam as iam
from cdk_nag import AwsSolutionsChecks
from constructs import IConstruct

MIN_REASON_LENGTH = 40


def acknowledge(scope: IConstruct, rule_id: str, reason: str) -> None:
    """Acknowledge ``rule_id`` on ``scope`` and everything under it, for ``reason``.

    Raises ValueError for a reason too short to tell a reviewer why the rule does not apply.
    """
    if len(reason.strip()) < MIN_REASON_LENGTH:
        raise ValueError(f"acknowledging {rule_id} needs a real reason, not {reason!r}")
    Validations.of(scope).acknowledge(Acknowledgment(id=rule_id, reason=reason))


def wildcard_resource_finding(scope: IConstruct, arn: str) -> str:
    """The AwsSolutions-IAM5 finding id cdk-nag reports for ``arn`` in ``scope``'s stack.

    Example: ``AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:s3:::bucket/models/iris/*]``.
    The ARN must resolve in ``scope``'s own stack (an imported value, not a reference that
    CDK turns into an export later), or the finding differs from what cdk-nag sees.
    """
    return f"AwsSolutions-IAM5[Resource::{flatten_cfn_reference(Stack.of(scope).resolve(arn))}]"


def policy_wildcard_findings(policy: iam.Policy) -> list[str]:
    """The AwsSolutions-IAM5 finding ids of every wildcard resource in ``policy`` (a policy CDK
    writes itself, whose ARNs no construct of ours holds), computed from its document."""
    document = Stack.of(policy).resolve(policy.document)
    findings = []
    for statement in document.get("Statement", []):
        resources = statement.get("Resource", [])
        for resource in resources if isinstance(resources, list) else [resources]:
            flat = flatten_cfn_reference(resource)
            if "*" in flat:
                findings.append(f"AwsSolutions-IAM5[Resource::{flat}]")
    return findings


def flatten_cfn_reference(node: Any) -> str:
    """cdk-nag's flattening of a resolved CloudFormation value (``utils/flatten-cfn-reference``).

    ``Ref`` and ``Fn::GetAtt`` become ``<Name>`` and ``<Name.Attr>``, ``Fn::Join`` is joined,
    ``Fn::ImportValue`` is the export name, ``${x}`` in strings becomes ``<x>``.
    """
    if node is None:
        return ""
    if isinstance(node, str):
        return node.replace("${", "<").replace("}", ">")
    if isinstance(node, dict):
        if "Fn::Join" in node:
            delimiter, items = node["Fn::Join"]
            return delimiter.join(flatten_cfn_reference(item) for item in items)
        if "Fn::Sub" in node:
            return flatten_cfn_reference(node["Fn::Sub"])
        if "Fn::GetAtt" in node:
            resource, attribute = node["Fn::GetAtt"]
            return f"<{flatten_cfn_reference(resource)}.{flatten_cfn_reference(attribute)}>"
        if "Fn::ImportValue" in node:
            return flatten_cfn_reference(node["Fn::ImportValue"])
        if "Ref" in node:
            return f"<{flatten_cfn_reference(node['Ref'])}>"
    return json.dumps(node, separators=(",", ":"))


def add_aws_solutions_checks(app: Stage) -> None:
    """Run cdk-nag's AwsSolutions pack on everything in ``app`` when it synthesizes.

    An unacknowledged error fails synthesis; the report lands in the cloud assembly as
    ``validation-report.json``.
    """
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))
