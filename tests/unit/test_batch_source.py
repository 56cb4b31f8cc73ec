"""What `tierserve batch` and the batch function accept as a run's source, and the messages
for what they refuse (pure: no S3)."""

from __future__ import annotations

import pytest

from tierserve.batch import BadSource, BatchSource, PoisonItem, to_object
from tierserve.s3_pipeline import S3Object


@pytest.mark.parametrize(
    ("uri", "prefix"),
    [
        ("s3://data-bucket", "inputs/iris/"),
        ("s3://data-bucket/", "inputs/iris/"),
        ("s3://data-bucket/inputs", "inputs/iris/"),
        ("s3://data-bucket/inputs/iris", "inputs/iris/"),
        ("s3://data-bucket/inputs/iris/2026/", "inputs/iris/2026/"),
        ("s3://data-bucket/inputs/iris/2026/01-", "inputs/iris/2026/01-"),
    ],
)
def test_a_prefix_is_always_under_the_models_inputs(uri, prefix):
    source = BatchSource.parse(uri, "iris")
    assert (source.bucket, source.reader, source.key) == ("data-bucket", "prefix", prefix)
    assert source.execution_input() == {"reader": "prefix", "key": prefix, "model": "iris"}


@pytest.mark.parametrize(
    ("uri", "model", "manifest", "fragment"),
    [
        ("data-bucket/inputs/iris/", "iris", None, "is not an s3:// URI"),
        ("s3://Data_Bucket/inputs/iris/", "iris", None, "which is no S3 bucket name"),
        ("s3://data-bucket/inputs/iris/", "no such/model", None, "is not a model name"),
        ("s3://data-bucket/inputs/mlp/2026/", "iris", None, "holds the inputs of 'mlp', not of --model iris"),
        ("s3://data-bucket/images/2026/", "iris", None, "is outside inputs/"),
        ("s3://data-bucket/inputs/iris/../mlp/", "iris", None, "'.' or '..' parts"),
        (
            "s3://data-bucket/keys.csv",
            "iris",
            "csv",
            "reads csv manifests under manifests/ of the data bucket only",
        ),
        ("s3://data-bucket/manifests/", "iris", "json", "naming the manifest file"),
        ("s3://data-bucket/manifests/x/manifest.json", "iris", "inventory", "under inventory/"),
        ("s3://data-bucket/manifests/x.csv", "iris", "xml", "is not one of csv, json, inventory"),
    ],
)
def test_a_source_that_cannot_be_served_says_what_to_give(uri, model, manifest, fragment):
    with pytest.raises(BadSource, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        BatchSource.parse(uri, model, manifest)


def test_manifests_and_inventories_are_read_from_their_folders():
    assert (
        BatchSource.parse("s3://data-bucket/manifests/a/keys.csv", "iris", "csv").key
        == "manifests/a/keys.csv"
    )
    inventory = BatchSource.parse("s3://data-bucket/inventory/b/c/manifest.json", "iris", "inventory")
    assert inventory.batch_input() == {"bucket": "data-bucket", "model": "iris", "reader": "inventory"}


SOURCE = BatchSource("data-bucket", "iris")


def test_items_become_the_inputs_the_pipeline_serves():
    listed = {
        "Key": "inputs/iris/a.json",
        "Etag": '"abc"',
        "Size": 12,
        "LastModified": 1,
        "StorageClass": "STANDARD",
    }
    assert to_object(listed, SOURCE) == S3Object("data-bucket", "inputs/iris/a.json", size=12, etag="abc")
    assert to_object("inputs/iris/b.json", SOURCE) == S3Object("data-bucket", "inputs/iris/b.json")
    assert to_object({"Key": "inputs/iris/dir/"}, SOURCE) is None  # a folder marker
    assert to_object({"Key": "inputs/iris/v.json", "VersionId": "null", "Size": "x"}, SOURCE) == S3Object(
        "data-bucket", "inputs/iris/v.json"
    )


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ({"Size": 3}, "names no key"),
        (7, "names no key"),
        ({"Key": "inputs/mlp/a.json"}, "is not under inputs/iris/"),
        ({"Key": "outputs/iris/a.json.json"}, "is not under inputs/iris/"),
        ({"Key": "inputs/iris/a.json", "Bucket": "other-bucket"}, "is not in the data bucket data-bucket"),
    ],
)
def test_items_that_name_no_input_of_the_run_are_poison(item, fragment):
    with pytest.raises(PoisonItem, match=fragment):
        to_object(item, SOURCE)
