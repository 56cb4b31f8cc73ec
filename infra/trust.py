"""Service trust policies with confused-deputy protection.

A role that an AWS service assumes trusts that service for any account unless its trust
policy says otherwise: a caller in another account could name the role in its own API
integration, endpoint or function and have the service act with our permissions. Every role
the stacks create for a service principal therefore trusts it only on behalf of this stack's
account (``aws:SourceAccount``), and, where the service documents the ARN it presents when it
assumes a role, only for resources of that kind (``aws:SourceArn``). docs/architecture.md,
"Service trust", says which role carries which condition and why.
"""

from __future__ import annotations

from typing import Any

from aws_cdk import Stack
from aws_cdk import aws_iam as iam
from constructs import IConstruct

SOURCE_ACCOUNT = "aws:SourceAccount"
SOURCE_ARN = "aws:SourceArn"


def trust_conditions(scope: IConstruct, *, source_arn: str | None = None) -> dict[str, Any]:
    """The trust-policy conditions for a service role in ``scope``'s stack: ``aws:SourceAccount``
    is the stack's account, and ``aws:SourceArn`` is like ``source_arn`` when given."""
    conditions: dict[str, Any] = {"StringEquals": {SOURCE_ACCOUNT: Stack.of(scope).account}}
    if source_arn is not None:
        conditions["ArnLike"] = {SOURCE_ARN: source_arn}
    return conditions


def service_principal(
    scope: IConstruct, service: str, *, source_arn: str | None = None
) -> iam.ServicePrincipal:
    """``service`` (e.g. ``lambda.amazonaws.com``) as a role's trusted principal, acting only
    for ``scope``'s account (and ``source_arn``, when given).

    Example: ``iam.Role(self, "Role", assumed_by=service_principal(self, "lambda.amazonaws.com"))``.
    """
    return iam.ServicePrincipal(service, conditions=trust_conditions(scope, source_arn=source_arn))


def confine_trust(role: iam.Role) -> None:
    """Add the account condition to a role that CDK builds internally with a bare service
    principal (one statement), e.g. the handler role of ``Custom::S3BucketNotifications``."""
    cfn_role = role.node.default_child
    if not isinstance(cfn_role, iam.CfnRole):
        raise TypeError(f"{role.node.path} has no CfnRole to confine")
    cfn_role.add_property_override("AssumeRolePolicyDocument.Statement.0.Condition", trust_conditions(role))
