"""Manifests, the catalog and the tier rule."""

from __future__ import annotations

import json
import re

import pytest

from support.manifests import HOSTILE_MANIFESTS, manifest_text, raw_manifest
from tierserve.catalog import (
    Catalog,
    Manifest,
    ManifestError,
    lambda_memory_mb,
    manifest_key,
    tier_for,
)

MB = 1024 * 1024


def sized(model_mb: float, **overrides: object) -> Manifest:
    return Manifest.from_dict(
        raw_manifest(model={"sha256": "b" * 64, "bytes": int(model_mb * MB)}, **overrides)
    )


def test_round_trip_through_json():
    manifest = Manifest.from_dict(raw_manifest())
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"name": "Iris Model"}, "lowercase"),
        ({"version": "../1"}, "version"),
        ({"format": "pt"}, "format"),
        ({"compression": "lz4"}, "compression"),
        ({"artifact": "../../etc/passwd"}, "plain file name"),
        ({"artifact": ""}, "plain file name"),
        ({"artifact": "..\\model.onnx"}, "plain file name"),
        ({"stored": {"sha256": "xyz", "bytes": 1}}, "sha256"),
        ({"tier": "fpga"}, "tier"),
        ({"inputs": []}, '"inputs" must be a list of at least one tensor'),
    ],
)
def test_invalid_manifests_name_the_field(override, fragment):
    with pytest.raises(ManifestError, match=fragment):
        Manifest.from_dict(raw_manifest(**override))


def test_missing_field_is_a_manifest_error():
    data = raw_manifest()
    del data["stored"]
    with pytest.raises(ManifestError, match='"stored" is missing'):
        Manifest.from_dict(data)


def test_tier_rule_threshold_is_inclusive():
    assert tier_for(sized(512)) == "lambda"
    assert tier_for(sized(512.01)) == "gpu"
    assert tier_for(sized(100), lambda_max_model_mb=50) == "gpu"


def test_manifest_override_wins():
    assert tier_for(sized(2000, tier="lambda")) == "lambda"
    assert tier_for(sized(1, tier="gpu")) == "gpu"


def test_lambda_memory_grows_with_the_model_and_is_clamped():
    assert lambda_memory_mb(sized(1)) == 1024
    assert lambda_memory_mb(sized(400)) == 1536
    assert lambda_memory_mb(sized(400)) % 64 == 0
    assert lambda_memory_mb(sized(3800)) == 10048
    with pytest.raises(ManifestError, match="over Lambda's 10,240 MB"):
        lambda_memory_mb(sized(5000, tier="lambda"))


@pytest.mark.parametrize(
    ("catalog", "fragment"),
    [
        ({"models": {"iris": {}}}, "a catalog is"),
        ([], "a catalog is"),
        ({"models": [], "extra": 1}, "a catalog is"),
        ({"models": [{"name": "iris"}]}, r'"models\[0\].manifest" is missing'),
        ({"models": [["iris"]]}, r"models\[0\] must be a JSON object"),
    ],
    ids=[
        "models-not-a-list",
        "not-an-object",
        "unknown-key",
        "entry-without-manifest",
        "entry-not-an-object",
    ],
)
def test_malformed_catalogs_are_manifest_errors(catalog, fragment):
    with pytest.raises(ManifestError, match=fragment):
        Catalog.from_dict(catalog)


def test_sizes_must_be_json_integers():
    with pytest.raises(ManifestError, match=r'"stored.bytes" must be a whole number \(a JSON integer\)'):
        Manifest.from_dict(raw_manifest(stored={"sha256": "a" * 64, "bytes": "10"}))
    with pytest.raises(ManifestError, match=r'"model.bytes"'):
        Manifest.from_dict(raw_manifest(model={"sha256": "b" * 64, "bytes": True}))


def test_catalog_rejects_duplicates_and_mismatched_entries():
    entry = {"name": "iris", "version": "1", "manifest": raw_manifest()}
    with pytest.raises(ManifestError, match="more than once"):
        Catalog.from_dict({"models": [entry, entry]})
    with pytest.raises(ManifestError, match="the entry says iris@2 but its manifest describes iris@1"):
        Catalog.from_dict({"models": [{**entry, "version": "2"}]})


def test_catalog_save_load_and_replace(tmp_path):
    path = tmp_path / "catalog.json"
    catalog = Catalog(()).with_entry(sized(1)).with_entry(sized(600, name="big"))
    catalog.save(path)
    loaded = Catalog.load(path)
    assert [e.name for e in loaded.entries] == ["iris", "big"]
    assert [e.name for e in loaded.by_tier("gpu")] == ["big"]
    replaced = loaded.with_entry(sized(2, version="2"))
    assert [(e.name, e.version) for e in replaced.entries] == [("big", "1"), ("iris", "2")]


def test_missing_catalog_is_empty_and_broken_one_is_explained(tmp_path):
    assert Catalog.load(tmp_path / "absent.json").entries == ()
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Catalog.load(broken)


def test_manifest_key_layout():
    assert manifest_key("models", "iris", "3") == "models/iris/3/manifest.json"
    assert manifest_key("", "iris", "3") == "iris/3/manifest.json"


@pytest.mark.parametrize(("text", "fragment"), HOSTILE_MANIFESTS.values(), ids=HOSTILE_MANIFESTS)
def test_hostile_manifests_are_manifest_errors_that_name_the_problem(text, fragment):
    with pytest.raises(ManifestError) as caught:
        Manifest.from_json(text)
    assert re.search(fragment, str(caught.value)), str(caught.value)
    assert len(str(caught.value)) < 400


def test_invalid_utf8_is_a_manifest_error():
    with pytest.raises(ManifestError, match="not UTF-8"):
        Manifest.from_json(manifest_text().encode().replace(b'"iris"', b'"ir\xffis"'))


IN_A_CATALOG = {k: v for k, v in HOSTILE_MANIFESTS.items() if k != "over-a-megabyte"}


@pytest.mark.parametrize(("text", "fragment"), IN_A_CATALOG.values(), ids=IN_A_CATALOG)
def test_a_catalog_holding_a_hostile_manifest_names_the_problem(tmp_path, text, fragment):
    path = tmp_path / "catalog.json"
    path.write_text('{"models": [{"name": "iris", "version": "1", "manifest": ' + text + "}]}")
    with pytest.raises(ManifestError) as caught:
        Catalog.load(path)
    message = str(caught.value)
    assert message.startswith(f"catalog {path}") and re.search(fragment, message), message


def test_a_manifest_is_written_as_the_strict_reader_reads_it():
    manifest = Manifest.from_dict(raw_manifest(accuracy={"outputs": {"y": {"cosine": 0.999}}}, tier="gpu"))
    assert Manifest.from_json(manifest.to_json()) == manifest
    poisoned = Manifest.from_dict(raw_manifest(accuracy={"cosine": float("nan")}))
    with pytest.raises(ValueError, match="not JSON compliant"):
        poisoned.to_json()


def test_optional_fields_may_be_null_or_absent():
    manifest = Manifest.from_dict(raw_manifest(tier=None, accuracy=None, extra=None))
    assert (manifest.tier, manifest.accuracy, manifest.extra) == (None, None, {})
    assert manifest.allow_non_finite is False and manifest.optimized is False


def test_a_catalog_may_serve_other_versions_beside_each_models_default(tmp_path):
    default = {"name": "iris", "version": "2", "manifest": raw_manifest(version="2")}
    older = {"name": "iris", "version": "1", "manifest": raw_manifest(), "default": False}
    catalog = Catalog.from_dict({"models": [older, default]})
    assert [(e.name, e.version) for e in catalog.entries] == [("iris", "2")]
    assert catalog.get("iris").version == "2"
    assert [e.version for e in catalog.others_of("iris")] == ["1"]
    assert [e.version for e in catalog] == ["2"]  # every consumer of the defaults sees one per model
    path = tmp_path / "catalog.json"
    catalog.save(path)
    assert Catalog.load(path) == catalog
    assert json.loads(path.read_text())["models"][1]["default"] is False
    replaced = catalog.with_entry(Manifest.from_dict(raw_manifest(version="3")))
    assert ([e.version for e in replaced.entries], replaced.others) == (["3"], ())


@pytest.mark.parametrize(
    ("models", "fragment"),
    [
        ([{"version": "2", "default": False}], "none is the default"),
        (
            [{"version": "1"}, {"version": "2"}],
            'more than once as the default: keep one default version per model, and mark the others "default": false',
        ),
        ([{"version": "1"}, {"version": "1", "default": False}], r"lists \['iris@1'\] more than once"),
        ([{"version": "1", "default": "no"}], r'"models\[0\].default" must be true or false'),
    ],
)
def test_versions_and_defaults_that_cannot_be_served_are_refused(models, fragment):
    entries = [{"name": "iris", "manifest": raw_manifest(version=m["version"]), **m} for m in models]
    with pytest.raises(ManifestError, match=fragment):
        Catalog.from_dict({"models": entries})
