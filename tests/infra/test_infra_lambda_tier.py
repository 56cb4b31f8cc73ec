"""LambdaModelFunction in a bare stack: the TierserveFunction of one model, sized to it."""

from __future__ import annotations

import aws_cdk as cdk
import pytest
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk.assertions import Annotations, Match

from infra.lambda_tier import LambdaModelFunction
from tierserve.catalog import MB, lambda_memory_mb
from tierserve.settings import CACHE_MAX_MB_ENV, MODEL_BUCKET_ENV, MODEL_PREFIX_ENV, MODELS_ENV, PRELOAD_ENV


@pytest.fixture(scope="module")
def manifest(manifest_factory):
    return manifest_factory("resnet-50", "1.2", 300 * MB)


def build(
    make_app, manifest, *, preload: bool, name: str = "Fn", ephemeral_storage_mb: int = 2048
) -> cdk.Stack:
    stack = cdk.Stack(make_app(), name)
    LambdaModelFunction(
        stack,
        manifest.name,
        manifest=manifest,
        architecture=lambda_.Architecture.X86_64,
        model_bucket_name="models-bucket",
        model_prefix="models",
        timeout=cdk.Duration.seconds(29),
        ephemeral_storage_mb=ephemeral_storage_mb,
        log_retention=logs.RetentionDays.ONE_MONTH,
        log_level="INFO",
        preload=preload,
    )
    return stack


@pytest.fixture(scope="module")
def function_stack(make_app, manifest):
    return build(make_app, manifest, preload=True)


@pytest.fixture(scope="module")
def function_props(function_stack, template_of, find):
    (function,) = find(template_of(function_stack), "AWS::Lambda::Function")
    return function["Properties"]


def test_memory_comes_from_the_catalog_rule(function_props, manifest):
    assert function_props["MemorySize"] == lambda_memory_mb(manifest) == 1280


def test_runtime_settings(function_props):
    assert function_props["PackageType"] == "Image"
    assert function_props["ImageConfig"] == {"Command": ["api.handler"]}
    assert function_props["Architectures"] == ["x86_64"]
    assert function_props["Timeout"] == 29
    assert function_props["EphemeralStorage"] == {"Size": 2048}
    assert function_props["TracingConfig"] == {"Mode": "Active"}
    assert "ReservedConcurrentExecutions" not in function_props


def test_environment_names_the_model_and_where_it_lives(function_props):
    env = function_props["Environment"]["Variables"]
    assert env[MODEL_BUCKET_ENV] == "models-bucket"
    assert env[MODEL_PREFIX_ENV] == "models"
    assert env[MODELS_ENV] == "resnet-50@1.2"
    assert env[PRELOAD_ENV] == "resnet-50"
    assert env[CACHE_MAX_MB_ENV] == "1536"
    assert env["POWERTOOLS_SERVICE_NAME"] == "tierserve"
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == "Tierserve"
    assert env["POWERTOOLS_LOG_LEVEL"] == "INFO"


def test_no_preload_means_no_preload_variable(make_app, manifest, template_of, find):
    stack = build(make_app, manifest, preload=False, name="Lazy")
    (function,) = find(template_of(stack), "AWS::Lambda::Function")
    assert PRELOAD_ENV not in function["Properties"]["Environment"]["Variables"]


def test_logs_go_to_its_own_group_with_retention(function_stack, template_of, find):
    template = template_of(function_stack)
    groups = template.find_resources("AWS::Logs::LogGroup")
    assert [g["Properties"]["RetentionInDays"] for g in groups.values()] == [30]
    (function,) = find(template, "AWS::Lambda::Function")
    assert function["Properties"]["LoggingConfig"] == {"LogGroup": {"Ref": next(iter(groups))}}


def test_a_model_larger_than_its_tmp_cache_is_a_warning(make_app, manifest, function_stack):
    small = build(make_app, manifest, preload=True, name="SmallTmp", ephemeral_storage_mb=768)
    Annotations.from_stack(small).has_warning(
        "*", Match.string_like_regexp("raise lambda_ephemeral_storage_mb")
    )
    assert Annotations.from_stack(function_stack).find_warning("*", Match.any_value()) == []
