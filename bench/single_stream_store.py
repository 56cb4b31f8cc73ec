# A frozen copy of tierserve/store.py as it was before the parallel fetch (issue 9): one S3 stream,
# both sha256 passes, the /tmp write on the critical path. bench.cold_start times it beside the
# loader as `single_stream`; nothing else imports it.
"""Fetch model artifacts: stream from S3 or a local folder, decompress while downloading,
verify both sha256 digests, bound decompression, and keep a verified copy under /tmp.

The cache is keyed by the decompressed model's sha256, written atomically (a partial
file, then a rename) and bounded in total size (least recently used files go first).
Nothing that failed a check is ever cached.

A load is bounded by the deadline of the thread that asks for it (:func:`tierserve.aws.within`:
the invocation's remaining time less a margin): every S3 call fits in it, and the stream is
abandoned when its bytes do not arrive in time (an S3 that stalls or trickles), with a 504
that says so. Partial files of loads that died (a process killed at its timeout) are removed
when a store starts and whenever the cache is bounded.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import queue
import shutil
import socket
import stat
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlparse

import zstandard

from tierserve import aws
from tierserve.catalog import Manifest, ManifestError, manifest_key
from tierserve.errors import (
    ArtifactRejected,
    ModelUnavailable,
    TierserveError,
    UpstreamTimeout,
    UpstreamUnavailable,
    is_retryable,
)
from tierserve.settings import MB, MODEL_BUCKET_ENV, MODEL_ROOT_ENV, Settings
from tierserve.telemetry import logger

CHUNK_BYTES = 1 * MB
PREFETCH_CHUNKS = 16
WRITE_BUFFERS = 4
MAX_MANIFEST_BYTES = 1 * MB
PARTIAL_SUFFIX = ".partial"
# A partial file nobody has written to for this long belongs to a dead load, whatever its
# name says: a live one writes continuously, and no Lambda invocation lasts longer.
STALE_PARTIAL_S = 15 * 60
# Partial files this process is writing now (every store of the process: two registries, the
# API's and the local pipeline's, may share one cache folder).
_writing: set[Path] = set()
_writing_lock = threading.Lock()


class Source(Protocol):
    """Where artifacts live: ``open`` an object as a stream, ``describe`` it for messages."""

    def describe(self, key: str) -> str: ...

    def open(self, key: str) -> IO[bytes]: ...


class S3Source:
    """Objects under ``s3://bucket/prefix``; botocore errors become typed tierserve errors
    (:func:`artifact_error`, naming ``setting``, the variable that chose the bucket)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        client_factory: Callable[[], Any] = aws.s3_client,
        setting: str = MODEL_BUCKET_ENV,
    ) -> None:
        self.bucket, self.prefix, self._client_factory = bucket, prefix.strip("/"), client_factory
        self.setting = setting

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def open(self, key: str) -> IO[bytes]:
        try:
            return self._client_factory().get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as error:  # botocore's tree is wide; aws.classify reads it
            raise artifact_error(error, self.describe(key), self.setting) from error


class FileSource:
    """Files under a local folder (``file://``), for the local API and tests."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def describe(self, key: str) -> str:
        return (self.root / key).as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ArtifactRejected(f"artifact key {key!r} leaves the model folder")
        return path

    def open(self, key: str) -> IO[bytes]:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise ModelUnavailable(
                f"{self.describe(key)} does not exist: package and upload the model first "
                "(tierserve package MODEL.onnx --name N --version V --upload ...)"
            ) from None


def artifact_error(error: BaseException, where: str, setting: str = MODEL_BUCKET_ENV) -> TierserveError:
    """The error a client sees when reading the model artifact ``where`` failed with ``error``
    (classified by :func:`tierserve.aws.classify`); ``setting`` names the variable that chose
    the bucket. A tierserve error passes through unchanged."""
    if isinstance(error, aws.OutOfTime):  # the deadline refused the call (or its next attempt)
        return s3_too_slow(where)
    if isinstance(error, TierserveError):
        return error
    failure = aws.classify(error)
    if failure.bucket_missing:
        return ModelUnavailable(f"the bucket of {where} does not exist: check {setting}")
    if failure.kind == "gone":
        return ModelUnavailable(
            f"{where} does not exist: upload the model (tierserve package ... --upload) "
            "or fix the deployed version"
        )
    if failure.kind == "denied":
        return ModelUnavailable(
            f"access to {where} is denied ({failure.code}): the function's role must allow s3:GetObject there"
        )
    if failure.kind == "timeout":
        return s3_too_slow(where)
    return UpstreamUnavailable(f"S3 is unavailable while reading {where} ({failure.code}); retry shortly")


def s3_too_slow(where: str) -> UpstreamTimeout:
    """The 504 of a load that ran out of time: S3 stalled, or sent ``where`` too slowly."""
    return UpstreamTimeout(
        f"S3 was too slow: {where} did not arrive within the time this request had (the "
        "invocation's remaining time, less a margin to answer); retry: a retry resumes the model's "
        "warm-up, from the verified copy in /tmp when the download had finished"
    )


@dataclass(frozen=True)
class FetchedModel:
    """A verified, decompressed model on local disk, and what fetching it cost."""

    path: Path
    cache_hit: bool
    fetch_ms: float = 0.0
    decompress_ms: float = 0.0


class ArtifactStore:
    """Reads manifests and artifacts from one source and caches verified models on disk."""

    def __init__(self, source: Source, cache_dir: Path, cache_max_bytes: int) -> None:
        self.source = source
        self.cache_dir = cache_dir
        self.cache_max_bytes = cache_max_bytes
        self.remove_dead_partials()

    @classmethod
    def from_settings(
        cls, settings: Settings, client_factory: Callable[[], Any] | None = None
    ) -> ArtifactStore:
        if settings.model_root:
            source = source_for_uri(settings.model_root, client_factory)
        elif settings.model_bucket:
            source = S3Source(settings.model_bucket, settings.model_prefix, client_factory or aws.s3_client)
        else:
            raise ModelUnavailable(
                "no model location is configured: set TIERSERVE_MODEL_BUCKET (or TIERSERVE_MODEL_ROOT)"
            )
        return cls(source, settings.cache_dir, settings.cache_max_mb * MB)

    def read_manifest(self, name: str, version: str) -> Manifest:
        key = manifest_key("", name, version)
        where = self.source.describe(key)
        reader = _PrefetchingReader(
            self.source.open(key),
            where,
            max_bytes=MAX_MANIFEST_BYTES,
            deadline=aws.current_deadline(),
            too_long=f"{where} is over {MAX_MANIFEST_BYTES} bytes: not a manifest",
        )
        try:
            raw = reader.read()
        finally:
            reader.close()
        try:
            manifest = Manifest.from_json(raw)
        except (ValueError, ManifestError) as error:
            raise ArtifactRejected(f"{self.source.describe(key)} is not a valid manifest: {error}") from None
        if (manifest.name, manifest.version) != (name, version):
            raise ArtifactRejected(
                f"{self.source.describe(key)} describes {manifest.name}@{manifest.version}, not {name}@{version}"
            )
        return manifest

    @contextmanager
    def verified(self, manifest: Manifest) -> Iterator[FetchedModel]:
        """A verified local copy of the model, alone in a folder of its own, for the caller to open.

        It joins the disk cache only when the block ends well (onnxruntime accepted it), or with
        a retryable error (no memory room yet, no time left: verified, not refused, so a retry
        goes on from there). A block that raises anything else leaves nothing; a cached copy
        that the block refuses (:class:`ArtifactRejected`) leaves the cache. The folder holds the
        model's file alone, so whatever the model declares (ONNX external data, which
        onnxruntime resolves in the model's folder and never outside it) can reach only its own
        bytes.

        Raises:
            ArtifactRejected: digest or size mismatch, decompression past the declared size,
                or a corrupt compressed stream. Nothing is cached, nothing is evicted.
            ModelUnavailable / UpstreamUnavailable / UpstreamTimeout: the artifact cannot be read.
        """
        cached = self.cache_path(manifest)
        if _is_cached(cached, manifest):
            os.utime(cached)
            try:
                yield FetchedModel(cached, cache_hit=True)
            except ArtifactRejected:
                _remove(cached.parent)
                raise
            return
        staging, fetch_ms, decompress_ms = self._download_to_staging(manifest)
        committed = False
        try:
            yield FetchedModel(staging / cached.name, False, fetch_ms, decompress_ms)
            committed = self._commit(staging, cached.parent)
        except BaseException as error:
            if is_retryable(error):
                committed = self._commit(staging, cached.parent)
            raise
        finally:
            if not committed:
                _remove(staging)
            with _writing_lock:
                _writing.discard(staging)

    def fetch(self, manifest: Manifest) -> FetchedModel:
        """A verified copy of the model in the disk cache, for tools that check a package the
        way the serving core reads it. Serving opens models through :meth:`verified`, which
        caches only what onnxruntime accepted."""
        with self.verified(manifest) as fetched:
            pass
        return replace(fetched, path=self.cache_path(manifest))

    def cache_path(self, manifest: Manifest) -> Path:
        """Where the model's verified copy is cached: ``{entry}/model.{format}``, where the entry
        folder (:func:`entry_name`) holds nothing else."""
        return self.cache_dir / entry_name(manifest) / f"model.{manifest.format}"

    def _download_to_staging(self, manifest: Manifest) -> tuple[Path, float, float]:
        """Download and verify the model into a new private folder; returns it and the timings.
        The folder is named as a partial of this process (its pid), and is being written."""
        # The writer's pid in the name tells a later process whose partial folder it finds.
        staging = (
            self.cache_dir / f".{manifest.stored.sha256}.{os.getpid()}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
        )
        with _writing_lock:
            _writing.add(staging)
        try:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                staging.mkdir(mode=0o700)
            except OSError as error:
                raise _cache_unwritable(self.cache_dir, error) from None
            key = f"{manifest.key_prefix}/{manifest.artifact}"
            destination = staging / f"model.{manifest.format}"
            fetch_ms, decompress_ms = self._download_verified(key, manifest, destination)
        except BaseException:
            _remove(staging)
            with _writing_lock:
                _writing.discard(staging)
            raise
        return staging, fetch_ms, decompress_ms

    def _commit(self, staging: Path, entry: Path) -> bool:
        """Move a verified model's folder into the cache, then bound the cache; False when a
        racing load committed the same model first (the caller removes ``staging``)."""
        try:
            os.replace(staging, entry)
        except OSError:
            return False
        self._evict(keep=entry)
        return True

    def _download_verified(self, key: str, manifest: Manifest, destination: Path) -> tuple[float, float]:
        """Stream ``key`` into ``destination``: three stages overlap, each on its own thread.

        The prefetch thread reads the network and hashes the stored bytes; this thread
        decompresses into reusable buffers; the writer thread hashes the decompressed bytes
        and writes them. hashlib, zstandard and file writes release the GIL, so on more than
        one core the stages run in parallel and the download hides most of the work.
        """
        where = self.source.describe(key)
        start = time.perf_counter()
        reader = _PrefetchingReader(
            self.source.open(key),
            where,
            max_bytes=manifest.stored.bytes,
            deadline=aws.current_deadline(),
            too_long=(
                f"{where} is longer than its declared {manifest.stored.bytes:,} bytes: refused; "
                "re-upload the artifact with its manifest"
            ),
        )
        written = 0
        try:
            with (
                _decompressing(reader, manifest.compression) as stream,
                _HashingWriter(destination) as out,
            ):
                while count := stream.readinto(buffer := out.free_buffer()):
                    written += count
                    if written > manifest.model.bytes:
                        raise ArtifactRejected(
                            f"{where} decompresses past its declared {manifest.model.bytes:,} bytes: refused "
                            "(a corrupt or hostile artifact); re-package the model"
                        )
                    out.submit(buffer, count)
                reader.drain()
        except (zstandard.ZstdError, zlib.error, EOFError, gzip.BadGzipFile) as error:
            raise ArtifactRejected(
                f"{where} is not a valid {manifest.compression} stream ({error}); re-package it"
            ) from None
        except OSError as error:  # the cache file: /tmp full or not writable
            raise _cache_unwritable(self.cache_dir, error) from None
        finally:
            reader.close()
        total_ms = (time.perf_counter() - start) * 1000
        _verify(where, "stored", reader.digest(), reader.count, manifest.stored.sha256, manifest.stored.bytes)
        _verify(where, "decompressed", out.digest(), written, manifest.model.sha256, manifest.model.bytes)
        fetch_ms = reader.wait_ms
        return fetch_ms, total_ms - fetch_ms

    def remove_dead_partials(self) -> int:
        """Remove the partial files of loads that died, and return how many went.

        A partial file is dead when no store of this process is writing it and it was written
        by this process (a Lambda runtime restarted after a timeout may get its predecessor's
        pid), by a process that is gone, or not at all for :data:`STALE_PARTIAL_S`. Another
        live process's partial file is left alone.
        """
        removed = 0
        for path in self._partials():
            if _is_dead_partial(path):
                _remove(path)
                removed += 1
        if removed:
            logger.info("removed partial model files of dead loads", extra={"files": removed})
        return removed

    def _partials(self) -> list[Path]:
        try:
            return list(self.cache_dir.glob(f".*{PARTIAL_SUFFIX}"))
        except OSError:
            return []

    def _evict(self, keep: Path) -> None:
        """Bound the cache: remove dead partial folders, then least recently used entries
        (never ``keep``) until the entries fit ``cache_max_bytes``."""
        self.remove_dead_partials()
        entries = [
            (*_entry_stats(path), path)
            for path in self.cache_dir.iterdir()
            if not path.name.startswith(".") and path != keep
        ]
        entries.sort()
        total = _entry_stats(keep)[1] + sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.cache_max_bytes:
                break
            total -= size
            _remove(path)


def entry_name(manifest: Manifest) -> str:
    """The cache folder of a model: named by what was verified, the stored bytes' sha256 (64 hex,
    checked on every download; those bytes decompress to one model), and the compression and
    format that read them. Nothing from a request, and no path from a manifest, reaches the
    file system; and a manifest that claims another model's decompressed digest cannot reach
    that model's copy."""
    return f"{manifest.stored.sha256}-{manifest.compression}-{manifest.format}"


def _is_cached(path: Path, manifest: Manifest) -> bool:
    """A cached copy is a plain file of the model's size in a plain folder (no links)."""
    try:
        folder, file = path.parent.lstat(), path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(folder.st_mode) and stat.S_ISREG(file.st_mode) and file.st_size == manifest.model.bytes
    )


def _entry_stats(path: Path) -> tuple[float, int]:
    """``(last used, bytes)`` of a cache entry: a model's folder, or a file of an older layout."""
    try:
        if not path.is_dir() or path.is_symlink():
            found = path.lstat()
            return found.st_mtime, found.st_size
        files = [child.lstat() for child in path.iterdir()]
    except OSError:
        return 0.0, 0
    return max((f.st_mtime for f in files), default=0.0), sum(f.st_size for f in files)


def _remove(path: Path) -> None:
    """Remove a file or a folder (of the cache or a partial download); gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _cache_unwritable(cache_dir: Path, error: OSError) -> ModelUnavailable:
    return ModelUnavailable(
        f"cannot write the model cache in {cache_dir} ({error.strerror or error}): give the "
        "function more ephemeral storage or lower TIERSERVE_CACHE_MAX_MB"
    )


def _is_dead_partial(path: Path) -> bool:
    with _writing_lock:
        if path in _writing:
            return False
    try:
        idle_s = time.time() - path.lstat().st_mtime
    except OSError:  # gone already
        return False
    pid = _writer_pid(path)
    return idle_s > STALE_PARTIAL_S or pid is None or pid == os.getpid() or not _process_alive(pid)


def _writer_pid(path: Path) -> int | None:
    """The pid in ``.{sha256}.{pid}.{random}.partial``, or None for any other name."""
    parts = path.name.split(".")
    return int(parts[2]) if len(parts) == 5 and parts[2].isdigit() else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but is not ours to signal
        return True
    return True


def _verify(where: str, form: str, digest: str, size: int, want_digest: str, want_size: int) -> None:
    if size != want_size or digest != want_digest:
        raise ArtifactRejected(
            f"{where}: the {form} bytes do not match the manifest (sha256 {digest[:12]}…, {size:,} bytes; "
            f"expected {want_digest[:12]}…, {want_size:,}): refused; re-upload the artifact with its manifest"
        )


class _PrefetchingReader:
    """Reads the stored stream on a background thread, so download and decompression overlap.

    The thread also counts and hashes the stored bytes as they arrive (every byte, including
    any that trail the compressed stream) and stops at the first byte past ``max_bytes``
    (raising ArtifactRejected with ``too_long``). Memory stays bounded: at most
    PREFETCH_CHUNKS chunks wait in the queue.

    With a ``deadline``, a read that waits past it raises the 504 of :func:`s3_too_slow`:
    an S3 that trickles bytes slowly enough never trips a socket timeout, so the reader
    itself keeps the time.
    """

    def __init__(
        self,
        body: IO[bytes],
        where: str,
        max_bytes: int,
        *,
        too_long: str,
        deadline: aws.Deadline | None = None,
    ) -> None:
        self._body, self._where, self._max_bytes = body, where, max_bytes
        self._too_long, self._deadline = too_long, deadline
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=PREFETCH_CHUNKS)
        self._chunk, self._position = b"", 0
        self._done = False
        self._stop = threading.Event()
        self._hash = hashlib.sha256()
        self.count = 0
        self.wait_ms = 0.0
        self._thread = threading.Thread(target=self._pump, name="tierserve-prefetch", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._body.read(CHUNK_BYTES)
                if chunk:
                    self.count += len(chunk)
                    if self.count > self._max_bytes:
                        raise ArtifactRejected(self._too_long)
                    self._hash.update(chunk)
                self._put(chunk or None)
                if not chunk:
                    return
        except Exception as error:
            self._put(error)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes from the current chunk (short reads are allowed for streams).

        A whole chunk is handed over as it is, without a copy.
        """
        if size < 0:
            return b"".join(iter(lambda: self.read(CHUNK_BYTES), b""))
        if self._position >= len(self._chunk) and (self._done or not self._next_chunk()):
            return b""
        if self._position == 0 and size >= len(self._chunk):
            self._position = len(self._chunk)
            return self._chunk
        data = self._chunk[self._position : self._position + size]
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _next_chunk(self) -> bool:
        start = time.perf_counter()
        try:
            item = self._queue.get(
                timeout=None if self._deadline is None else max(0.0, self._deadline.remaining())
            )
        except queue.Empty:
            raise s3_too_slow(self._where) from None
        self.wait_ms += (time.perf_counter() - start) * 1000
        if item is None:
            self._done = True
            return False
        if isinstance(item, BaseException):
            raise artifact_error(item, self._where)  # mid-stream: a dropped connection or a timeout
        self._chunk, self._position = item, 0
        return True

    def drain(self) -> None:
        """Read to the end, so the stored digest covers whatever trails the compressed stream."""
        while self.read(CHUNK_BYTES):
            pass

    def digest(self) -> str:
        """The stored bytes' sha256; complete once :meth:`drain` has returned."""
        return self._hash.hexdigest()

    def close(self) -> None:
        """Stop reading. A read still blocked on the network (an error, or the deadline, ended
        the load early) is woken first by shutting its connection down: closing alone would
        wait for that read, since the buffered reader holds its lock while it reads."""
        self._stop.set()
        if self._thread.is_alive():
            _shut_down_connection(self._body)
        with contextlib.suppress(Exception):  # closing a broken stream must not hide the first error
            self._body.close()


def _shut_down_connection(body: IO[bytes]) -> None:
    """Shut down the socket under a botocore streaming body (its urllib3 response's ``fileno``),
    so that a read blocked on it returns at once; anything else is left as it is."""
    raw = getattr(body, "_raw_stream", None)  # botocore's StreamingBody keeps the urllib3 response here
    try:
        descriptor = raw.fileno() if raw is not None else -1
    except (OSError, ValueError, AttributeError):
        return
    if descriptor < 0:
        return
    try:
        duplicate = os.dup(descriptor)
    except OSError:
        return
    try:
        connection = socket.socket(fileno=duplicate)
    except OSError:  # not a socket
        os.close(duplicate)
        return
    with connection, contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)  # acts on the connection, not on the descriptor


class _HashingWriter:
    """Hashes and writes decompressed buffers on a background thread.

    Buffers go round a small ring: the decompressor fills a free one while the thread hashes
    and writes the last, so memory stays at WRITE_BUFFERS x CHUNK_BYTES. A write error (a full
    disk) is raised on the next call, or when the block ends.
    """

    def __init__(self, destination: Path) -> None:
        self._destination = destination
        self._hash = hashlib.sha256()
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        for _ in range(WRITE_BUFFERS):
            self._free.put(bytearray(CHUNK_BYTES))

    def __enter__(self) -> _HashingWriter:
        self._file = self._destination.open("wb")
        self._thread = threading.Thread(target=self._drain, name="tierserve-writer", daemon=True)
        self._thread.start()
        return self

    def _drain(self) -> None:
        while (item := self._full.get()) is not None:
            buffer, count = item
            if self._error is None:
                try:
                    with memoryview(buffer)[:count] as view:
                        self._hash.update(view)
                        self._file.write(view)
                except BaseException as error:
                    self._error = error
            self._free.put(buffer)

    def free_buffer(self) -> bytearray:
        self._raise_error()
        return self._free.get()

    def submit(self, buffer: bytearray, count: int) -> None:
        self._full.put((buffer, count))

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._full.put(None)
        self._thread.join()
        self._file.close()
        if exc_type is None:
            self._raise_error()

    def digest(self) -> str:
        return self._hash.hexdigest()


class _decompressing:
    def __init__(self, raw: _PrefetchingReader, compression: str) -> None:
        self._raw, self._compression = raw, compression
        self._stream: Any = None

    def __enter__(self) -> Any:
        if self._compression == "zstd":
            # Whole prefetched chunks in (no slicing copies); the output goes straight into our buffers.
            self._stream = zstandard.ZstdDecompressor().stream_reader(
                self._raw, read_size=CHUNK_BYTES, read_across_frames=True
            )
        elif self._compression == "gzip":
            self._stream = gzip.GzipFile(fileobj=self._raw, mode="rb")  # type: ignore[arg-type]
        else:
            self._stream = self._raw
        return self._stream

    def __exit__(self, *exc: object) -> None:
        if self._stream is not self._raw:
            self._stream.close()


def source_for_uri(uri: str, client_factory: Callable[[], Any] | None = None) -> Source:
    """A source for ``s3://bucket/prefix`` or ``file:///folder`` (``TIERSERVE_MODEL_ROOT``)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return S3Source(parsed.netloc, parsed.path, client_factory or aws.s3_client, MODEL_ROOT_ENV)
    if parsed.scheme == "file":
        return FileSource(Path(parsed.path))
    raise ModelUnavailable(f"model location {uri!r} must start with s3:// or file://")
