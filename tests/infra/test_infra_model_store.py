"""ModelStore in a bare stack: a private, encrypted, TLS-only, versioned, retained bucket."""

from __future__ import annotations

import aws_cdk as cdk
import pytest
from aws_cdk import aws_iam as iam

from infra.model_store import ModelStore, model_objects_pattern


@pytest.fixture(scope="module")
def store_template(make_app, template_of):
    app = make_app()
    stack = cdk.Stack(app, "Store")
    store = ModelStore(stack, "ModelStore")
    reader = iam.Role(stack, "Reader", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"))
    store.grant_read_model(reader, "iris", "3")
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


def test_grant_reads_only_the_model_versions_own_prefix(store_template, find):
    (policy,) = find(store_template, "AWS::IAM::Policy")
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    get = [s for s in statements if s["Action"] == "s3:GetObject"]
    assert len(get) == 1
    resource = get[0]["Resource"]["Fn::Join"][1]
    assert resource[-1] == "/models/iris/3/*"
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
