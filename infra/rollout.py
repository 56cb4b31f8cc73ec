"""Rolling out a model's new default version, and rolling it back when its alarms go off.

Lambda tier: every caller invokes the function's alias ``live`` (infra/tierserve_function.py).
A new default version in the catalog changes the function (its ``TIERSERVE_MODELS``), so the
deploy publishes a new Lambda version; a CodeDeploy deployment group on the alias then moves
``live`` to it gradually, by the model's strategy (context ``rollout``, per model
``rollout_overrides``), and moves it back by itself when one of the model's rollback alarms
goes off (infra/monitoring.py: 5xx share, p99 latency, the alias's failed invocations), when
the deployment fails, or when someone stops it. CloudFormation waits for the deployment: the
stack update succeeds with the new version at 100%, or fails and rolls back with it at 0%.

GPU tier: a new default version is a new SageMaker Model, and the inference component's
specification changes in place; its ``DeploymentConfig`` makes that a rolling update (a batch
of copies at a time, a wait between batches while SageMaker watches the alarms, an automatic
rollback of every copy when one of the model's rollback alarms goes off). aws-cdk-lib 2.275's
``CfnInferenceComponent`` has ``deployment_config`` (no escape hatch needed).

Strategies (CodeDeploy's predefined Lambda configs, by name; the GPU tier's batch and wait
follow them):

    canary10_5min ... canary10_30min   10% first, the rest after 5 (10, 15, 30) minutes
    linear10_1min ... linear10_10min   10% more every 1 (2, 3, 10) minutes
    all_at_once                        everything at once (alarms can still roll back after)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_codedeploy as codedeploy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

from infra.nag import acknowledge
from infra.trust import service_principal

CODEDEPLOY_LAMBDA_POLICY_NAME = "AWSCodeDeployRoleForLambdaLimited"
CODEDEPLOY_LAMBDA_POLICY = (
    f"arn:<AWS::Partition>:iam::aws:policy/service-role/{CODEDEPLOY_LAMBDA_POLICY_NAME}"
)
# SageMaker's bounds for a rolling update: a batch is 5% to 50% of the copies, a deployment
# takes at most 8 hours, a wait at most an hour.
GPU_MIN_BATCH_PERCENT = 5
GPU_MAX_BATCH_PERCENT = 50
GPU_MIN_TIMEOUT_SECONDS = 600
GPU_MAX_TIMEOUT_SECONDS = 28_800


@dataclass(frozen=True)
class Strategy:
    """How a new version takes traffic: the first (and each later) step's share in percent, and
    the wait between steps; ``linear`` steps by ``percent`` until done, a canary in one more."""

    name: str
    percent: int
    wait: Duration
    linear: bool = False

    @property
    def lambda_config(self) -> codedeploy.ILambdaDeploymentConfig:
        return _LAMBDA_CONFIGS[self.name]()

    @property
    def gpu_batch_percent(self) -> int:
        """Copies per rolling batch, within SageMaker's 5-50% (all at once is its 50%)."""
        return max(GPU_MIN_BATCH_PERCENT, min(GPU_MAX_BATCH_PERCENT, self.percent))


STRATEGIES: dict[str, Strategy] = {
    **{f"canary10_{m}min": Strategy(f"canary10_{m}min", 10, Duration.minutes(m)) for m in (5, 10, 15, 30)},
    **{
        f"linear10_{m}min": Strategy(f"linear10_{m}min", 10, Duration.minutes(m), linear=True)
        for m in (1, 2, 3, 10)
    },
    "all_at_once": Strategy("all_at_once", 100, Duration.seconds(0)),
}
_LAMBDA_CONFIGS = {
    "canary10_5min": lambda: codedeploy.LambdaDeploymentConfig.CANARY_10_PERCENT_5_MINUTES,
    "canary10_10min": lambda: codedeploy.LambdaDeploymentConfig.CANARY_10_PERCENT_10_MINUTES,
    "canary10_15min": lambda: codedeploy.LambdaDeploymentConfig.CANARY_10_PERCENT_15_MINUTES,
    "canary10_30min": lambda: codedeploy.LambdaDeploymentConfig.CANARY_10_PERCENT_30_MINUTES,
    "linear10_1min": lambda: codedeploy.LambdaDeploymentConfig.LINEAR_10_PERCENT_EVERY_1_MINUTE,
    "linear10_2min": lambda: codedeploy.LambdaDeploymentConfig.LINEAR_10_PERCENT_EVERY_2_MINUTES,
    "linear10_3min": lambda: codedeploy.LambdaDeploymentConfig.LINEAR_10_PERCENT_EVERY_3_MINUTES,
    "linear10_10min": lambda: codedeploy.LambdaDeploymentConfig.LINEAR_10_PERCENT_EVERY_10_MINUTES,
    "all_at_once": lambda: codedeploy.LambdaDeploymentConfig.ALL_AT_ONCE,
}


def strategy(name: str) -> Strategy:
    """The strategy named ``name`` (a context value, already validated)."""
    return STRATEGIES[name]


class LambdaRollouts(Construct):
    """One CodeDeploy application and service role for the stack's Lambda-tier models, and a
    deployment group per model (:meth:`add`). Attributes: ``application``, ``role``, ``groups``
    (model name -> group)."""

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.application = codedeploy.LambdaApplication(self, "Application")
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=service_principal(self, "codedeploy.amazonaws.com"),
            description="tierserve: CodeDeploy shifts the models' live aliases and reads their alarms",
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name(
                    f"service-role/{CODEDEPLOY_LAMBDA_POLICY_NAME}"
                )
            ],
        )
        acknowledge(
            self.role,
            f"AwsSolutions-IAM4[Policy::{CODEDEPLOY_LAMBDA_POLICY}]",
            "CodeDeploy's service role for Lambda deployments: AWSCodeDeployRoleForLambdaLimited lets it "
            "read the alias, move its weights and read the alarms, and nothing more (AWS's narrowest policy "
            "for Lambda deployments).",
        )
        self.groups: dict[str, codedeploy.LambdaDeploymentGroup] = {}

    def add(
        self, model: str, *, alias: lambda_.Alias, strategy: Strategy, alarms: Sequence[cloudwatch.IAlarm]
    ) -> codedeploy.LambdaDeploymentGroup:
        """Shift ``alias`` to each new version of ``model``'s function by ``strategy``, rolling
        back when any of ``alarms`` goes off."""
        group = codedeploy.LambdaDeploymentGroup(
            self,
            model,
            application=self.application,
            alias=alias,
            deployment_config=strategy.lambda_config,
            alarms=list(alarms),
            role=self.role,
            auto_rollback=codedeploy.AutoRollbackConfig(
                failed_deployment=True, stopped_deployment=True, deployment_in_alarm=True
            ),
        )
        self.groups[model] = group
        return group


def gpu_rolling_update(
    component: sagemaker.CfnInferenceComponent,
    *,
    strategy: Strategy,
    alarms: Sequence[cloudwatch.Alarm],
    startup_timeout: Duration,
) -> sagemaker.CfnInferenceComponent.InferenceComponentDeploymentConfigProperty:
    """Give ``component`` a rolling update by ``strategy``, rolled back when any of ``alarms``
    goes off: batches of ``strategy.gpu_batch_percent`` of the copies, each started (up to
    ``startup_timeout``) and then watched for ``strategy.wait``; a rollback restores every old
    copy at once. Returns the configuration it set."""
    batches = -(-100 // strategy.gpu_batch_percent)
    per_batch = int(startup_timeout.to_seconds() + strategy.wait.to_seconds())
    timeout = max(GPU_MIN_TIMEOUT_SECONDS, min(GPU_MAX_TIMEOUT_SECONDS, batches * per_batch))
    config = sagemaker.CfnInferenceComponent.InferenceComponentDeploymentConfigProperty(
        rolling_update_policy=sagemaker.CfnInferenceComponent.InferenceComponentRollingUpdatePolicyProperty(
            maximum_batch_size=sagemaker.CfnInferenceComponent.InferenceComponentCapacitySizeProperty(
                type="CAPACITY_PERCENT", value=strategy.gpu_batch_percent
            ),
            wait_interval_in_seconds=int(strategy.wait.to_seconds()),
            maximum_execution_timeout_in_seconds=timeout,
            rollback_maximum_batch_size=sagemaker.CfnInferenceComponent.InferenceComponentCapacitySizeProperty(
                type="CAPACITY_PERCENT", value=100
            ),
        ),
        auto_rollback_configuration=sagemaker.CfnInferenceComponent.AutoRollbackConfigurationProperty(
            alarms=[sagemaker.CfnInferenceComponent.AlarmProperty(alarm_name=a.alarm_name) for a in alarms]
        ),
    )
    component.deployment_config = config
    return config
