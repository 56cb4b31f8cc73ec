"""Fixtures shared by every suite: an embedded S3 (moto's server on 127.0.0.1), sample
models built by the tests themselves, packaged models uploaded to it, and a clean
warm-start cache and fresh boto3 clients for every test."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
for extra in ("layers/tierserve/python", "functions/inference"):
    if str(REPO_ROOT / extra) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / extra))

os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from support.common import BUCKET  # noqa: E402
from tierserve import aws  # noqa: E402
from tierserve.tools.local import samples  # noqa: E402
from tierserve.tools.local.embedded_s3 import EmbeddedS3  # noqa: E402
from tierserve.tools.packaging import PackagedModel, package_model, upload_package  # noqa: E402


@pytest.fixture(scope="session")
def embedded_s3() -> Iterator[EmbeddedS3]:
    server = EmbeddedS3().start()
    yield server
    server.stop()


@pytest.fixture
def s3(embedded_s3: EmbeddedS3, monkeypatch: pytest.MonkeyPatch) -> object:
    """A fresh, empty S3 (bucket ``test-models``) that this process's boto3 clients reach."""
    import requests

    requests.post(f"{embedded_s3.endpoint}/moto-api/reset", timeout=10)
    for key, value in embedded_s3.env.items():
        monkeypatch.setenv(key, value)
    aws.clear_clients()  # the environment changed: clients are made again from it
    client = embedded_s3.client()
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(autouse=True)
def fresh_aws_clients() -> Iterator[None]:
    """No test sees another test's boto3 clients (their endpoints, hooks or counters)."""
    aws.clear_clients()
    yield
    aws.clear_clients()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def iris_onnx(model_dir: Path) -> Path:
    return samples.iris_classifier(model_dir / "iris.onnx")


@pytest.fixture(scope="session")
def mlp_onnx(model_dir: Path) -> Path:
    return samples.mlp(model_dir / "mlp.onnx", features=16, hidden=64, layers=3, classes=5)


@pytest.fixture(scope="session")
def convnet_onnx(model_dir: Path) -> Path:
    return samples.convnet(model_dir / "convnet.onnx", channels=8, classes=10)


@pytest.fixture(scope="session")
def iris_package(iris_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> PackagedModel:
    return package_model(iris_onnx, name="iris", version="1", out_dir=tmp_path_factory.mktemp("iris-pkg"))


@pytest.fixture
def uploaded_iris(s3: object, iris_package: PackagedModel) -> PackagedModel:
    """The iris package as stored: its manifest names the content-addressed artifact in S3."""
    stored = upload_package(iris_package, s3, BUCKET, "models").manifest
    return PackagedModel(stored, iris_package.artifact)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
