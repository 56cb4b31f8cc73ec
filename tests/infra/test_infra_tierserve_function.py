"""TierserveFunction in a bare stack, the image it runs, and what the image installs."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import aws_cdk as cdk
import pytest
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs

from infra.tierserve_function import INFERENCE_DOCKERFILE, TierserveFunction, image_context_patterns
from support.images import import_from_context
from tierserve.catalog import MB
from tierserve.settings import CACHE_MAX_MB_ENV, MODEL_BUCKET_ENV, MODEL_PREFIX_ENV, MODELS_ENV, ModelRef


@pytest.fixture(scope="module")
def manifests(manifest_factory):
    return [manifest_factory("iris", "3", 4 * 1024), manifest_factory("resnet-50", "1.2", 300 * MB)]


def build(make_app, manifests, *, name: str, architecture=lambda_.Architecture.X86_64) -> cdk.Stack:
    stack = cdk.Stack(make_app(), name)
    TierserveFunction(
        stack,
        "Fn",
        handler="worker.handler",
        architecture=architecture,
        models=manifests,
        model_bucket_name="models-bucket",
        model_prefix="models",
        memory_mb=2048,
        timeout=cdk.Duration.seconds(60),
        ephemeral_storage_mb=4096,
        log_retention=logs.RetentionDays.TWO_WEEKS,
        log_level="DEBUG",
        description="a tierserve function",
        role_description="its role",
        environment={"EXTRA": "1"},
        reserved_concurrency=3,
    )
    return stack


@pytest.fixture(scope="module")
def function_stack(make_app, manifests):
    return build(make_app, manifests, name="SharedFn")


@pytest.fixture(scope="module")
def template(function_stack, template_of):
    return template_of(function_stack)


@pytest.fixture(scope="module")
def function_props(template, find):
    (function,) = find(template, "AWS::Lambda::Function")
    return function["Properties"]


def test_runtime_settings(function_props):
    assert function_props["PackageType"] == "Image"
    assert function_props["ImageConfig"] == {"Command": ["worker.handler"]}
    assert function_props["Architectures"] == ["x86_64"]
    assert (function_props["MemorySize"], function_props["Timeout"]) == (2048, 60)
    assert function_props["EphemeralStorage"] == {"Size": 4096}
    assert function_props["TracingConfig"] == {"Mode": "Active"}
    assert function_props["ReservedConcurrentExecutions"] == 3
    assert "FunctionName" not in function_props, "generated names: no collisions, no timestamps"


def test_environment_names_the_models_as_settings_reads_them(function_props, manifests):
    from tierserve.settings import Settings

    env = function_props["Environment"]["Variables"]
    assert env[MODELS_ENV] == "iris@3,resnet-50@1.2"
    assert Settings.from_env(env).models == (ModelRef("iris", "3"), ModelRef("resnet-50", "1.2"))
    assert (env[MODEL_BUCKET_ENV], env[MODEL_PREFIX_ENV]) == ("models-bucket", "models")
    assert env[CACHE_MAX_MB_ENV] == "3584", "ephemeral storage less the 512 MB headroom"
    assert env["POWERTOOLS_SERVICE_NAME"] == "tierserve"
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == "Tierserve"
    assert env["POWERTOOLS_LOG_LEVEL"] == "DEBUG"
    assert env["EXTRA"] == "1"


def test_logs_go_to_its_own_group_with_retention(template, function_props):
    groups = template.find_resources("AWS::Logs::LogGroup")
    assert [g["Properties"]["RetentionInDays"] for g in groups.values()] == [14]
    assert function_props["LoggingConfig"] == {"LogGroup": {"Ref": next(iter(groups))}}


def test_role_is_lambdas_for_this_account_and_writes_only_its_log_group(template, find):
    (role,) = find(template, "AWS::IAM::Role")
    (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "lambda.amazonaws.com"}
    assert trust["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}
    assert "ManagedPolicyArns" not in role["Properties"]
    (policy,) = find(template, "AWS::IAM::Policy")
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    (group_id,) = template.find_resources("AWS::Logs::LogGroup")
    logs_statement = next(s for s in statements if "logs:PutLogEvents" in s["Action"])
    assert logs_statement["Resource"] == {"Fn::GetAtt": [group_id, "Arn"]}
    actions = {
        a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert actions == {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "xray:PutTraceSegments",
        "xray:PutTelemetryRecords",
    }


def test_arm64_builds_the_image_for_arm64(make_app, manifests, find):
    stack = build(make_app, manifests, name="ArmFn", architecture=lambda_.Architecture.ARM_64)
    assembly = stack.node.root.synth()
    (function,) = find(cdk.assertions.Template.from_stack(stack), "AWS::Lambda::Function")
    assert function["Properties"]["Architectures"] == ["arm64"]
    import json

    manifest = json.loads((Path(assembly.directory) / "ArmFn.assets.json").read_text())
    (image,) = manifest["dockerImages"].values()
    assert image["source"]["platform"] == "linux/arm64"


def test_image_context_is_only_what_the_dockerfile_copies(function_stack):
    """The staged asset (what `docker build` gets) holds the core and the handlers, nothing else."""
    assembly = function_stack.node.root.synth()
    (asset_dir,) = Path(assembly.directory).glob("asset.*")
    files = {p.relative_to(asset_dir).as_posix() for p in asset_dir.rglob("*") if p.is_file()}
    assert INFERENCE_DOCKERFILE in files
    assert "functions/inference/requirements.txt" in files
    assert "layers/tierserve/python/tierserve/catalog/manifest.py" in files
    outside = {f for f in files if not f.startswith(("layers/tierserve/python/", "functions/inference/"))}
    assert outside == set()
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert not any(f.startswith("layers/tierserve/python/tierserve/tools/") for f in files)


def test_image_context_holds_what_its_handlers_import_and_none_of_the_tools(function_stack):
    """The API, worker, batch, stream and jobs handlers import from the staged context alone, and load
    nothing of the CLI, the local stack or the packager."""
    assembly = function_stack.node.root.synth()
    (asset_dir,) = Path(assembly.directory).glob("asset.*")
    handlers = ["api", "worker", "batch", "stream", "jobs"]
    imported = import_from_context(
        asset_dir,
        "functions/inference",
        handlers,
        {"TIERSERVE_OUTPUT_STREAM": "results", "TIERSERVE_MODELS": "iris@1", "TIERSERVE_DATA_BUCKET": "data"},
    )
    assert "tierserve.jobs.service" in imported["loaded"]
    assert "tierserve.registry" in imported["loaded"] and "tierserve.s3_pipeline.worker" in imported["loaded"]
    assert "tierserve.batch.runner" in imported["loaded"] and "tierserve.streams.worker" in imported["loaded"]
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
        "snapshot-restore-py",
    ):
        assert pins[name] == importlib.metadata.version(name), name
