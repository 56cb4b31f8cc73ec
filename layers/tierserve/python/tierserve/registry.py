"""The warm-start cache: models stay loaded at module level across invocations.

A lazy, process-wide registry keyed by (model, version, sha256), bounded by a memory
budget (least recently used models are dropped first), with one load at a time per
model. ``clear()`` empties it; tests call it between cases.

The budget holds with loads of different models in flight at once: a load reserves its
model's cost under the registry's lock before it opens a session, and the reservation
becomes the loaded model (or is released if the load fails). Models are evicted only to
fit a reservation, least recently used first, and only as many as needed. Trade-off: the
artifact is fetched and verified before anything is evicted, so a download or digest
failure costs no warm model; a model onnxruntime then refuses to open has already cost the
models evicted for it from memory (opening a session is what needs the memory, so room is made
first), never anything on disk: the disk cache keeps only what onnxruntime accepted.
Evicted models that have a ``close()`` (the GPU server's batching wrapper) are closed, so
nothing keeps their session alive.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from tierserve import aws
from tierserve.catalog import Manifest
from tierserve.errors import ArtifactRejected, ModelNotFound, ModelUnavailable, Overloaded
from tierserve.model import (
    CPU_PROVIDERS,
    LoadTimings,
    Model,
    ModelFactory,
    OnnxModel,
    ProviderSpec,
    create_session,
)
from tierserve.settings import MB, ModelRef, Settings
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
# The longest a load waits for other loads in flight to leave room in the budget.
RESERVE_TIMEOUT_S = 120.0


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
        reserve_timeout_s: float = RESERVE_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.providers = tuple(providers)
        self._model_factory = model_factory
        self._store_factory = store_factory or (lambda: ArtifactStore.from_settings(settings))
        self._store: ArtifactStore | None = None
        self._manifests: dict[ModelRef, Manifest] = {}
        self._models: OrderedDict[tuple[str, str, str], Model] = OrderedDict()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when a reservation ends
        self._reserved = 0  # bytes reserved by loads in flight
        self._reserve_timeout_s = reserve_timeout_s
        self._load_locks: dict[ModelRef, threading.Lock] = {}

    @property
    def store(self) -> ArtifactStore:
        if self._store is None:
            self._store = self._store_factory()
        return self._store

    def resolve(self, name: str, version: str | None = None) -> ModelRef:
        """The deployed reference for ``name`` (and ``version`` if given), or a 404 that says why.

        A process may serve several versions of a model (``TIERSERVE_MODELS`` lists each): the
        first listed is the model's default, which a request without a version gets."""
        ref = self.settings.model_ref(name)
        served = ", ".join(str(r) for r in self.settings.models) or "none"
        if ref is None:
            raise ModelNotFound(f"model {name!r} is not served here; models served: {served}")
        if version is None or version == ref.version:
            return ref
        versions = [r for r in self.settings.models if r.name == name]
        exact = next((r for r in versions if r.version == version), None)
        if exact is None:
            deployed = ", ".join(r.version for r in versions)
            what = "deployed versions" if len(versions) > 1 else "deployed version"
            raise ModelNotFound(f"version {version!r} of model {name!r} is not deployed; {what}: {deployed}")
        return exact

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
            record_count(CACHE_HIT, model=ref)
            return model
        with _held(load_lock, ref):
            with self._lock:
                model = self._hit(ref)
            if model is not None:
                record_count(CACHE_HIT, model=ref)
                return model
            record_count(CACHE_MISS, model=ref)
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
        needed = self._cost_within_budget(manifest)
        # Fetched and verified before any eviction: a failed fetch costs no warm model. The copy
        # joins the disk cache only once onnxruntime has accepted it (ArtifactStore.verified).
        with self.store.verified(manifest) as fetched:
            # A verified copy outlasts this error in the disk cache: a retry goes on from there.
            aws.check_deadline(f"opening {ref} (its verified copy stays in the disk cache)")
            self._reserve(manifest, needed)
            model: Model | None = None
            try:
                with stopwatch() as session_ms:
                    session = create_session(
                        fetched.path,
                        manifest,
                        threads=self.settings.threads,
                        providers=self.providers,
                        map_weights=fetched.kept,
                    )
                timings = LoadTimings(
                    fetched.fetch_ms, fetched.decompress_ms, session_ms[0], fetched.cache_hit, fetched.gets
                )
                model = self._model_factory(manifest, session, timings)
            except ArtifactRejected:
                self._forget(ref)
                raise
            finally:  # the reservation becomes the loaded model, or is released if the load failed
                with self._room:
                    if model is not None:
                        self._models[manifest.cache_key] = model
                    self._reserved -= needed
                    self._room.notify_all()
        record_ms(MODEL_FETCH_MS, timings.fetch_ms, model=ref)
        record_ms(MODEL_DECOMPRESS_MS, timings.decompress_ms, model=ref)
        record_ms(MODEL_SESSION_MS, timings.session_ms, model=ref)
        logger.info(
            "model loaded",
            extra={
                "model": str(ref),
                "fetch_ms": round(timings.fetch_ms, 1),
                "decompress_ms": round(timings.decompress_ms, 1),
                "session_ms": round(timings.session_ms, 1),
                "disk_cache_hit": timings.cache_hit,
                "artifact_gets": timings.artifact_gets,
                "providers": session.get_providers(),
            },
        )
        return model

    def _forget(self, ref: ModelRef) -> None:
        """A model refused at load (onnxruntime cannot open it, or its manifest does not match
        its session) leaves nothing behind: the manifest is read again on the next request, and
        the store keeps no copy of what was refused."""
        with self._lock:
            self._manifests.pop(ref, None)

    def _cost_within_budget(self, manifest: Manifest) -> int:
        """The model's cost in bytes, or a 503 when it could never fit the budget."""
        budget = self.settings.memory_budget_mb * MB
        needed = model_cost_bytes(manifest)
        if needed > budget:
            raise ModelUnavailable(
                f"{manifest.name}@{manifest.version} needs about {needed // MB} MB but the memory budget is "
                f"{budget // MB} MB: give the function more memory or set TIERSERVE_MEMORY_BUDGET_MB"
            )
        return needed

    def _reserve(self, manifest: Manifest, needed: int) -> None:
        """Reserve ``needed`` bytes of the budget: evict least recently used models when that
        makes room, else wait for loads in flight to commit or release theirs.

        Raises:
            Overloaded: no room within ``reserve_timeout_s`` (other loads hold it): retryable,
                so the S3 worker retries the input instead of writing an error for it.
        """
        budget = self.settings.memory_budget_mb * MB
        deadline = time.monotonic() + self._reserve_timeout_s
        evicted: list[Model] = []
        try:
            with self._room:
                while self._used_bytes() + self._reserved + needed > budget:
                    if self._reserved + needed <= budget:  # evicting loaded models makes room
                        key, model = self._models.popitem(last=False)
                        evicted.append(model)
                        logger.info(
                            "model evicted to stay within the memory budget", extra={"model": key[:2]}
                        )
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Overloaded(
                            f"{manifest.name}@{manifest.version} found no room in the memory budget: other "
                            "models are loading into it; retry shortly"
                        )
                    self._room.wait(remaining)
                self._reserved += needed
        finally:
            for model in evicted:
                close_model(model)

    def _used_bytes(self) -> int:
        return sum(model_cost_bytes(m.manifest) for m in self._models.values())

    def memory_bytes(self) -> tuple[int, int]:
        """``(loaded, reserved)``: bytes of the loaded models, and bytes reserved by loads in flight."""
        with self._lock:
            return self._used_bytes(), self._reserved

    def preload(self) -> None:
        """Load the models the preload setting names, during init (a failure is logged, not fatal:
        the first request retries and reports it). In Lambda the init phase's own time limit
        bounds it (:meth:`tierserve.aws.Deadline.for_init`): a slow S3 cannot make the init
        time out, which would only run it again inside the first invocation."""
        deadline = aws.Deadline.for_init(self.settings.initialization_type)
        for ref in self.settings.models:
            if self.settings.should_preload(ref.name):
                try:
                    with aws.within(deadline):
                        self.get(ref)
                except Exception:
                    logger.exception(
                        "preload failed; the first request will retry", extra={"model": str(ref)}
                    )

    def clear(self) -> None:
        """Forget every model (closing those that can be closed), manifest and store."""
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
            self._manifests.clear()
            self._load_locks.clear()
            self._store = None
        for model in models:
            close_model(model)


@contextmanager
def _held(lock: threading.Lock, ref: ModelRef) -> Iterator[None]:
    """Hold ``lock`` (another thread may be loading ``ref``), waiting no longer than the
    current deadline allows."""
    deadline = aws.current_deadline()
    if not lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline.remaining())):
        raise Overloaded(f"{ref} is still loading for another request; retry shortly")
    try:
        yield
    finally:
        lock.release()


def close_model(model: Model) -> None:
    """Close ``model`` if it can be (the batching wrapper stops its thread, which otherwise keeps
    the session and its GPU memory alive); a failure to close is logged, never raised."""
    close = getattr(model, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            logger.exception("closing an unloaded model failed", extra={"model": model.manifest.name})
