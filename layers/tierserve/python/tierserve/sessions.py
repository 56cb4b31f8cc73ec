"""The warm-start cache: models stay loaded at module level across invocations.

A lazy, process-wide registry keyed by (model, version, sha256), bounded by a memory
budget (least recently used models are dropped first), with one load at a time per
model. ``clear()`` empties it; tests call it between cases.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from tierserve.catalog import Manifest
from tierserve.config import MB, ModelRef, Settings
from tierserve.errors import ModelNotFound, ModelUnavailable
from tierserve.model import (
    CPU_PROVIDERS,
    LoadTimings,
    Model,
    ModelFactory,
    OnnxModel,
    ProviderSpec,
    create_session,
)
from tierserve.store import ArtifactStore
from tierserve.telemetry import (
    CACHE_HIT,
    CACHE_MISS,
    MODEL_DECOMPRESS_MS,
    MODEL_FETCH_MS,
    MODEL_SESSION_MS,
    logger,
    record_count,
    record_ms,
    stopwatch,
    tracer,
)

# A loaded session holds the weights plus working buffers; measured near 1.2x on CPU.
SESSION_MEMORY_FACTOR = 1.2


def model_cost_bytes(manifest: Manifest) -> int:
    return int(manifest.model.bytes * SESSION_MEMORY_FACTOR)


class ModelRegistry:
    """Models this process serves, loaded on first use and kept warm."""

    def __init__(
        self,
        settings: Settings,
        store_factory: Callable[[], ArtifactStore] | None = None,
        providers: Sequence[ProviderSpec] = CPU_PROVIDERS,
        model_factory: ModelFactory = OnnxModel,
    ) -> None:
        self.settings = settings
        self.providers = tuple(providers)
        self._model_factory = model_factory
        self._store_factory = store_factory or (lambda: ArtifactStore.from_settings(settings))
        self._store: ArtifactStore | None = None
        self._manifests: dict[ModelRef, Manifest] = {}
        self._models: OrderedDict[tuple[str, str, str], Model] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[ModelRef, threading.Lock] = {}

    @property
    def store(self) -> ArtifactStore:
        if self._store is None:
            self._store = self._store_factory()
        return self._store

    def resolve(self, name: str, version: str | None = None) -> ModelRef:
        """The deployed reference for ``name`` (and ``version`` if given), or a 404 that says why."""
        ref = self.settings.model_ref(name)
        served = ", ".join(str(r) for r in self.settings.models) or "none"
        if ref is None:
            raise ModelNotFound(f"model {name!r} is not served here; models served: {served}")
        if version is not None and version != ref.version:
            raise ModelNotFound(
                f"version {version!r} of model {name!r} is not deployed; deployed version: {ref.version}"
            )
        return ref

    def manifest(self, ref: ModelRef) -> Manifest:
        """The manifest of a served model, read once from the store and then remembered."""
        manifest = self._manifests.get(ref)
        if manifest is None:
            manifest = self.store.read_manifest(ref.name, ref.version)
            self._manifests[ref] = manifest
        return manifest

    def loaded(self, ref: ModelRef) -> Model | None:
        manifest = self._manifests.get(ref)
        return None if manifest is None else self._models.get(manifest.cache_key)

    def get(self, ref: ModelRef) -> Model:
        """The warm model for ``ref``, loading it on first use. A warm hit touches no S3."""
        with self._lock:
            model = self._hit(ref)
            load_lock = self._load_locks.setdefault(ref, threading.Lock())
        if model is not None:
            record_count(CACHE_HIT)
            return model
        with load_lock:
            with self._lock:
                model = self._hit(ref)
            if model is not None:
                record_count(CACHE_HIT)
                return model
            record_count(CACHE_MISS)
            return self._load(ref)

    def _hit(self, ref: ModelRef) -> Model | None:
        manifest = self._manifests.get(ref)
        if manifest is None or manifest.cache_key not in self._models:
            return None
        self._models.move_to_end(manifest.cache_key)
        return self._models[manifest.cache_key]

    @tracer.capture_method
    def _load(self, ref: ModelRef) -> Model:
        manifest = self.manifest(ref)
        self._make_room(manifest)
        fetched = self.store.fetch(manifest)
        with stopwatch() as session_ms:
            session = create_session(
                fetched.path, manifest, threads=self.settings.threads, providers=self.providers
            )
        timings = LoadTimings(fetched.fetch_ms, fetched.decompress_ms, session_ms[0], fetched.cache_hit)
        model = self._model_factory(manifest, session, timings)
        with self._lock:
            self._models[manifest.cache_key] = model
        record_ms(MODEL_FETCH_MS, timings.fetch_ms)
        record_ms(MODEL_DECOMPRESS_MS, timings.decompress_ms)
        record_ms(MODEL_SESSION_MS, timings.session_ms)
        logger.info(
            "model loaded",
            extra={
                "model": str(ref),
                "fetch_ms": round(timings.fetch_ms, 1),
                "decompress_ms": round(timings.decompress_ms, 1),
                "session_ms": round(timings.session_ms, 1),
                "disk_cache_hit": timings.cache_hit,
                "providers": session.get_providers(),
            },
        )
        return model

    def _make_room(self, manifest: Manifest) -> None:
        budget = self.settings.memory_budget_mb * MB
        needed = model_cost_bytes(manifest)
        if needed > budget:
            raise ModelUnavailable(
                f"{manifest.name}@{manifest.version} needs about {needed // MB} MB but the memory budget is "
                f"{budget // MB} MB: give the function more memory or set TIERSERVE_MEMORY_BUDGET_MB"
            )
        with self._lock:
            while self._models and self._used_bytes() + needed > budget:
                evicted_key, _ = self._models.popitem(last=False)
                logger.info(
                    "model evicted to stay within the memory budget", extra={"model": evicted_key[:2]}
                )

    def _used_bytes(self) -> int:
        return sum(model_cost_bytes(m.manifest) for m in self._models.values())

    def preload(self) -> None:
        """Load the models the preload setting names, during init (a failure is logged, not fatal:
        the first request retries and reports it)."""
        for ref in self.settings.models:
            if self.settings.should_preload(ref.name):
                try:
                    self.get(ref)
                except Exception:
                    logger.exception(
                        "preload failed; the first request will retry", extra={"model": str(ref)}
                    )

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._manifests.clear()
            self._load_locks.clear()
            self._store = None
