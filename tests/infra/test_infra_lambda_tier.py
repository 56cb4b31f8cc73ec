"""LambdaModelFunction in a bare stack, the image it runs, and what the image installs."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import aws_cdk as cdk
import pytest
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs

from infra.lambda_tier import (
    INFERENCE_DOCKERFILE,
    LambdaModelFunction,
    image_context_patterns,
    inference_image,
)
from support.images import import_from_context
from tierserve.catalog import MB, lambda_memory_mb
from tierserve.settings import (
    CACHE_MAX_MB_ENV,
    MODEL_BUCKET_ENV,
    MODEL_PREFIX_ENV,
    MODELS_ENV,
    PRELOAD_ENV,
)


@pytest.fixture(scope="module")
def manifest(manifest_factory):
    return manifest_factory("resnet-50", "1.2", 300 * MB)


def build(make_app, manifest, *, preload: bool, name: str = "Fn") -> cdk.Stack:
    app = make_app()
    stack = cdk.Stack(app, name)
    LambdaModelFunction(
        stack,
        manifest.name,
        manifest=manifest,
        code=inference_image(architecture=lambda_.Architecture.X86_64),
        architecture=lambda_.Architecture.X86_64,
        model_bucket_name="models-bucket",
        model_prefix="models",
        timeout=cdk.Duration.seconds(29),
        ephemeral_storage_mb=2048,
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
    assert "FunctionName" not in function_props, "generated names: no collisions, no timestamps"


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


def test_role_has_no_managed_policies_and_writes_only_its_log_group(function_stack, template_of, find):
    template = template_of(function_stack)
    (role,) = find(template, "AWS::IAM::Role")
    assert "ManagedPolicyArns" not in role["Properties"]
    (policy,) = find(template, "AWS::IAM::Policy")
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    logs_statement = next(s for s in statements if "logs:PutLogEvents" in s["Action"])
    assert logs_statement["Resource"] != "*"


def test_image_context_is_only_what_the_dockerfile_copies(function_stack):
    """The staged asset (what `docker build` gets) holds the core and the handlers, nothing else."""
    assembly = function_stack.node.root.synth()
    (asset_dir,) = Path(assembly.directory).glob("asset.*")
    files = {p.relative_to(asset_dir).as_posix() for p in asset_dir.rglob("*") if p.is_file()}
    assert INFERENCE_DOCKERFILE in files
    assert "functions/inference/requirements.txt" in files
    assert "layers/tierserve/python/tierserve/catalog.py" in files
    outside = {f for f in files if not f.startswith(("layers/tierserve/python/", "functions/inference/"))}
    assert outside == set()
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert not any(f.startswith("layers/tierserve/python/tierserve/tools/") for f in files)


def test_image_context_holds_what_its_handlers_import_and_none_of_the_tools(function_stack):
    """The API and worker handlers import from the staged context alone, and load nothing of
    the CLI, the local stack or the packager."""
    assembly = function_stack.node.root.synth()
    (asset_dir,) = Path(assembly.directory).glob("asset.*")
    imported = import_from_context(asset_dir, "functions/inference", ["api", "worker"])
    assert "tierserve.registry" in imported["loaded"] and "tierserve.s3_pipeline.worker" in imported["loaded"]
    assert not [m for m in imported["loaded"] if m.startswith("tierserve.tools")]
    assert all(f.startswith(str(asset_dir)) for f in imported["files"])


def test_dockerfile_copies_what_exists_and_runs_the_handler(repo_root):
    dockerfile = (repo_root / INFERENCE_DOCKERFILE).read_text()
    assert re.search(r"^FROM public\.ecr\.aws/lambda/python:3\.1[2-4]\b", dockerfile, re.M)
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        matches = list(repo_root.glob(source.rstrip("/"))) if "*" in source else [repo_root / source]
        assert matches and all(m.exists() for m in matches), source
    assert '\nCMD ["api.handler"]' in dockerfile
    assert image_context_patterns()[0] == "*", "the context is an allow-list"


def test_image_requirements_are_pinned_to_what_the_tests_run(repo_root):
    """The image installs exactly the versions this environment tests against."""
    pins = {}
    for line in (repo_root / "functions/inference/requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line!r} is not pinned with =="
            pins[name] = version
    for name in (
        "onnxruntime",
        "numpy",
        "zstandard",
        "orjson",
        "aws-lambda-powertools",
        "aws-xray-sdk",
        "boto3",
    ):
        assert pins[name] == importlib.metadata.version(name), name
