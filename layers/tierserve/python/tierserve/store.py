"""Verified local copies of model artifacts, and the disk cache that keeps them.

    with store.verified(manifest) as fetched:     # a verified copy, alone in a private folder
        session = create_session(fetched.path, manifest, ...)
    # it joined the cache only if the block ended well: onnxruntime accepted it

A download (:mod:`tierserve.fetch`: ranged GETs on several connections, in order, bounded in
time) lands in a private folder, ``.{stored sha256}.{pid}.{random}.partial/model.{format}``:
stored bytes are hashed as they pass (one sha256, verified before the caller sees the file) and
decompressed on the fly, refused the moment they pass the declared size, and written once, to
the file the session then maps (no second copy, no second pass). Compressed artifacts must be
one zstd frame with its content checksum (which covers decompression) or gzip (its CRC does).

The cache is a folder per model named by the verified stored digest
(``{stored sha256}-{compression}-{format}``), moved into place atomically once onnxruntime
accepted the model, then bounded in total size (least recently used entries go first). Nothing
that failed a check or that onnxruntime refused is cached; with ``cache_max_bytes`` 0 nothing
is kept at all (the session then holds the model in memory). Partial folders of loads that died
(a process killed at its timeout) are removed when a store starts and whenever the cache is
bounded.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import zstandard

from tierserve import aws
from tierserve.catalog import Manifest, ManifestError, manifest_key
from tierserve.errors import ArtifactRejected, ModelUnavailable, is_retryable
from tierserve.fetch import (
    CHUNK_BYTES,
    ArtifactReader,
    FileSource,
    S3Source,
    Source,
    artifact_error,
    s3_too_slow,
    source_for_uri,
)
from tierserve.settings import MB, Settings
from tierserve.telemetry import logger

__all__ = [
    "ArtifactStore",
    "FetchedModel",
    "FileSource",
    "S3Source",
    "Source",
    "artifact_error",
    "entry_name",
    "s3_too_slow",
    "source_for_uri",
]

MAX_MANIFEST_BYTES = 1 * MB
PARTIAL_SUFFIX = ".partial"
# A compressed artifact's stored bytes, beside the model while it is decompressed.
SPOOL_FILE = "stored.spool"
# A partial folder nobody has written to for this long belongs to a dead load, whatever its
# name says: a live one writes continuously, and no Lambda invocation lasts longer.
STALE_PARTIAL_S = 15 * 60
# Partial folders this process is writing now (every store of the process: two registries, the
# API's and the local pipeline's, may share one cache folder).
_writing: set[Path] = set()
_writing_lock = threading.Lock()


@dataclass(frozen=True)
class FetchedModel:
    """A verified, decompressed model on local disk, and what fetching it cost. ``kept``: the
    file stays on disk while the session lives (the disk cache keeps it), so a session may map
    it rather than copy it. ``gets``: the GETs the artifact took (1 when one connection was
    fast enough, else one per part; 0 from the cache)."""

    path: Path
    cache_hit: bool
    fetch_ms: float = 0.0
    decompress_ms: float = 0.0
    kept: bool = True
    gets: int = 0


@dataclass(frozen=True)
class _Download:
    """What one download cost: ms waiting for the network, ms of the rest, GETs made."""

    fetch_ms: float
    decompress_ms: float
    gets: int


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
        connections = settings.fetch_connections
        if settings.model_root:
            source = source_for_uri(settings.model_root, client_factory, connections)
        elif settings.model_bucket:
            source = S3Source(
                settings.model_bucket,
                settings.model_prefix,
                client_factory or aws.s3_client,
                connections=connections,
            )
        else:
            raise ModelUnavailable(
                "no model location is configured: set TIERSERVE_MODEL_BUCKET (or TIERSERVE_MODEL_ROOT)"
            )
        return cls(source, settings.cache_dir, settings.cache_max_mb * MB)

    def read_manifest(self, name: str, version: str) -> Manifest:
        key = manifest_key("", name, version)
        reader = ArtifactReader(
            self.source,
            key,
            size=MAX_MANIFEST_BYTES,
            exact=False,
            deadline=aws.current_deadline(),
            too_long=f"{self.source.describe(key)} is over {MAX_MANIFEST_BYTES} bytes: not a manifest",
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
        kept = manifest.model.bytes <= self.cache_max_bytes
        if not kept and hasattr(os, "memfd_create"):
            yield from self._in_memory(manifest)
            return
        staging, download = self._download_to_staging(manifest)
        committed = False
        try:
            yield FetchedModel(
                staging / cached.name, False, download.fetch_ms, download.decompress_ms, kept, download.gets
            )
            committed = kept and self._commit(staging, cached.parent)
        except BaseException as error:
            if kept and is_retryable(error):
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
        folder (:func:`entry_name`) holds nothing but the model's own files (the loader's
        layout of it, :mod:`tierserve.onnx_layout`, beside it)."""
        return self.cache_dir / entry_name(manifest) / f"model.{manifest.format}"

    def _download_to_staging(self, manifest: Manifest) -> tuple[Path, _Download]:
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
            with _cache_file(destination, self.cache_dir) as out:
                download = self._download_verified(
                    key, manifest, out, lambda: _spool_file(staging / SPOOL_FILE, self.cache_dir)
                )
        except BaseException:
            _remove(staging)
            with _writing_lock:
                _writing.discard(staging)
            raise
        return staging, download

    def _in_memory(self, manifest: Manifest) -> Iterator[FetchedModel]:
        """A model the disk cache will not keep (``cache_max_bytes`` 0, or a model larger than
        it) lands in memory, never in /tmp: an anonymous file (``memfd``) the session reads by
        its ``/proc/self/fd`` path, copying it, and that is gone when the block ends."""
        key = f"{manifest.key_prefix}/{manifest.artifact}"
        with _memory_file(f"tierserve-{manifest.name}") as out:
            download = self._download_verified(key, manifest, out, lambda: _memory_file("tierserve-spool"))
            yield FetchedModel(
                Path(f"/proc/self/fd/{out.fileno()}"),
                False,
                download.fetch_ms,
                download.decompress_ms,
                kept=False,
                gets=download.gets,
            )

    def _commit(self, staging: Path, entry: Path) -> bool:
        """Move a verified model's folder into the cache, then bound the cache; False when a
        racing load committed the same model first (the caller removes ``staging``)."""
        try:
            os.replace(staging, entry)
        except OSError:
            return False
        self._evict(keep=entry)
        return True

    def _download_verified(
        self,
        key: str,
        manifest: Manifest,
        out: IO[bytes],
        spool: Callable[[], AbstractContextManager[IO[bytes]]],
    ) -> _Download:
        """Read ``key`` into ``out``, hashed as it arrives, every byte written once; returns
        what it cost (ms waiting for the network, which includes the hashing the fetch threads
        do as bytes land; ms of the rest; GETs).

        Uncompressed, the parts land in ``out`` itself (the file the session maps). A compressed
        artifact lands in a ``spool`` file, read back in order through a map of it by the
        decompressor while the download goes on, and gone once done.

        Raises:
            ArtifactRejected: the stored bytes are not the manifest's, the stream is corrupt or
                not checksummed, or it decompresses to another size than declared.
        """
        where = self.source.describe(key)
        start = time.perf_counter()
        reader: ArtifactReader | None = None
        try:
            if manifest.compression == "none":
                reader = self._reader(key, manifest, where, out)
                reader.drain()
                written = reader.count
            else:
                with spool() as stored:
                    reader = self._reader(key, manifest, where, stored)
                    written = _copy_decompressed(reader, out, manifest, where)
                    reader.drain()  # whatever trails the compressed stream is hashed too
                    reader.close()  # its map of the spool, before the spool goes
        except (zstandard.ZstdError, zlib.error, EOFError, gzip.BadGzipFile) as error:
            raise ArtifactRejected(
                f"{where} is not a valid {manifest.compression} stream ({error}); re-package it"
            ) from None
        except OSError as error:  # the cache file: /tmp full or not writable
            raise _cache_unwritable(self.cache_dir, error) from None
        finally:
            if reader is not None:
                reader.close()
        assert reader is not None
        _verify(where, reader.digest(), reader.count, manifest)
        if written != manifest.model.bytes:
            raise ArtifactRejected(
                f"{where} decompresses to {written:,} bytes, not its declared {manifest.model.bytes:,}: "
                "refused; re-package the model (tierserve package writes one checksummed zstd frame)"
            )
        out.flush()
        total_ms = (time.perf_counter() - start) * 1000
        return _Download(reader.wait_ms, total_ms - reader.wait_ms, reader.gets)

    def _reader(self, key: str, manifest: Manifest, where: str, destination: Any) -> ArtifactReader:
        return ArtifactReader(
            self.source,
            key,
            size=manifest.stored.bytes,
            deadline=aws.current_deadline(),
            destination=destination,
            too_long=(
                f"{where} is longer than its declared {manifest.stored.bytes:,} bytes: refused; "
                "re-upload the artifact with its manifest"
            ),
        )

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


@contextmanager
def _cache_file(path: Path, cache_dir: Path) -> Iterator[IO[bytes]]:
    try:
        handle = path.open("w+b")
    except OSError as error:
        raise _cache_unwritable(cache_dir, error) from None
    with handle:
        yield handle


@contextmanager
def _spool_file(path: Path, cache_dir: Path) -> Iterator[IO[bytes]]:
    try:
        with _cache_file(path, cache_dir) as handle:
            yield handle
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def _memory_file(name: str) -> Iterator[IO[bytes]]:
    """An anonymous file in memory (``memfd_create``): written and mapped like a file, never on disk."""
    with os.fdopen(os.memfd_create(name, os.MFD_CLOEXEC), "w+b") as handle:
        yield handle


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


def _verify(where: str, digest: str, size: int, manifest: Manifest) -> None:
    """The one cryptographic check: the stored bytes are the manifest's, before anything of
    them is trusted (decompression is bounded, and covered by the stream's own checksum)."""
    if size != manifest.stored.bytes or digest != manifest.stored.sha256:
        raise ArtifactRejected(
            f"{where}: the stored bytes do not match the manifest (sha256 {digest[:12]}…, {size:,} bytes; "
            f"expected {manifest.stored.sha256[:12]}…, {manifest.stored.bytes:,}): refused; re-upload "
            "the artifact with its manifest"
        )


def _copy_decompressed(reader: ArtifactReader, out: Any, manifest: Manifest, where: str) -> int:
    """Decompress what ``reader`` hands over into ``out``; returns the model's length, refusing
    the first byte past the declared size (a decompression bomb stops after one buffer)."""
    limit = manifest.model.bytes
    stream: Any
    if manifest.compression == "zstd":
        first = reader.read(CHUNK_BYTES)
        _check_frame(first, where, limit)
        stream = zstandard.ZstdDecompressor().stream_reader(
            _Prepended(first, reader), read_size=CHUNK_BYTES, closefd=False
        )
    else:
        stream = gzip.GzipFile(fileobj=_Bytes(reader), mode="rb")  # type: ignore[arg-type]
    buffer = bytearray(CHUNK_BYTES)
    written = 0
    with stream, memoryview(buffer) as view:
        while count := stream.readinto(buffer):
            written += count
            if written > limit:
                raise ArtifactRejected(
                    f"{where} decompresses past its declared {limit:,} bytes: refused "
                    "(a corrupt or hostile artifact); re-package the model"
                )
            out.write(view[:count])
    return written


def _check_frame(first: memoryview | bytes, where: str, declared: int) -> None:
    """The artifact's first zstd frame must carry its content checksum (zstd verifies it as it
    decodes: it covers decompression) and its content size, equal to the declared model size
    (zstd holds the frame to it). Any further frame would add bytes past that size, which the
    copy refuses: so every byte of the model comes from the one checksummed frame."""
    try:
        frame = zstandard.get_frame_parameters(first)
    except zstandard.ZstdError as error:
        raise ArtifactRejected(f"{where} is not a valid zstd stream ({error}); re-package it") from None
    if not frame.has_checksum or frame.content_size != declared:
        missing = (
            "a content checksum" if not frame.has_checksum else f"the declared size ({declared:,} bytes)"
        )
        raise ArtifactRejected(
            f"{where} is a zstd frame without {missing}: re-package the model with this tierserve "
            "(tierserve package writes one frame with its size and checksum)"
        )


class _Prepended:
    """``first``, then the rest of ``reader``: what was read to look at the frame header."""

    def __init__(self, first: memoryview | bytes, reader: ArtifactReader) -> None:
        self._first, self._reader = first, reader

    def read(self, size: int = -1) -> memoryview | bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        return self._reader.read(size)


class _Bytes:
    """``reader`` as gzip reads a file: ``read`` returns bytes (it concatenates them)."""

    def __init__(self, reader: ArtifactReader) -> None:
        self._reader = reader

    def read(self, size: int = -1) -> bytes:
        return bytes(self._reader.read(size))
