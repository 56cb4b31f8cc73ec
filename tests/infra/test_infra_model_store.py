"""ModelStore in a bare stack: a private, encrypted, TLS-only, versioned, retained bucket."""

from __future__ import annotations

from dataclasses import replace

import aws_cdk as cdk
import pytest
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3

from infra.model_store import ModelStore, grant_model_read, model_object_keys, model_objects_pattern
from tierserve.catalog import ManifestError


@pytest.fixture(scope="module")
def iris(manifest_factory):
    return manifest_factory("iris", "3", 4 * 1024)


@pytest.fixture(scope="module")
def store_template(make_app, template_of, iris):
    app = make_app()
    stack = cdk.Stack(app, "Store")
    store = ModelStore(stack, "ModelStore")
    reader = iam.Role(stack, "Reader", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"))
    store.grant_read_model(reader, iris)
    return template_of(stack)


def test_two_buckets_both_private_and_encrypted(store_template, find):
    buckets = find(store_template, "AWS::S3::Bucket")
    assert len(buckets) == 2
    for bucket in buckets:
        props = bucket["Properties"]
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }
        rule = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
        assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
        assert bucket["DeletionPolicy"] == "Retain"


def test_model_bucket_is_versioned_and_logs_access_to_the_other_bucket(store_template):
    buckets = store_template.find_resources("AWS::S3::Bucket")
    versioned = {k: v for k, v in buckets.items() if "VersioningConfiguration" in v["Properties"]}
    assert len(versioned) == 1
    (model,) = versioned.values()
    (log_bucket_id,) = set(buckets) - set(versioned)
    assert model["Properties"]["VersioningConfiguration"] == {"Status": "Enabled"}
    assert model["Properties"]["LoggingConfiguration"] == {
        "DestinationBucketName": {"Ref": log_bucket_id},
        "LogFilePrefix": "model-bucket/",
    }


def test_every_bucket_policy_denies_plain_http(store_template, find):
    policies = find(store_template, "AWS::S3::BucketPolicy")
    assert len(policies) == 2
    for policy in policies:
        statements = policy["Properties"]["PolicyDocument"]["Statement"]
        denies = [
            s
            for s in statements
            if s["Effect"] == "Deny" and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
        ]
        assert denies and denies[0]["Action"] == "s3:*" and denies[0]["Principal"] == {"AWS": "*"}


def test_grant_reads_exactly_the_manifest_and_the_artifact_it_names(store_template, find):
    (policy,) = find(store_template, "AWS::IAM::Policy")
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    (get,) = [s for s in statements if s["Action"] == "s3:GetObject"]
    keys = [resource["Fn::Join"][1][-1] for resource in get["Resource"]]
    assert keys == ["/models/iris/3/manifest.json", "/models/iris/3/model.onnx.zst"]
    assert not any("*" in key for key in keys), "no wildcard: the catalog names both objects"
    listing = [s for s in statements if s["Action"] == "s3:ListBucket"]
    assert listing[0]["Condition"] == {"StringLike": {"s3:prefix": ["models/iris/3/*"]}}
    actions = {
        a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert actions == {"s3:GetObject", "s3:ListBucket"}, "no s3:*, no writes, no GetBucket*"


def test_model_names_and_versions_that_could_widen_the_prefix_are_refused():
    assert model_objects_pattern("iris", "3") == "models/iris/3/*"
    assert model_objects_pattern("iris", "1.2", prefix="") == "iris/1.2/*"
    for bad in ("*", "iris/..", "", "Iris"):
        with pytest.raises(ValueError, match="model name"):
            model_objects_pattern(bad, "1")
    for bad in ("*", "1/..", "", "../2", "1/*"):
        with pytest.raises(ValueError, match="model version"):
            model_objects_pattern("iris", bad)


def test_object_keys_come_from_the_manifest_and_refuse_wildcards(iris):
    assert model_object_keys(iris) == ("models/iris/3/manifest.json", "models/iris/3/model.onnx.zst")
    assert model_object_keys(iris, prefix="") == ("iris/3/manifest.json", "iris/3/model.onnx.zst")
    for artifact in ("*", "model?.onnx", "../other/model.onnx", ".hidden", "a/b"):
        with pytest.raises(ManifestError, match="artifact"):
            model_object_keys(replace(iris, artifact=artifact))
    with pytest.raises(ManifestError, match="name"):
        model_object_keys(replace(iris, name="Iris/*"))


def test_the_model_read_needs_no_acknowledgment(make_app, iris):
    """cdk-nag finds nothing to excuse in the grant: its resources are exact keys."""
    from cdk_nag import AwsSolutionsChecks

    app = make_app()
    stack = cdk.Stack(app, "Reads")
    bucket = s3.Bucket.from_bucket_name(stack, "Models", "models-bucket")
    reader = iam.Role(stack, "Reader", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"))
    grant_model_read(bucket, reader, iris)
    report = AwsSolutionsChecks(app).validate_scope(app)
    assert report.violations == [], [v.rule_name for v in report.violations]
