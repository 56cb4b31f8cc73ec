"""LambdaModelFunction in a bare stack: the TierserveFunction of one model, sized to it, with a
published version behind the alias ``live``, SnapStart or provisioned concurrency, and the
limits it must fit refused (or warned about) at synth with the key to change."""

from __future__ import annotations

import dataclasses

import aws_cdk as cdk
import pytest
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk.assertions import Annotations, Match

from infra.config import ConfigError, InfraConfig
from infra.lambda_tier import LambdaModelFunction
from tierserve.catalog import MB, Digest, lambda_memory_mb
from tierserve.settings import (
    CACHE_MAX_MB_ENV,
    FETCH_CONNECTIONS_ENV,
    MODEL_BUCKET_ENV,
    MODEL_PREFIX_ENV,
    MODELS_ENV,
    PRELOAD_ENV,
)


@pytest.fixture(scope="module")
def manifest(manifest_factory):
    return manifest_factory("resnet-50", "1.2", 300 * MB)


def plain(manifest):
    """``manifest`` stored uncompressed (as tierserve package stores FP32 weights)."""
    return dataclasses.replace(manifest, compression="none", artifact="model.onnx", stored=manifest.model)


def build(make_app, manifest, *, name: str = "Fn", **config: object) -> cdk.Stack:
    stack = cdk.Stack(make_app(), name)
    LambdaModelFunction(
        stack,
        manifest.name,
        manifest=manifest,
        config=InfraConfig(**config),  # type: ignore[arg-type]
        architecture=lambda_.Architecture.X86_64,
        model_bucket_name="models-bucket",
        model_prefix="models",
        log_retention=logs.RetentionDays.ONE_MONTH,
    )
    return stack


def one(template, resource_type: str, find) -> dict:
    (resource,) = find(template, resource_type)
    return resource["Properties"]


@pytest.fixture(scope="module")
def snapstart_stack(make_app, manifest):
    return build(make_app, manifest)  # the defaults: SnapStart on, preload on


@pytest.fixture(scope="module")
def snapstart(snapstart_stack, template_of):
    return template_of(snapstart_stack)


@pytest.fixture(scope="module")
def function_props(snapstart, find):
    return one(snapstart, "AWS::Lambda::Function", find)


def test_memory_comes_from_the_catalog_rule(function_props, manifest):
    assert function_props["MemorySize"] == lambda_memory_mb(manifest) == 1280


def test_runtime_settings(function_props):
    assert function_props["PackageType"] == "Image"
    assert function_props["ImageConfig"] == {"Command": ["api.handler"]}
    assert function_props["Architectures"] == ["x86_64"]
    assert function_props["Timeout"] == 29
    assert function_props["TracingConfig"] == {"Mode": "Active"}
    assert "ReservedConcurrentExecutions" not in function_props


def test_snapstart_snapshots_published_versions_with_its_512_mb_of_tmp(function_props):
    assert function_props["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    assert function_props["EphemeralStorage"] == {"Size": 512}  # SnapStart's limit
    assert function_props["Environment"]["Variables"][CACHE_MAX_MB_ENV] == "448"  # less 64 MB


def test_the_alias_live_targets_a_published_version(snapstart, find):
    (function_id,) = snapstart.find_resources("AWS::Lambda::Function")
    version = one(snapstart, "AWS::Lambda::Version", find)
    assert version["FunctionName"] == {"Ref": function_id}
    alias = one(snapstart, "AWS::Lambda::Alias", find)
    (version_id,) = snapstart.find_resources("AWS::Lambda::Version")
    assert alias["Name"] == "live"
    assert alias["FunctionVersion"] == {"Fn::GetAtt": [version_id, "Version"]}
    assert "ProvisionedConcurrencyConfig" not in alias


def test_environment_names_the_model_and_where_it_lives(function_props):
    env = function_props["Environment"]["Variables"]
    assert env[MODEL_BUCKET_ENV] == "models-bucket"
    assert env[MODEL_PREFIX_ENV] == "models"
    assert env[MODELS_ENV] == "resnet-50@1.2"
    assert env[PRELOAD_ENV] == "resnet-50"
    assert env[FETCH_CONNECTIONS_ENV] == "8"
    assert env["POWERTOOLS_SERVICE_NAME"] == "tierserve"
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == "Tierserve"
    assert env["POWERTOOLS_LOG_LEVEL"] == "INFO"


def test_a_snapstart_function_synthesizes_without_warnings(snapstart_stack):
    # CDK's own reminder that SnapStart needs a published version is acknowledged: there is one.
    assert Annotations.from_stack(snapstart_stack).find_warning("*", Match.any_value()) == []


def test_without_snapstart_the_function_has_its_ephemeral_storage_and_no_snapshot(
    make_app, manifest, template_of, find
):
    stack = build(make_app, manifest, name="OnDemand", snapstart=False, preload=False)
    template = template_of(stack)
    props = one(template, "AWS::Lambda::Function", find)
    assert "SnapStart" not in props
    assert props["EphemeralStorage"] == {"Size": 2048}
    assert props["Environment"]["Variables"][CACHE_MAX_MB_ENV] == "1984"
    assert PRELOAD_ENV not in props["Environment"]["Variables"]
    assert one(template, "AWS::Lambda::Alias", find)["Name"] == "live"  # still a published version


def test_provisioned_concurrency_is_on_the_alias_and_replaces_snapstart(
    make_app, manifest, template_of, find
):
    stack = build(
        make_app, manifest, name="Provisioned", snapstart=False, provisioned_concurrency=(("resnet-50", 3),)
    )
    template = template_of(stack)
    assert "SnapStart" not in one(template, "AWS::Lambda::Function", find)
    alias = one(template, "AWS::Lambda::Alias", find)
    assert alias["ProvisionedConcurrencyConfig"] == {"ProvisionedConcurrentExecutions": 3}


def test_the_disk_cache_can_be_off(make_app, manifest, template_of, find):
    stack = build(make_app, manifest, name="NoCache", lambda_disk_cache=False)
    env = one(template_of(stack), "AWS::Lambda::Function", find)["Environment"]["Variables"]
    assert env[CACHE_MAX_MB_ENV] == "0"


def test_logs_go_to_its_own_group_with_retention(snapstart, find):
    groups = snapstart.find_resources("AWS::Logs::LogGroup")
    assert [g["Properties"]["RetentionInDays"] for g in groups.values()] == [30]
    props = one(snapstart, "AWS::Lambda::Function", find)
    assert props["LoggingConfig"] == {"LogGroup": {"Ref": next(iter(groups))}}


# ---------------------------------------------------------------- limits, refused at synth


def refused(make_app, manifest, name: str, **config: object) -> str:
    with pytest.raises(ConfigError) as raised:
        build(make_app, manifest, name=name, **config)
    return str(raised.value)


def test_a_model_that_cannot_fit_snapstarts_tmp_is_refused_naming_the_keys(make_app, manifest_factory):
    big = plain(manifest_factory("big", "1", 470 * MB))
    message = refused(make_app, big, "BigSnap")
    assert message.startswith("model big@1 needs 470 MB of /tmp to load")
    assert "the 512 MB of /tmp SnapStart allows" in message
    assert "take big out of 'snapstart'" in message and "set 'lambda_disk_cache' to false" in message
    build(make_app, big, name="BigSnapInMemory", lambda_disk_cache=False)  # the in-memory fix works
    build(make_app, big, name="BigOnDemand", snapstart=False)  # and so does the other


def test_a_model_larger_than_the_functions_tmp_is_refused_with_the_size_to_set(make_app, manifest):
    message = refused(
        make_app, plain(manifest), "SmallTmp", snapstart=False, lambda_ephemeral_storage_mb=256 + 64
    )
    assert "model resnet-50@1.2 needs 300 MB of /tmp" in message
    assert "raise 'lambda_ephemeral_storage_mb' to at least 365" in message


def test_a_compressed_artifact_needs_room_for_its_spool_too(make_app, manifest):
    compressed = dataclasses.replace(manifest, stored=Digest("1" * 64, 200 * MB))  # zstd
    message = refused(make_app, compressed, "Spool", snapstart=False, lambda_ephemeral_storage_mb=512)
    assert "needs 500 MB of /tmp to load (its file and its compressed artifact)" in message


def test_a_cold_load_that_cannot_finish_in_a_request_is_refused_unless_snapstart_loads_it(
    make_app, manifest_factory
):
    # 480 MB at 1 connection of 10 MB/s: 48 s, over API Gateway's 29 s.
    slow = {"fetch_connections": 1, "s3_mb_per_s_per_connection": 10, "lambda_disk_cache": False}
    model = plain(manifest_factory("slow", "1", 480 * MB))
    message = refused(make_app, model, "Slow", snapstart=False, **slow)
    assert "model slow@1: a cold load of 503 MB takes about" in message
    assert "over the 27 s a request has (API Gateway's 29 s" in message
    assert "turn on 'snapstart'" in message and "'provisioned_concurrency'" in message
    build(make_app, model, name="SlowSnap", **slow)  # SnapStart loads it once, within 130 s of init


def test_a_slow_preload_is_a_warning_that_the_first_request_loads_it(make_app, manifest_factory):
    model = plain(manifest_factory("medium", "1", 200 * MB))
    stack = build(
        make_app,
        model,
        name="SlowPreload",
        snapstart=False,
        fetch_connections=1,
        s3_mb_per_s_per_connection=20,
    )
    Annotations.from_stack(stack).has_warning("*", Match.string_like_regexp("the first request loads it"))


def test_memory_over_a_new_accounts_quota_is_a_warning(make_app, manifest_factory):
    model = manifest_factory("wide", "1", 1100 * MB)
    stack = build(make_app, model, name="Wide", snapstart=False, lambda_ephemeral_storage_mb=2048)
    Annotations.from_stack(stack).has_warning("*", Match.string_like_regexp("over the 3,008 MB new accounts"))


def test_memory_past_lambdas_maximum_is_refused(make_app, manifest_factory):
    model = manifest_factory("huge", "1", 4000 * MB)
    message = refused(make_app, model, "Huge", snapstart=False, lambda_disk_cache=False)
    assert "over Lambda's 10,240 MB" in message
