"""The model registry's memory budget under concurrent loads of different models, what a failed
load costs, and that an evicted model lets go of its session. Real onnxruntime sessions over
models packaged into a local folder (``file://``)."""

from __future__ import annotations

import gc
import json
import re
import shutil
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tierserve.batching import BatchingConfig, BatchingModel
from tierserve.errors import ArtifactRejected, ModelNotFound, ModelUnavailable, Overloaded, is_retryable
from tierserve.model import OnnxModel
from tierserve.registry import ModelRegistry, model_cost_bytes
from tierserve.settings import MB, ModelRef, Settings
from tierserve.tools.local import samples
from tierserve.tools.packaging import package_model

NAMES = ("mlp-a", "mlp-b", "mlp-c", "mlp-d")


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    """Four models of about 0.63 MB each (three fit a 2 MB budget, four do not), one folder each
    as the store lays them out: ``{name}/1/``."""
    root = tmp_path_factory.mktemp("store")
    for seed, name in enumerate(NAMES):
        source = samples.mlp(root / f"{name}.onnx", features=16, hidden=256, layers=4, classes=5, seed=seed)
        package_model(source, name=name, version="1", out_dir=root / name / "1")
    return root


def make_registry(model_root: Path, cache_dir: Path, budget_mb: int, **kwargs) -> ModelRegistry:
    settings = Settings(
        model_root=f"file://{model_root}",
        models=tuple(ModelRef(name, "1") for name in NAMES),
        memory_budget_mb=budget_mb,
        cache_dir=cache_dir,
    )
    return ModelRegistry(settings, **kwargs)


class Gate:
    """A model factory that holds the loads of the models it names, with their memory reserved,
    until ``open`` is set; it records the registry's memory as each held load arrives."""

    def __init__(self, held: set[str]) -> None:
        self.held = held
        self.registry: ModelRegistry | None = None
        self.arrived = threading.Semaphore(0)
        self.open = threading.Event()
        self.memory_seen: list[tuple[int, int]] = []

    def __call__(self, manifest, session, timings):
        if manifest.name in self.held:
            assert self.registry is not None
            self.memory_seen.append(self.registry.memory_bytes())
            self.arrived.release()
            assert self.open.wait(30), "the test never opened the gate"
        return OnnxModel(manifest, session, timings)


def test_concurrent_loads_of_different_models_stay_within_the_budget(model_root, cache_dir):
    gate = Gate({"mlp-c", "mlp-d"})
    registry = make_registry(model_root, cache_dir, budget_mb=2, model_factory=gate)
    gate.registry = registry
    budget = 2 * MB
    a, b, c, d = (registry.resolve(name) for name in NAMES)
    registry.get(a)
    registry.get(b)
    registry.get(a)  # a is now the most recently used: b is the one to go
    cost = model_cost_bytes(registry.manifest(a))
    assert 3 * cost <= budget < 4 * cost
    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(registry.get, ref) for ref in (c, d)]
        try:
            for _ in loads:  # both loads in flight at once, their memory reserved
                assert gate.arrived.acquire(timeout=30), "a load never reached the session factory"
            loaded, reserved = registry.memory_bytes()
            assert reserved == 2 * cost
            assert loaded + reserved <= budget
            assert registry.loaded(b) is None, "the least recently used model made room"
            assert registry.loaded(a) is not None, "only as many models as needed were evicted"
        finally:
            gate.open.set()
        for load in loads:
            load.result(timeout=30)
    assert all(sum(seen) <= budget for seen in gate.memory_seen)
    assert [registry.loaded(ref) is not None for ref in (a, b, c, d)] == [True, False, True, True]
    assert registry.memory_bytes() == (3 * cost, 0)


def test_a_load_gets_no_room_that_loads_in_flight_hold(model_root, cache_dir):
    # One model fits. While mlp-a's load holds the budget, mlp-b can evict nothing: it waits for
    # room (here briefly) and gives up with a 503 rather than overshoot the budget.
    gate = Gate({"mlp-a"})
    registry = make_registry(model_root, cache_dir, budget_mb=1, model_factory=gate, reserve_timeout_s=0.2)
    gate.registry = registry
    a, b = registry.resolve("mlp-a"), registry.resolve("mlp-b")
    cost = model_cost_bytes(registry.manifest(a))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(registry.get, a)
        try:
            assert gate.arrived.acquire(timeout=30)
            with pytest.raises(Overloaded, match="no room in the memory budget") as raised:
                registry.get(b)
            assert raised.value.status_code == 503 and is_retryable(raised.value)
            assert registry.memory_bytes() == (0, cost)
        finally:
            gate.open.set()
        first.result(timeout=30)
    registry.get(b)  # a is loaded now, so evicting it makes room
    assert registry.memory_bytes() == (cost, 0)
    assert registry.loaded(a) is None and registry.loaded(b) is not None


def test_a_rejected_artifact_evicts_no_warm_model(model_root, cache_dir, tmp_path):
    # A copy of the store where mlp-b's artifact is corrupt: its digest check fails on fetch.
    root = tmp_path / "store"
    for name in ("mlp-a", "mlp-b"):
        (root / name / "1").mkdir(parents=True)
        for item in (model_root / name / "1").iterdir():
            (root / name / "1" / item.name).write_bytes(item.read_bytes())
    (artifact,) = (p for p in (root / "mlp-b" / "1").iterdir() if p.name != "manifest.json")
    stored = bytearray(artifact.read_bytes())
    stored[10:20] = b"\x00" * 10
    artifact.write_bytes(bytes(stored))
    registry = make_registry(root, cache_dir, budget_mb=1)
    a, b = registry.resolve("mlp-a"), registry.resolve("mlp-b")
    warm = registry.get(a)
    with pytest.raises(ArtifactRejected):
        registry.get(b)
    assert registry.loaded(a) is warm
    assert registry.memory_bytes() == (model_cost_bytes(warm.manifest), 0)


def test_a_load_that_fails_after_reserving_releases_its_reservation(model_root, cache_dir):
    failures = {"mlp-b": 1}

    def factory(manifest, session, timings):
        if failures.get(manifest.name):
            failures[manifest.name] -= 1
            raise ModelUnavailable("the factory failed on purpose")
        return OnnxModel(manifest, session, timings)

    registry = make_registry(model_root, cache_dir, budget_mb=1, model_factory=factory)
    a, b = registry.resolve("mlp-a"), registry.resolve("mlp-b")
    registry.get(a)
    with pytest.raises(ModelUnavailable, match="on purpose"):
        registry.get(b)
    # The documented trade-off: opening the session needed the room, so a went first.
    assert registry.loaded(a) is None
    assert registry.memory_bytes() == (0, 0)
    registry.get(b)  # nothing is left reserved: the retry fits
    assert registry.memory_bytes() == (model_cost_bytes(registry.manifest(b)), 0)


def test_an_evicted_batching_model_is_closed_and_lets_go_of_its_session(model_root, cache_dir):
    def batching(manifest, session, timings):
        return BatchingModel(OnnxModel(manifest, session, timings), BatchingConfig(max_queue_delay_ms=1))

    registry = make_registry(model_root, cache_dir, budget_mb=1, model_factory=batching)
    a, b = registry.resolve("mlp-a"), registry.resolve("mlp-b")
    held = registry.get(a)  # as a request thread holds it while the eviction happens
    request = {"input": np.ones((2, 16), dtype=np.float32)}
    assert held.predict(request)["probabilities"].shape == (2, 5)
    session = weakref.ref(held.inner.session)
    registry.get(b)  # evicts a
    assert registry.loaded(a) is None and not held.ready()
    with pytest.raises(ModelUnavailable, match="unloaded") as raised:
        held.predict(request)
    assert raised.value.status_code == 503
    del held, raised
    gc.collect()
    assert session() is None, "nothing may keep an evicted model's session (GPU memory) alive"
    registry.clear()


def tampered(manifest: dict, case: str) -> dict:
    """``manifest`` (as JSON data) with its signature changed as ``case`` says."""
    inputs, outputs = manifest["inputs"], manifest["outputs"]
    if case == "datatype":
        inputs[0]["datatype"] = "FP64"
    elif case == "name":
        inputs[0]["name"] = "features"
    elif case == "rank":
        inputs[0]["shape"] = [-1, 16, 1]
    elif case == "fixed-dimension":
        inputs[0]["shape"] = [-1, 15]
    elif case == "extra-output":
        manifest["outputs"] = [*outputs, {"name": "label", "datatype": "INT64", "shape": [-1]}]
    return manifest


SIGNATURE_MISMATCHES = {
    "datatype": "input 'input' is FP32 in the model, FP64 in the manifest",
    "name": "input 'features' is in the manifest, not in the model; the model's input 'input' is not in the manifest",
    "rank": "input 'input' has rank 2 in the model, 3 in the manifest",
    "fixed-dimension": "input 'input' has dimension 1 of 16 in the model, 15 in the manifest",
    "extra-output": "output 'label' is in the manifest, not in the model",
}


@pytest.mark.parametrize(("case", "fragment"), SIGNATURE_MISMATCHES.items(), ids=SIGNATURE_MISMATCHES)
def test_a_manifest_that_does_not_match_its_session_is_refused_and_nothing_stays(
    model_root, cache_dir, tmp_path, case, fragment
):
    root = tmp_path / "store"
    shutil.copytree(model_root / "mlp-a", root / "mlp-a")
    manifest_path = root / "mlp-a" / "1" / "manifest.json"
    original = manifest_path.read_text()
    manifest_path.write_text(json.dumps(tampered(json.loads(original), case)))
    registry = make_registry(root, cache_dir, budget_mb=8)
    ref = registry.resolve("mlp-a")
    with pytest.raises(ArtifactRejected) as raised:
        registry.get(ref)
    assert raised.value.status_code == 503
    assert re.search(fragment, raised.value.message), raised.value.message
    assert "mlp-a@1: its manifest does not match the model" in raised.value.message
    assert "Package the model again" in raised.value.message
    assert registry.loaded(ref) is None and registry.memory_bytes() == (0, 0)
    assert ref not in registry._manifests, "the refused manifest is read again next time"
    assert not list(cache_dir.glob("*.onnx")), "nothing of the refused model stays in the disk cache"
    manifest_path.write_text(original)  # fixed in place: the next request reads and serves it
    assert registry.get(ref).predict({"input": np.ones((1, 16), np.float32)})["probabilities"].shape == (1, 5)


def test_a_process_serving_several_versions_resolves_each_and_the_first_by_default(tmp_path, cache_dir):
    """Two versions of one model side by side, as a Lambda-tier function serves its catalog's
    versions: a request without a version gets the default (listed first); each version loads its own bytes."""
    root = tmp_path / "store"
    for version, seed in (("2", 7), ("1", 8)):
        source = samples.mlp(
            tmp_path / f"v{version}.onnx", features=16, hidden=8, layers=1, classes=5, seed=seed
        )
        package_model(source, name="mlp", version=version, out_dir=root / "mlp" / version)
    settings = Settings(
        model_root=f"file://{root}", models=(ModelRef("mlp", "2"), ModelRef("mlp", "1")), cache_dir=cache_dir
    )
    registry = ModelRegistry(settings)
    assert registry.resolve("mlp") == ModelRef("mlp", "2")
    assert registry.resolve("mlp", "1") == ModelRef("mlp", "1")
    rows = np.ones((1, 16), np.float32)
    answers = {}
    for ref in (registry.resolve("mlp"), registry.resolve("mlp", "1")):
        model = registry.get(ref)
        assert model.manifest.version == ref.version
        answers[ref.version] = next(iter(model.predict({"input": rows}).values()))
    assert not np.allclose(answers["1"], answers["2"])  # different weights: each version its own bytes
    with pytest.raises(
        ModelNotFound, match="version '3' of model 'mlp' is not deployed; deployed versions: 2, 1"
    ):
        registry.resolve("mlp", "3")
