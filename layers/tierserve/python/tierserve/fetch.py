"""Reading model artifacts where they live: an S3 bucket or a local folder, in order, bounded
in size and in time, on several connections at once.

    reader = ArtifactReader(source, key, size=manifest.stored.bytes, deadline=aws.current_deadline())
    try:
        while chunk := reader.read(CHUNK_BYTES): ...   # the object's bytes, in order
        reader.drain()
    finally:
        reader.close()
    reader.digest(), reader.count                      # sha256 and length of what was read

One S3 connection delivers about 90 MB/s to a Lambda function; a model of a few hundred MB
needs several at once to be bound by the network rather than by one stream. So an artifact is
read as consecutive ranges (:data:`PART_BYTES` each) by up to ``source.connections`` threads,
each with its own ranged GET; the reader hands the bytes over in order, so decompression sees
one stream. Memory stays bounded: at most one part per connection is in flight or waiting.

Into a file, the first GET asks for the whole object, and the time its first chunk took
(from the request) says how fast one connection is: slower than ``source.fan_out_below``
(:data:`FAN_OUT_BELOW_BYTES_PER_S`), that GET is cut at its first part (its connection
closed, not drained) and the other parts open at once; faster, more connections would only
add requests (each costs a few ms of CPU) for bytes one core could not take in any faster, so
it reads on to the end. A source with one connection (a local folder, or
``TIERSERVE_FETCH_CONNECTIONS=1``), or an object of one part, is read with one GET; into
buffers (no file), the parts open at once.

The one sha256 is taken in order: by the thread whose bytes are next, from the chunk it just
received (while it is in the CPU's cache), or, for bytes that landed before their turn, by the
reader as it hands them over.

Every read waits no longer than the deadline of the thread that made the reader (a trickling
S3 never trips a socket timeout; the reader keeps the time), each part's S3 calls run within
it too, and on an early end (an error, the deadline) the reader shuts its connections down, so
no thread stays blocked on them.

Failures become typed errors (:func:`artifact_error`) that name the setting that chose the
bucket; a stall or a trickle past the deadline is the 504 of :func:`s3_too_slow`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlparse

from tierserve import aws
from tierserve.errors import (
    ArtifactRejected,
    ModelUnavailable,
    TierserveError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tierserve.settings import DEFAULT_FETCH_CONNECTIONS, MB, MODEL_BUCKET_ENV, MODEL_ROOT_ENV

CHUNK_BYTES = 1 * MB
# boto3's own multipart size: large enough that a request's latency is small beside its
# transfer, small enough that a few hundred MB spread over every connection.
PART_BYTES = 8 * MB
# A first chunk slower than this, counted from the request, opens the other connections. From
# S3 the first byte alone takes 10-30 ms (a megabyte then ~11 ms at ~90 MB/s per connection
# from Lambda): always under it, so S3 always gets every connection. A loopback S3 on one
# shared core brings its first megabyte at 150-300 MB/s as measured here (bench.cold_start),
# where more connections would only add requests (about 2 ms of botocore each).
FAN_OUT_BELOW_BYTES_PER_S = 100 * MB
_CONTENT_RANGE = re.compile(r"^bytes \d+-\d+/(\d+)$")


class Source(Protocol):
    """Where artifacts live: ``open`` an object, or one range of it (with the object's whole
    size when the answer says it), ``describe`` it for messages; ``connections``: how many
    ranges (of ``part_bytes``) may be read at once, once a first part arrives slower than
    ``fan_out_below`` bytes/s. A source without ``connections`` (and ``open_range``) is read
    with one GET."""

    connections: int
    part_bytes: int
    fan_out_below: float

    def describe(self, key: str) -> str: ...

    def open(self, key: str) -> IO[bytes]: ...

    def open_range(self, key: str, start: int, length: int) -> tuple[IO[bytes], int | None]: ...


class S3Source:
    """Objects under ``s3://bucket/prefix``, read on up to ``connections`` connections; botocore
    errors become typed tierserve errors (:func:`artifact_error`, naming ``setting``, the
    variable that chose the bucket)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        client_factory: Callable[[], Any] = aws.s3_client,
        setting: str = MODEL_BUCKET_ENV,
        connections: int = DEFAULT_FETCH_CONNECTIONS,
        part_bytes: int = PART_BYTES,
        fan_out_below: float = FAN_OUT_BELOW_BYTES_PER_S,
    ) -> None:
        self.bucket, self.prefix, self._client_factory = bucket, prefix.strip("/"), client_factory
        self.setting = setting
        self.connections, self.part_bytes, self.fan_out_below = connections, part_bytes, fan_out_below

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def open(self, key: str) -> IO[bytes]:
        try:
            return self._client_factory().get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as error:  # botocore's tree is wide; aws.classify reads it
            raise artifact_error(error, self.describe(key), self.setting) from error

    def open_range(self, key: str, start: int, length: int) -> tuple[IO[bytes], int | None]:
        try:
            answer = self._client_factory().get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
            )
        except Exception as error:
            if aws.classify(error).code == "InvalidRange":  # the object ends before this range starts
                raise ArtifactRejected(
                    f"{self.describe(key)} is shorter than its manifest says: refused; re-upload the "
                    "artifact with its manifest"
                ) from None
            raise artifact_error(error, self.describe(key), self.setting) from error
        found = _CONTENT_RANGE.match(str(answer.get("ContentRange") or ""))
        return answer["Body"], int(found.group(1)) if found else None


class FileSource:
    """Files under a local folder (``file://``), for the local API, the GPU server's model
    folder and tests; read with one stream."""

    connections = 1
    part_bytes = PART_BYTES
    fan_out_below = FAN_OUT_BELOW_BYTES_PER_S

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

    def open_range(self, key: str, start: int, length: int) -> tuple[IO[bytes], int | None]:
        handle = self.open(key)
        handle.seek(start)
        return handle, os.fstat(handle.fileno()).st_size


def source_for_uri(
    uri: str, client_factory: Callable[[], Any] | None = None, connections: int = DEFAULT_FETCH_CONNECTIONS
) -> Source:
    """A source for ``s3://bucket/prefix`` or ``file:///folder`` (``TIERSERVE_MODEL_ROOT``)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return S3Source(
            parsed.netloc, parsed.path, client_factory or aws.s3_client, MODEL_ROOT_ENV, connections
        )
    if parsed.scheme == "file":
        return FileSource(Path(parsed.path))
    raise ModelUnavailable(f"model location {uri!r} must start with s3:// or file://")


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


class DestinationError(OSError):
    """Writing the destination failed (a full disk): an OSError of the caller's file, not of S3."""


class _Part:
    """One range of the object on its way. ``received`` grows as its bytes land (in ``buffer``,
    or in the destination file at ``start``); ``done`` or ``error`` ends it."""

    def __init__(self, start: int, length: int, in_memory: bool) -> None:
        self.start, self.length = start, length
        self.buffer = bytearray(length) if in_memory else None
        self.received = 0
        self.consumed = 0
        self.probe = False  # its first chunk says how fast one connection is
        self.asked = 0.0  # time.perf_counter() when its GET was sent
        self.cut = False  # its stream goes on past ``length``: the rest is other parts'
        self.done = False
        self.error: BaseException | None = None
        self.body: IO[bytes] | None = None


class ArtifactReader:
    """The bytes of one object, in order, read on up to ``source.connections`` connections
    (see the module docstring); ``size`` is what its manifest declares.

    With ``destination`` (a file opened for writing), every part is written there at its
    offset as it arrives, and the reader hashes the file's bytes in order, through a read-only
    map of it (:meth:`drain`): no chunk passes from thread to thread, and nothing is copied
    twice. Without it the parts land in buffers of their own, handed over in order by
    :meth:`read` (a stream for a decompressor, or a manifest); at most one part per connection
    is held.

    A stream past ``size`` is refused with ``too_long``; one that ends early, or an object whose
    size an answer states otherwise, is refused too, unless ``exact`` is false (``size`` is then
    a bound, as for a manifest, read in one GET). ``count`` and :meth:`digest` (sha256) cover
    every byte handed over; ``wait_ms`` is the time spent waiting for the network (and for the
    hashing the fetch threads do as bytes land); ``gets``: the GETs made.
    """

    def __init__(
        self,
        source: Source,
        key: str,
        *,
        size: int,
        too_long: str,
        deadline: aws.Deadline | None = None,
        exact: bool = True,
        destination: IO[bytes] | None = None,
    ) -> None:
        self._source, self._key, self._size, self._exact = source, key, size, exact
        self._where = source.describe(key)
        self._too_long, self._deadline = too_long, deadline
        self._hash = hashlib.sha256()
        self._hashed = 0  # the bytes the hash covers: the object's first ``_hashed``
        self._hash_lock = threading.Lock()
        self.count = 0
        self.wait_ms = 0.0
        self.gets = 0
        self._view: memoryview | bytes = b""
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._destination = destination
        self._map: mmap.mmap | None = None
        if destination is not None and size:
            _reserve(destination.fileno(), size)
            self._map = mmap.mmap(destination.fileno(), size, access=mmap.ACCESS_READ)
        # A source that does not say (one that only opens whole objects) gets one connection.
        wanted = getattr(source, "connections", 1) if exact else 1
        self._part_bytes = getattr(source, "part_bytes", PART_BYTES)
        self._fan_out_below = getattr(source, "fan_out_below", FAN_OUT_BELOW_BYTES_PER_S)
        self._connections = max(1, min(wanted, -(-size // self._part_bytes)))
        # One connection: the whole object in one GET (its answer need not state a range).
        self._whole = self._connections == 1
        # Into a destination, the first GET asks for the whole object, and its first chunk says
        # whether the other connections open (the module docstring); into buffers, parts at once.
        self._probing = not self._whole and destination is not None
        self._ranges = [(0, size)] if self._whole or self._probing else self._parts_from(0)
        self._window: deque[_Part] = deque()
        self._next = 0
        self._fill()

    def _parts_from(self, start: int) -> list[tuple[int, int]]:
        return [
            (s, min(self._part_bytes, self._size - s)) for s in range(start, self._size, self._part_bytes)
        ]

    def _fill(self) -> None:
        """Start parts until the window holds as many as may be read at once."""
        limit = 1 if self._probing else self._connections
        while len(self._window) < limit and self._next < len(self._ranges) and not self._stop.is_set():
            part = _Part(*self._ranges[self._next], in_memory=self._destination is None)
            part.probe = self._probing
            self._next += 1
            self.gets += 1
            self._window.append(part)
            # A daemon thread per part (at most one per connection at a time): a read that stays
            # blocked can never hold up the process's exit, as a pool's worker would.
            threading.Thread(target=self._fetch, args=(part,), name="tierserve-fetch", daemon=True).start()

    def _end_probe(self, head: _Part) -> None:
        """Once the first GET has measured its connection: if it was cut to one part, the
        other parts open, as many at once as there are connections."""
        with self._changed:  # the fetch thread decides under it: cut and length, then probe
            decided, cut, length = not head.probe, head.cut, head.length
        if self._probing and decided:
            self._probing = False
            if cut:
                self._ranges += self._parts_from(length)
            self._fill()

    def _fetch(self, part: _Part) -> None:
        """On its own thread: read one part (its S3 calls bounded by the reader's deadline)."""
        try:
            with aws.within(self._deadline):
                if self._whole:
                    part.body = self._source.open(self._key)
                else:
                    part.asked = time.perf_counter()
                    part.body, total = self._source.open_range(self._key, part.start, part.length)
                    if total is not None and total != self._size:
                        raise self._wrong_size(total)
                self._receive(part)
        except BaseException as error:
            with self._changed:
                part.error = error
                self._changed.notify_all()
        finally:
            if part.body is not None:
                with contextlib.suppress(Exception):
                    part.body.close()  # a cut stream's connection closes: the rest is not drained

    def _receive(self, part: _Part) -> None:
        assert part.body is not None
        chunk_bytes = min(CHUNK_BYTES, self._part_bytes)
        notified = 0
        while not self._stop.is_set():
            # Up to one byte past the part's end: a longer stream is seen, never trusted.
            limit = part.length if part.cut else part.length + 1
            if part.received >= limit:
                break
            chunk = part.body.read(min(chunk_bytes, limit - part.received))
            if not chunk:
                break
            count = len(chunk)
            if part.received + count > part.length:
                raise ArtifactRejected(self._too_long)
            self._land(part, chunk)
            self._hash_landed(part.start + part.received, chunk)
            part.received += count
            if part.probe:
                self._measured(part, count / max(time.perf_counter() - part.asked, 1e-9))
            elif part.received - notified >= self._part_bytes:  # wake the reader now and then, not per chunk
                notified = part.received
                with self._changed:
                    self._changed.notify_all()
        if part.received < part.length and self._exact and not self._stop.is_set():
            raise self._wrong_size(part.start + part.received if self._whole else None)
        with self._changed:
            part.done = True
            self._changed.notify_all()

    def _land(self, part: _Part, chunk: bytes) -> None:
        """Put a chunk where the part's bytes go: its buffer, or the destination at its offset."""
        if part.buffer is not None:
            part.buffer[part.received : part.received + len(chunk)] = chunk
            return
        assert self._destination is not None
        view, offset = memoryview(chunk), part.start + part.received
        try:
            while view:  # a regular file takes it all at once; a short write goes on from there
                written = os.pwrite(self._destination.fileno(), view, offset)  # no GIL
                if not written:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view, offset = view[written:], offset + written
        except OSError as error:  # the destination's disk, not S3: the caller says so
            raise DestinationError(error.errno, error.strerror) from error

    def _measured(self, part: _Part, bytes_per_s: float) -> None:
        """The first GET's first chunk came at ``bytes_per_s`` (counted from the request: its
        latency is what other connections would hide): slower than the fan-out rate, the GET
        is cut to its first part and the reader opens the others."""
        with self._changed:
            if bytes_per_s < self._fan_out_below:
                part.length, part.cut = self._part_bytes, True
            part.probe = False
            self._changed.notify_all()

    def _hash_landed(self, offset: int, chunk: bytes) -> None:
        """Hash a chunk that just landed at ``offset`` if it is next in order and nobody is
        hashing; otherwise :meth:`_hash_through` takes it from where it landed."""
        if offset == self._hashed and self._hash_lock.acquire(blocking=False):
            try:
                if offset == self._hashed:
                    self._hash.update(chunk)
                    self._hashed += len(chunk)
            finally:
                self._hash_lock.release()

    def _hash_through(self, part: _Part, received: int) -> None:
        """Make the hash cover ``part`` up to ``received``, from where its bytes landed."""
        end = part.start + received
        with self._hash_lock:
            if self._hashed < end:
                self._hash.update(self._landed(part, self._hashed - part.start, received))
                self._hashed = end

    def _landed(self, part: _Part, begin: int, end: int) -> memoryview:
        """``part``'s bytes ``begin:end``, where they landed (its buffer, or the destination)."""
        if part.buffer is not None:
            return memoryview(part.buffer)[begin:end]
        assert self._map is not None
        return memoryview(self._map)[part.start + begin : part.start + end]

    def _wrong_size(self, size: int | None) -> ArtifactRejected:
        said = f"is {size:,} bytes" if size is not None else "ended early"
        return ArtifactRejected(
            f"{self._where} {said}, not the {self._size:,} its manifest declares: refused; re-upload the "
            "artifact with its manifest"
        )

    def read(self, size: int = -1) -> memoryview | bytes:
        """Up to ``size`` bytes (short reads are allowed for streams), handed over as a view of
        the part's buffer, without a copy."""
        if size < 0:
            return b"".join(bytes(chunk) for chunk in iter(lambda: self.read(CHUNK_BYTES), b""))
        if not self._view and not self._advance():
            return b""
        data, self._view = self._view[:size], self._view[size:]
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _advance(self) -> bool:
        """The next bytes in order, hashed, as ``self._view``; False at the end."""
        while self._window:
            head = self._window[0]
            self._wait_for(head)
            if isinstance(head.error, DestinationError):
                raise head.error
            if head.error is not None:
                raise artifact_error(head.error, self._where)  # a dropped connection, a timeout
            self._end_probe(head)
            received = head.received
            if received > head.consumed:
                self._hash_through(head, received)
                data = self._landed(head, head.consumed, received)
                head.consumed = received
                self.count += len(data)
                self._view = data
                return True
            self._window.popleft()  # done and handed over
            self._fill()
        return False

    def _wait_for(self, part: _Part) -> None:
        start = time.perf_counter()
        with self._changed:
            while not (
                part.done
                or part.error is not None
                or part.received > part.consumed
                or (self._probing and not part.probe)  # the first GET decided: open the others now
            ):
                remaining = None if self._deadline is None else self._deadline.remaining()
                if remaining is not None and remaining <= 0:
                    raise s3_too_slow(self._where)
                self._changed.wait(remaining)
        self.wait_ms += (time.perf_counter() - start) * 1000

    def drain(self) -> None:
        """Read to the end, so the digest covers every byte (whatever trails a compressed stream)."""
        while self._view or self._advance():
            self._view = b""

    def digest(self) -> str:
        """The sha256 of the bytes handed over; the object's once :meth:`drain` has returned."""
        return self._hash.hexdigest()

    def close(self) -> None:
        """Stop reading. Reads still blocked on the network (an error or the deadline ended the
        load early) are woken first by shutting their connections down: closing alone would wait
        for them, since a buffered reader holds its lock while it reads."""
        self._stop.set()
        self._view = b""
        for part in self._window:
            if part.body is not None and not part.done and not shut_down_connection(part.body):
                with contextlib.suppress(Exception):  # not a socket: closing is what interrupts it
                    part.body.close()
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still handed out keeps it open
                self._map.close()


def _reserve(descriptor: int, size: int) -> None:
    """Give the file its ``size``, reserved rather than sparse where the system can: a disk too
    small fails here, before a byte is fetched (ENOSPC), and the writes then find their blocks
    (about 15% less CPU than filling a hole). Where it cannot (macOS has no posix_fallocate;
    some file systems refuse it), a sparse file of that size does."""
    reserve = getattr(os, "posix_fallocate", None)
    if reserve is not None:
        try:
            reserve(descriptor, 0, size)
            return
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENODEV):
                raise
    os.ftruncate(descriptor, size)


def shut_down_connection(body: IO[bytes]) -> bool:
    """Shut down the socket under a botocore streaming body (its urllib3 response's ``fileno``),
    so that a read blocked on it returns at once; False for a body with no socket under it."""
    raw = getattr(body, "_raw_stream", None)  # botocore's StreamingBody keeps the urllib3 response here
    try:
        descriptor = raw.fileno() if raw is not None else -1
    except (OSError, ValueError, AttributeError):
        return False
    if descriptor < 0:
        return False
    try:
        duplicate = os.dup(descriptor)
    except OSError:
        return False
    try:
        connection = socket.socket(fileno=duplicate)
    except OSError:  # not a socket
        os.close(duplicate)
        return False
    with connection, contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)  # acts on the connection, not on the descriptor
    return True
