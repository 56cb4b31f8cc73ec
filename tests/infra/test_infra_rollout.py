"""Rolling out in the real app: a CodeDeploy deployment group per Lambda-tier model on its
``live`` alias, with the strategy from context and the model's alarms as rollback alarms; a
rolling update with automatic rollback on each GPU-tier model's component; cdk-nag clean."""

from __future__ import annotations

from typing import Any

import pytest
from cdk_nag import AwsSolutionsChecks

from infra.config import ConfigError, InfraConfig
from infra.rollout import _LAMBDA_CONFIGS, STRATEGIES
from infra.stacks import SERVING_STACK, build_stacks
from tierserve.tools.cdk_context import ROLLOUT_STRATEGIES

GPU_STARTUP = 900


def build(make_app, catalog, **context: Any):
    app = make_app(**context)
    return build_stacks(app, config=InfraConfig.from_context(app.node.try_get_context), catalog=catalog)


@pytest.fixture(scope="module")
def stacks(make_app, catalog):
    return build(
        make_app, catalog, rollout_overrides={"resnet-50": "linear10_1min", "tiny-on-gpu": "all_at_once"}
    )


@pytest.fixture(scope="module")
def serving(stacks) -> dict[str, Any]:
    return stacks.serving.node.root.synth().get_stack_by_name(SERVING_STACK).template


def of_type(template: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == resource_type}


def alarm_names(template: dict[str, Any]) -> dict[str, str]:
    """Alarm logical id -> its name."""
    return {
        k: a["Properties"]["AlarmName"]
        for k, a in of_type(template, "AWS::CloudWatch::Alarm").items()
        if "AlarmName" in a["Properties"]
    }


def named(template: dict[str, Any], value: Any) -> str:
    """An alarm name as a template gives it: a ``Ref`` to the alarm (its name), or the name."""
    return alarm_names(template)[value["Ref"]] if isinstance(value, dict) else value


def groups_by_model(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Deployment groups by the model whose alarms they watch (alarm names resolved)."""
    by_model = {}
    for group in of_type(template, "AWS::CodeDeploy::DeploymentGroup").values():
        props = group["Properties"]
        for alarm in props["AlarmConfiguration"]["Alarms"]:
            alarm["Name"] = named(template, alarm["Name"])
        model = (
            props["AlarmConfiguration"]["Alarms"][0]["Name"]
            .removeprefix(f"{SERVING_STACK}-")
            .rsplit("-", 2)[0]
        )
        by_model[model] = props
    return by_model


def test_every_strategy_is_a_lambda_config_and_a_context_value():
    assert set(STRATEGIES) == set(_LAMBDA_CONFIGS) == set(ROLLOUT_STRATEGIES)


def test_a_deployment_group_per_lambda_model_with_its_strategy(serving):
    groups = groups_by_model(serving)
    assert set(groups) == {"iris", "resnet-50"}
    configs = {model: g["DeploymentConfigName"] for model, g in groups.items()}
    assert configs == {
        "iris": "CodeDeployDefault.LambdaCanary10Percent5Minutes",
        "resnet-50": "CodeDeployDefault.LambdaLinear10PercentEvery1Minute",
    }
    assert len(of_type(serving, "AWS::CodeDeploy::Application")) == 1
    roles = {g["ServiceRoleArn"]["Fn::GetAtt"][0] for g in groups.values()}
    assert len(roles) == 1, "one CodeDeploy role for every model"
    for group in groups.values():
        assert group["DeploymentStyle"] == {
            "DeploymentOption": "WITH_TRAFFIC_CONTROL",
            "DeploymentType": "BLUE_GREEN",
        }


def test_the_models_alarms_roll_a_deployment_back(serving):
    for model, group in groups_by_model(serving).items():
        watched = sorted(a["Name"] for a in group["AlarmConfiguration"]["Alarms"])
        assert watched == sorted(
            f"{SERVING_STACK}-{model}-{what}" for what in ("server-errors", "latency", "function-errors")
        )
        assert group["AlarmConfiguration"]["Enabled"] is True
        assert sorted(group["AutoRollbackConfiguration"]["Events"]) == [
            "DEPLOYMENT_FAILURE",
            "DEPLOYMENT_STOP_ON_ALARM",
            "DEPLOYMENT_STOP_ON_REQUEST",
        ]


def test_codedeploy_shifts_the_live_alias(serving):
    functions = of_type(serving, "AWS::Lambda::Function")
    jobs = {k for k, f in functions.items() if f["Properties"]["ImageConfig"]["Command"] == ["jobs.handler"]}
    aliases = {  # the models' aliases: the jobs function (no model of its own) is not rolled out
        k: a
        for k, a in of_type(serving, "AWS::Lambda::Alias").items()
        if a["Properties"]["FunctionName"]["Ref"] not in jobs
    }
    groups = of_type(serving, "AWS::CodeDeploy::DeploymentGroup")
    assert len(aliases) == 2
    for alias in aliases.values():
        assert alias["Properties"]["Name"] == "live"
        update = alias["UpdatePolicy"]["CodeDeployLambdaAliasUpdate"]
        assert {"Ref": update["DeploymentGroupName"]["Ref"]} and update["DeploymentGroupName"][
            "Ref"
        ] in groups


@pytest.mark.parametrize(("model", "percent", "wait"), [("big-llm", 10, 300), ("tiny-on-gpu", 50, 0)])
def test_gpu_components_roll_copies_and_roll_back_on_their_alarms(serving, model, percent, wait):
    names = set(alarm_names(serving).values())
    configs = {}
    for component in of_type(serving, "AWS::SageMaker::InferenceComponent").values():
        config = component["Properties"]["DeploymentConfig"]
        watched = sorted(
            named(serving, a["AlarmName"]) for a in config["AutoRollbackConfiguration"]["Alarms"]
        )
        configs[watched[0].removeprefix(f"{SERVING_STACK}-").rsplit("-", 1)[0]] = (config, watched)
    config, watched = configs[model]
    assert watched == [f"{SERVING_STACK}-{model}-latency", f"{SERVING_STACK}-{model}-server-errors"]
    assert set(watched) <= names
    policy = config["RollingUpdatePolicy"]
    assert policy["MaximumBatchSize"] == {"Type": "CAPACITY_PERCENT", "Value": percent}
    assert policy["RollbackMaximumBatchSize"] == {"Type": "CAPACITY_PERCENT", "Value": 100}
    assert policy["WaitIntervalInSeconds"] == wait
    assert 600 <= policy["MaximumExecutionTimeoutInSeconds"] <= 28_800
    assert policy["MaximumExecutionTimeoutInSeconds"] >= GPU_STARTUP + wait


def test_cdk_nag_is_clean_with_rollouts(stacks):
    app = stacks.serving.node.root
    nag = AwsSolutionsChecks(app).validate_scope(app)
    assert nag.success is True, [
        (v.rule_name, [r.construct_path for r in v.violating_resources]) for v in nag.violations
    ]


@pytest.mark.parametrize("raw", ["canary50_5min", "iris=sometimes"])
def test_an_unknown_strategy_is_refused_naming_the_choices(make_app, catalog, raw):
    key = "rollout" if "=" not in raw else "rollout_overrides"
    with pytest.raises(ConfigError, match="canary10_5min"):
        build(make_app, catalog, **{key: raw})


@pytest.mark.parametrize("key", ["rollout_overrides", "latency_budget_ms"])
def test_a_per_model_key_naming_no_served_model_stops_synth(make_app, catalog, key):
    value = {"nope": "all_at_once"} if key == "rollout_overrides" else {"nope": 100}
    with pytest.raises(ConfigError, match=f"'{key}' names nope, which the catalog does not serve"):
        build(make_app, catalog, **{key: value})
