"""A model reads only its own bytes (issue 15.9): an artifact with honest digests whose ONNX
external data points at another cached model is refused with a 503 and opens nothing of it
(the loader refuses external data an artifact declares, and opens every model from a private
folder that holds its own files alone); and an artifact onnxruntime refuses leaves nothing in
the disk cache and evicts nothing from it. Real onnxruntime, moto's S3 on loopback, the real
API handler; file access watched with inotify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from support.common import BUCKET, load_event, make_invoke
from support.file_access import watching
from support.hostile_artifacts import add_model, upload_artifact
from tierserve.catalog import Manifest, TensorSpec
from tierserve.store import entry_name
from tierserve.tools.local.apigw import proxy_event

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish")


def ready(name: str) -> dict:
    return proxy_event("GET", f"/v2/models/{name}/ready")


def cached(cache_dir: Path) -> list[str]:
    """What the disk cache holds, dot files (partial downloads) included."""
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


@pytest.fixture
def iris_cached(s3, uploaded_iris, cache_dir, monkeypatch):
    """The handler, serving iris (loaded, so its verified copy is in the disk cache) and ``other``."""
    monkeypatch.setenv("TIERSERVE_CACHE_MAX_MB", "1")
    invoke = make_invoke(monkeypatch, cache_dir, models="iris@1,other@1")
    status, _, body = invoke(load_event("infer-json"))
    assert status == 200, body
    iris: Manifest = uploaded_iris.manifest
    copy = cache_dir / entry_name(iris) / "model.onnx"
    assert copy.read_bytes()[:16] and cached(cache_dir) == [entry_name(iris)]
    return invoke, iris, copy


# Where a hostile artifact's external data could say another model's weights are: the file
# name of the flat cache that served such an artifact before, the neighbouring folder of the
# per-model layout, below its own folder, and the absolute path.
LOCATIONS = {
    "sibling-file": lambda iris, copy: f"{iris.model.sha256}.onnx",
    "sibling-folder": lambda iris, copy: f"../{entry_name(iris)}/model.onnx",
    "below": lambda iris, copy: f"{entry_name(iris)}/model.onnx",
    "absolute": lambda iris, copy: str(copy),
}


@pytest.mark.parametrize("where", sorted(LOCATIONS))
def test_external_data_pointing_at_another_cached_model_is_refused_and_reads_nothing_of_it(
    s3, iris_cached, cache_dir, tmp_path, where
):
    invoke, iris, copy = iris_cached
    thief = add_model(external_location=LOCATIONS[where](iris, copy))
    upload_artifact(s3, BUCKET, tmp_path / "other", name="other", model_bytes=thief)

    with watching(copy) as opened:
        status, _, body = invoke(ready("other"))
    assert status == 503, body
    assert "other@1 declares ONNX external data" in json.loads(body)["error"]
    assert opened == [], f"the refused model opened or read {opened}"
    assert cached(cache_dir) == [entry_name(iris)]  # nothing of the refused model is kept


def large(model: bytes = b"") -> bytes:
    """Over the 1 MB the cache may hold, so caching it would evict the iris copy."""
    return model or np.random.default_rng(1).bytes(1_500_000)


PADDING = 300_000  # floats: 1.2 MB of weights
REFUSED_KINDS = {
    "not-a-model": (lambda iris: large(), None),
    "truncated": (lambda iris: add_model(padding_floats=PADDING)[:-1000], None),
    "unknown-operator": (lambda iris: add_model(padding_floats=PADDING, op="NoSuchOperator"), None),
    "external-data": (
        lambda iris: add_model(external_location=f"../{entry_name(iris)}/model.onnx", padding_floats=PADDING),
        None,
    ),
    "signature-mismatch": (
        lambda iris: add_model(padding_floats=PADDING),
        (TensorSpec("z", "FP32", (4,)),),
    ),
}


@pytest.mark.parametrize("kind", sorted(REFUSED_KINDS))
def test_a_refused_artifact_leaves_nothing_in_the_cache_and_evicts_nothing(
    s3, iris_cached, cache_dir, tmp_path, kind
):
    invoke, iris, copy = iris_cached
    build, inputs = REFUSED_KINDS[kind]
    model_bytes = build(iris)
    assert len(model_bytes) > 1024 * 1024
    upload_artifact(
        s3,
        BUCKET,
        tmp_path / "other",
        name="other",
        model_bytes=model_bytes,
        **({"inputs": inputs} if inputs else {}),
    )
    for _ in range(2):  # refused again: nothing of it was kept
        status, _, body = invoke(ready("other"))
        assert status == 503, body
        assert "other@1" in json.loads(body)["error"]
        assert cached(cache_dir) == [entry_name(iris)], "the refused artifact was cached or evicted iris"
    assert copy.exists()
