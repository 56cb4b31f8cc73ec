"""Fixtures for synth tests: a catalog built here, apps with cdk.json's context, templates.

Synth goes through jsii and takes seconds, so modules share synthesized templates through
module-scoped fixtures. Apps get the same context (feature flags and defaults) as
``cdk synth``, read from cdk.json. CDK's built-in CloudFormation validation costs seconds per
synth; only the full-app test runs it (``validate=True``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Template

from tierserve.catalog import MB, Catalog, Manifest

ROOT = Path(__file__).resolve().parents[2]

SMALL = "iris"  # a few KB: the minimum function memory
MEDIUM = "resnet-50"  # 300 MB: more memory than the minimum
HEAVY = "big-llm"  # 2 GB: over the 512 MB threshold, GPU tier
FORCED_GPU = "tiny-on-gpu"  # small, but its manifest says gpu
LAMBDA_MODELS = (SMALL, MEDIUM)
GPU_MODELS = (HEAVY, FORCED_GPU)


def make_manifest(name: str, version: str, model_bytes: int, tier: str | None = None) -> Manifest:
    """A valid manifest with made-up digests (synth never reads the artifact)."""
    data: dict[str, Any] = {
        "name": name,
        "version": version,
        "format": "onnx",
        "compression": "zstd",
        "artifact": "model.onnx.zst",
        "stored": {"sha256": "1" * 64, "bytes": max(1, model_bytes // 3)},
        "model": {"sha256": "2" * 64, "bytes": model_bytes},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}],
    }
    if tier is not None:
        data["tier"] = tier
    return Manifest.from_dict(data)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def manifest_factory() -> Callable[..., Manifest]:
    return make_manifest


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    entries = Catalog(())
    for manifest in (
        make_manifest(SMALL, "3", 4 * 1024),
        make_manifest(MEDIUM, "1.2", 300 * MB),
        make_manifest(HEAVY, "7", 2048 * MB),
        make_manifest(FORCED_GPU, "1", 2 * 1024, tier="gpu"),
    ):
        entries = entries.with_entry(manifest)
    return entries


@pytest.fixture(scope="session")
def cdk_context() -> dict[str, Any]:
    """cdk.json's context: feature flags and the documented defaults."""
    return json.loads((ROOT / "cdk.json").read_text())["context"]


@pytest.fixture(scope="session")
def make_app(cdk_context: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., cdk.App]:
    """``make_app(validate=False, **context_overrides)``: an App like ``cdk synth`` builds."""

    def make(*, validate: bool = False, **overrides: Any) -> cdk.App:
        return cdk.App(
            context={**cdk_context, **overrides},
            outdir=str(tmp_path_factory.mktemp("cdk.out")),
            builtin_cloud_formation_validation=validate,
        )

    return make


def synth_template(stack: cdk.Stack) -> Template:
    """The stack's template from one synth of its app (cached by the app)."""
    assembly = stack.node.root.synth()
    return Template.from_json(assembly.get_stack_by_name(stack.stack_name).template)


@pytest.fixture(scope="session")
def template_of() -> Callable[[cdk.Stack], Template]:
    return synth_template


def resources(template: Template, resource_type: str, props: Any = None) -> list[dict[str, Any]]:
    """The resources of one type (optionally matching ``props``), without their logical ids."""
    found = template.find_resources(resource_type, {"Properties": props} if props is not None else None)
    return list(found.values())


@pytest.fixture(scope="session")
def find() -> Callable[..., list[dict[str, Any]]]:
    return resources
