"""Manifests, the catalog and the tier rule."""

from __future__ import annotations

import json

import pytest

from tierserve.catalog import (
    Catalog,
    Manifest,
    ManifestError,
    lambda_memory_mb,
    manifest_key,
    tier_for,
)

MB = 1024 * 1024


def raw_manifest(**overrides: object) -> dict:
    data = {
        "name": "iris",
        "version": "1",
        "format": "onnx",
        "compression": "zstd",
        "artifact": "model.onnx.zst",
        "stored": {"sha256": "a" * 64, "bytes": 10},
        "model": {"sha256": "b" * 64, "bytes": 20},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    data.update(overrides)
    return data


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
        ({"inputs": []}, "at least one input"),
    ],
)
def test_invalid_manifests_name_the_field(override, fragment):
    with pytest.raises(ManifestError, match=fragment):
        Manifest.from_dict(raw_manifest(**override))


def test_missing_field_is_a_manifest_error():
    data = raw_manifest()
    del data["stored"]
    with pytest.raises(ManifestError, match="missing or has a malformed field"):
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
    "catalog",
    [{"models": {"iris": {}}}, {"models": [{"name": "iris"}]}, []],
    ids=["models-not-a-list", "entry-without-manifest", "not-an-object"],
)
def test_malformed_catalogs_are_manifest_errors(catalog):
    with pytest.raises(ManifestError, match="a catalog is"):
        Catalog.from_dict(catalog)


def test_string_sizes_are_parsed_and_garbage_is_a_manifest_error():
    assert Manifest.from_dict(raw_manifest(stored={"sha256": "a" * 64, "bytes": "10"})).stored.bytes == 10
    with pytest.raises(ManifestError):
        Manifest.from_dict(raw_manifest(stored={"sha256": "a" * 64, "bytes": "ten"}))


def test_catalog_rejects_duplicates_and_mismatched_entries():
    entry = {"name": "iris", "version": "1", "manifest": raw_manifest()}
    with pytest.raises(ManifestError, match="more than once"):
        Catalog.from_dict({"models": [entry, entry]})
    with pytest.raises(ManifestError, match="disagrees"):
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
