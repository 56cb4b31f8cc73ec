"""Several versions of a model at once: a Lambda-tier model's function serves every catalog
version (the default first: the unversioned routes and the preload; the others under
/versions/{v}) and may read each version's objects; what cannot be served stops synth."""

from __future__ import annotations

import json
from typing import Any

import pytest

from infra.config import ConfigError, InfraConfig
from infra.stacks import SERVING_STACK, build_stacks
from tierserve.catalog import MB, Catalog, CatalogEntry, lambda_memory_mb
from tierserve.settings import MODELS_ENV, PRELOAD_ENV


def with_versions(catalog: Catalog, *entries: CatalogEntry) -> Catalog:
    return Catalog(catalog.entries, (*catalog.others, *entries))


def build(make_app, catalog: Catalog, **context: Any):
    app = make_app(**context)
    return build_stacks(app, config=InfraConfig.from_context(app.node.try_get_context), catalog=catalog)


@pytest.fixture(scope="module")
def serving(make_app, catalog, manifest_factory) -> dict[str, Any]:
    older = manifest_factory("iris", "2", 200 * MB)  # larger than the default: memory follows it
    stacks = build(make_app, with_versions(catalog, CatalogEntry("iris", "2", older, default=False)))
    return stacks.serving.node.root.synth().get_stack_by_name(SERVING_STACK).template


def functions(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {}
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] == "AWS::Lambda::Function":
            if resource["Properties"]["ImageConfig"]["Command"] == ["jobs.handler"]:
                continue  # the jobs function names every model
            env = resource["Properties"]["Environment"]["Variables"]
            found[env[MODELS_ENV].split("@")[0]] = {"id": logical_id, **resource["Properties"]}
    return found


def test_the_function_serves_every_version_with_the_default_first(serving, manifest_factory):
    iris = functions(serving)["iris"]
    env = iris["Environment"]["Variables"]
    assert env[MODELS_ENV] == "iris@3,iris@2"
    assert env[PRELOAD_ENV] == "iris"  # the registry preloads the first listed: the default
    assert iris["MemorySize"] == lambda_memory_mb(
        manifest_factory("iris", "2", 200 * MB)
    )  # the larger version's
    assert functions(serving)["resnet-50"]["Environment"]["Variables"][MODELS_ENV] == "resnet-50@1.2"


def test_the_function_may_read_each_versions_manifest_and_artifact(serving):
    role_id = functions(serving)["iris"]["Role"]["Fn::GetAtt"][0]
    policies = [
        r["Properties"]["PolicyDocument"]
        for r in serving["Resources"].values()
        if r["Type"] == "AWS::IAM::Policy" and {"Ref": role_id} in r["Properties"]["Roles"]
    ]
    text = json.dumps(policies)
    for version in ("2", "3"):
        assert f"/models/iris/{version}/manifest.json" in text
        assert f"/models/iris/{version}/model.onnx.zst" in text
    assert "/models/iris/*" not in text


def test_versions_of_a_gpu_tier_model_stop_synth(make_app, catalog, manifest_factory):
    older = manifest_factory("big-llm", "6", 2048 * MB)
    with pytest.raises(ConfigError, match="big-llm is on the GPU tier, which serves one version per model"):
        build(make_app, with_versions(catalog, CatalogEntry("big-llm", "6", older, default=False)))


def test_versions_of_one_model_on_two_tiers_stop_synth(make_app, catalog, manifest_factory):
    heavy = manifest_factory("iris", "9", 2048 * MB)
    with pytest.raises(ConfigError, match="versions 9 of iris are on the GPU tier"):
        build(make_app, with_versions(catalog, CatalogEntry("iris", "9", heavy, default=False)))


def test_the_dashboard_row_names_the_other_versions(serving):
    (board,) = [r for r in serving["Resources"].values() if r["Type"] == "AWS::CloudWatch::Dashboard"]
    assert "iris version 3 (Lambda tier; also serves 2, not shown)" in json.dumps(board)
