"""Faults on purpose: a corrupt or hostile artifact, S3 going away, a model too big for the
budget. Each gets a clear 503, nothing bad is cached, and service recovers."""

from __future__ import annotations

import dataclasses
import json

import pytest

from support.common import BUCKET, load_event, make_invoke
from support.flaky import FlakyProxy
from tierserve import aws
from tierserve.catalog import Digest, Manifest
from tierserve.errors import ModelUnavailable
from tierserve.registry import ModelRegistry
from tierserve.settings import ModelRef, Settings
from tierserve.tools.local import samples
from tierserve.tools.packaging import compress_file, package_model, sha256_file, upload

MANIFEST_KEY = "models/iris/1/manifest.json"


def put_manifest(s3, manifest) -> None:
    s3.put_object(Bucket=BUCKET, Key=MANIFEST_KEY, Body=manifest.to_json().encode())


def stored_manifest(s3) -> Manifest:
    """The manifest as uploaded (it names the artifact as S3 stores it)."""
    return Manifest.from_dict(json.loads(s3.get_object(Bucket=BUCKET, Key=MANIFEST_KEY)["Body"].read()))


@pytest.mark.parametrize(
    ("doctor", "fragment"),
    [
        (
            lambda m: dataclasses.replace(m, stored=Digest("0" * 64, m.stored.bytes)),
            "stored bytes do not match",
        ),
        (
            lambda m: dataclasses.replace(m, model=Digest(m.model.sha256, m.model.bytes + 1)),
            "zstd frame without the declared size",
        ),
        (
            lambda m: dataclasses.replace(m, model=Digest(m.model.sha256, 16)),
            "zstd frame without the declared size (16 bytes)",
        ),
    ],
    ids=["wrong-stored-digest", "wrong-model-size", "decompression-bomb"],
)
def test_rejected_artifacts_are_503_and_never_cached(
    s3, uploaded_iris, cache_dir, monkeypatch, doctor, fragment
):
    put_manifest(s3, doctor(stored_manifest(s3)))
    invoke = make_invoke(monkeypatch, cache_dir)
    status, _, body = invoke(load_event("infer-json"))
    assert status == 503
    assert fragment in json.loads(body)["error"]
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []


def test_corrupt_artifact_bytes_are_refused(s3, uploaded_iris, cache_dir, monkeypatch):
    key = f"models/iris/1/{stored_manifest(s3).artifact}"
    stored = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    stored[10:20] = b"\x00" * 10
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(stored))
    invoke = make_invoke(monkeypatch, cache_dir)
    status, _, body = invoke(load_event("infer-json"))
    assert status == 503, body
    error = json.loads(body)["error"]
    # Zeroed bytes break the zstd framing before the digest is complete: the fix is to re-package.
    assert f"s3://{BUCKET}/{key} is not a valid zstd stream" in error and error.endswith("re-package it")
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []


def test_a_model_that_onnxruntime_cannot_load_is_503(s3, iris_onnx, tmp_path, cache_dir, monkeypatch):
    # Honest digests over bytes that are not a model: the checks pass, onnxruntime refuses.
    packaged = package_model(iris_onnx, name="iris", version="1", out_dir=tmp_path / "bad")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf")
    compress_file(garbage, packaged.artifact, "zstd")
    manifest = dataclasses.replace(
        packaged.manifest,
        stored=Digest(sha256_file(packaged.artifact), packaged.artifact.stat().st_size),
        model=Digest(sha256_file(garbage), garbage.stat().st_size),
    )
    upload(dataclasses.replace(packaged, manifest=manifest), s3, BUCKET, "models")
    invoke = make_invoke(monkeypatch, cache_dir)
    status, _, body = invoke(load_event("infer-json"))
    assert status == 503
    assert "onnxruntime cannot load iris@1" in json.loads(body)["error"]


def test_s3_unavailable_is_503_and_the_next_request_recovers(
    embedded_s3, s3, uploaded_iris, cache_dir, monkeypatch
):
    proxy = FlakyProxy(embedded_s3.endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        aws.clear_clients()
        invoke = make_invoke(monkeypatch, cache_dir)
        proxy.down = True
        status, _, body = invoke(load_event("infer-json"))
        assert status == 503
        assert "S3 is unavailable" in json.loads(body)["error"]
        assert proxy.requests >= 3  # botocore's retries really ran
        proxy.down = False
        status, _, body = invoke(load_event("infer-json"))
        assert status == 200, body
    finally:
        proxy.stop()


def test_s3_failing_mid_download_loses_nothing(embedded_s3, s3, uploaded_iris, cache_dir, monkeypatch):
    proxy = FlakyProxy(embedded_s3.endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        aws.clear_clients()
        invoke = make_invoke(monkeypatch, cache_dir)
        proxy.fail_next = 2  # transient: botocore's own retries absorb it
        status, _, body = invoke(load_event("infer-json"))
        assert status == 200, body
    finally:
        proxy.stop()


def test_model_over_the_memory_budget_is_a_clear_503(s3, uploaded_iris, cache_dir):
    settings = Settings.from_env(
        {
            "TIERSERVE_MODEL_BUCKET": BUCKET,
            "TIERSERVE_MODELS": "iris@1",
            "TIERSERVE_CACHE_DIR": str(cache_dir),
        },
        memory_budget_mb=0,
    )
    registry = ModelRegistry(settings)
    with pytest.raises(ModelUnavailable, match="give the function more memory"):
        registry.get(registry.resolve("iris"))


def test_lru_keeps_models_within_the_budget(s3, tmp_path, cache_dir):
    # Two models of about 0.55 MB each: one fits a 1 MB budget, both do not.
    source = samples.mlp(tmp_path / "mlp.onnx", features=16, hidden=256, layers=4, classes=5)
    for name in ("mlp-a", "mlp-b"):
        upload(package_model(source, name=name, version="1", out_dir=tmp_path / name), s3, BUCKET, "models")
    settings = Settings.from_env(
        {
            "TIERSERVE_MODEL_BUCKET": BUCKET,
            "TIERSERVE_MODELS": "mlp-a@1,mlp-b@1",
            "TIERSERVE_CACHE_DIR": str(cache_dir),
        },
        memory_budget_mb=1,
    )
    registry = ModelRegistry(settings)
    first, second = registry.resolve("mlp-a"), registry.resolve("mlp-b")
    registry.get(first)
    registry.get(second)
    assert registry.loaded(first) is None and registry.loaded(second) is not None
    registry.get(first)
    assert registry.loaded(first) is not None and registry.loaded(second) is None


@pytest.mark.parametrize(
    ("configured", "setting"),
    [
        ({"model_bucket": "no-such-models"}, "TIERSERVE_MODEL_BUCKET"),
        ({"model_root": "s3://no-such-models/models"}, "TIERSERVE_MODEL_ROOT"),
    ],
)
def test_a_model_bucket_that_does_not_exist_names_the_setting_that_chose_it(
    s3, cache_dir, configured, setting
):
    registry = ModelRegistry(Settings(models=(ModelRef("iris", "1"),), cache_dir=cache_dir, **configured))
    with pytest.raises(ModelUnavailable) as raised:
        registry.manifest(ModelRef("iris", "1"))
    assert (
        "the bucket of s3://no-such-models/models/iris/1/manifest.json does not exist" in raised.value.message
    )
    assert f"check {setting}" in raised.value.message and "DATA_BUCKET" not in raised.value.message
