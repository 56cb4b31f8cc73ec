"""The response cache: a deterministic model's answers kept in memory, opt-in per model.

A model's manifest turns it on (``"response_cache": {"max_entries": 1024, "max_mb": 64}``);
without it nothing is cached. Each execution environment (a Lambda function's, the GPU
server's process) keeps its own cache: answers never leave the process.

    key     sha256 over the model (name, version and the artifact's sha256), every input
            (name, datatype, shape and bytes, in name order), the outputs asked for, and
            the caller's identity unless the model says ``"shared_across_callers": true``
    value   the output arrays after the output limits, read-only; each response is encoded
            afresh for its own request (JSON or binary, its own ``id``)
    bounds  per model version, least recently used first out: ``max_entries`` answers and
            ``max_mb`` of their outputs; an answer larger than ``max_mb`` is not kept

One model's answers never evict another's, a caller never reads another caller's answer
unless the model allows it (so where the caller is not known, unauthenticated or behind
SageMaker, only a model that allows it is cached), and a new version (or a new artifact under the same version) is a
different key. Hits and misses are the metrics ``ResponseCacheHit`` and ``ResponseCacheMiss``
with the model's dimensions. Only a model whose outputs depend on its inputs alone should opt
in (no sampling, no dropout at inference, no clock).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tierserve.audit import identified
from tierserve.catalog import Manifest
from tierserve.settings import MB
from tierserve.telemetry import RESPONSE_CACHE_HIT, RESPONSE_CACHE_MISS, record_count


def request_digest(
    manifest: Manifest,
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None,
    caller: str | None,
) -> bytes:
    """The cache key of one decoded request (see the module docstring); ``caller`` is None
    when the model shares answers across callers."""
    digest = hashlib.sha256()
    _field(digest, b"tierserve-response-cache-v1")
    for part in (manifest.name, manifest.version, manifest.model.sha256):
        _field(digest, part.encode())
    _field(digest, b"shared" if caller is None else b"caller:" + caller.encode("utf-8", "surrogatepass"))
    if output_names is None:
        _field(digest, b"every output")
    else:
        _field(digest, b"outputs:%d" % len(output_names))
        for output_name in output_names:
            _field(digest, output_name.encode("utf-8", "surrogatepass"))
    for name in sorted(inputs):
        array = np.asarray(inputs[name])
        _field(digest, name.encode("utf-8", "surrogatepass"))
        _field(digest, array.dtype.str.encode())
        _field(digest, ",".join(str(d) for d in array.shape).encode())
        if array.dtype.kind == "O":  # BYTES: each element, length-prefixed
            for element in array.reshape(-1):
                _field(
                    digest,
                    element if isinstance(element, bytes) else str(element).encode("utf-8", "surrogatepass"),
                )
        else:
            _field(digest, np.ascontiguousarray(array).tobytes())
    return digest.digest()


def _field(digest: hashlib._Hash, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def outputs_bytes(outputs: Mapping[str, np.ndarray]) -> int:
    """What ``outputs`` hold, as the cache counts it (BYTES elements by their length)."""
    total = 0
    for array in outputs.values():
        if array.dtype.kind == "O":
            total += sum(len(e) if isinstance(e, bytes | str) else 8 for e in array.reshape(-1))
        else:
            total += array.nbytes
    return total


@dataclass(frozen=True)
class _Entry:
    outputs: dict[str, np.ndarray]
    size: int


class _ModelCache:
    """One model version's answers, least recently used first out."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.bytes = 0

    def get(self, key: bytes) -> _Entry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: _Entry) -> None:
        if entry.size > self.max_bytes:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self.entries[key] = entry
        self.bytes += entry.size
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.size


class ResponseCache:
    """Every opted-in model's cache of one execution environment (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str, str], _ModelCache] = {}

    def key(
        self,
        manifest: Manifest,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None,
        caller: str,
    ) -> bytes | None:
        """The key of a request, or None (nothing cached) when ``manifest`` does not opt in, or
        when answers are kept per caller and ``caller`` names nobody (``auth=none``, or the GPU
        server, which SageMaker does not tell who called): those callers cannot be kept apart."""
        policy = manifest.response_cache
        if policy is None or not (policy.shared_across_callers or identified(caller)):
            return None
        return request_digest(
            manifest, inputs, output_names, None if policy.shared_across_callers else caller
        )

    def get(self, manifest: Manifest, key: bytes) -> dict[str, np.ndarray] | None:
        """The answer kept under ``key``, or None; counted as a hit or a miss of the model."""
        with self._lock:
            cache = self._models.get(manifest.cache_key)
            entry = cache.get(key) if cache is not None else None
        record_count(RESPONSE_CACHE_MISS if entry is None else RESPONSE_CACHE_HIT, model=manifest)
        return None if entry is None else dict(entry.outputs)

    def put(self, manifest: Manifest, key: bytes, outputs: Mapping[str, np.ndarray]) -> None:
        """Keep ``outputs`` (copied, read-only) under ``key``, within the model's bounds."""
        policy = manifest.response_cache
        if policy is None:
            return
        kept = {name: _frozen(array) for name, array in outputs.items()}
        entry = _Entry(kept, outputs_bytes(kept))
        with self._lock:
            cache = self._models.get(manifest.cache_key)
            if cache is None:
                cache = self._models[manifest.cache_key] = _ModelCache(policy.max_entries, policy.max_mb * MB)
            cache.put(key, entry)

    def size(self, manifest: Manifest) -> tuple[int, int]:
        """``(entries, bytes)`` kept for ``manifest``'s model version."""
        with self._lock:
            cache = self._models.get(manifest.cache_key)
            return (0, 0) if cache is None else (len(cache.entries), cache.bytes)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


def _frozen(array: np.ndarray) -> np.ndarray:
    copy = np.array(array, copy=True)
    copy.flags.writeable = False
    return copy
