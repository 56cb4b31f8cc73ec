"""A loopback S3 for benchmarks: the objects of a folder, served over HTTP on 127.0.0.1 with
ranged GETs, each connection paced to a rate like one S3 connection from Lambda (~90 MB/s).

moto's server answers a ranged GET in about 74 ms per 8 MB here: too slow to stand for S3 when
the loader reads in parallel. This one only serves files (unpaced with ``sendfile``, so that
serving costs the machine as little CPU as it can: S3's work is not the function's): ``GET /{bucket}/{key}`` (with
``Range: bytes=a-b``) and ``HEAD``, with the headers botocore reads (``Content-Length``,
``Content-Range``, ``ETag``, ``Last-Modified``). It runs in a child process, so serving never
competes with the loader for the benchmark's GIL (S3 is never inside the function either).

    with LoopbackS3(folder, mb_per_s=90, first_byte_ms=20) as s3:  # folder/{bucket}/{key}; 0: unpaced
        boto3.client("s3", endpoint_url=s3.endpoint, ...)
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.common import start_child_server, stop_child_server

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
# Paced in slices of this size: fine enough that a connection's rate holds within a few ms.
_SLICE = 256 * 1024


class LoopbackS3:
    """The server in a child process; ``endpoint`` once entered."""

    def __init__(self, root: Path, mb_per_s: float = 0.0, first_byte_ms: float = 0.0) -> None:
        self.root, self.mb_per_s, self.first_byte_ms = Path(root), mb_per_s, first_byte_ms
        self.endpoint = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> LoopbackS3:
        code = (
            "import sys; from bench.loopback_s3 import serve; "
            "serve(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))"
        )
        self._process, self.endpoint = start_child_server(
            code,
            str(self.root),
            str(self.mb_per_s),
            str(self.first_byte_ms),
            what="the loopback S3",
            preexec_fn=_off_the_loader_cores,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            stop_child_server(self._process)


def _off_the_loader_cores() -> None:
    """In the child, before it runs: serve on the cores the benchmark was kept off (``taskset -c
    0``: the loader's one core), if there are any. S3's work is never on the function's CPU;
    on the loader's core, the server's per-request work would count against a loader that
    reads in parts, and not against a floor of one GET."""
    mine = os.sched_getaffinity(0)
    others = set(range(os.cpu_count() or 1)) - mine
    if others:
        os.sched_setaffinity(0, others)


def serve(root: str, mb_per_s: float, first_byte_ms: float = 0.0) -> None:
    """The child process: print the endpoint, serve ``root`` until stdin closes."""
    import threading

    server = _QuietServer(("127.0.0.1", 0), _handler(Path(root), mb_per_s * 1e6, first_byte_ms / 1000))
    server.daemon_threads = True
    server.request_queue_size = 64
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    sys.stdin.read()


class _QuietServer(ThreadingHTTPServer):
    """A loader that cuts a stream short (it opens parts instead) closes its connection
    mid-answer: S3 shrugs that off, so does this."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _handler(root: Path, rate: float, first_byte_s: float = 0.0) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and a small body are two writes: without this, Nagle and the client's delayed
        # ACK add 40 ms to every small answer (a manifest), which S3 does not.
        disable_nagle_algorithm = True

        def _object(self) -> Path | None:
            path = (root / self.path.split("?", 1)[0].lstrip("/")).resolve()
            return path if path.is_relative_to(root.resolve()) and path.is_file() else None

        def _head(self, path: Path, status: int, start: int, end: int, size: int) -> None:
            stat = path.stat()
            self.send_response(status)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header(
                "ETag", '"' + hashlib.md5(f"{path}{stat.st_mtime_ns}".encode()).hexdigest() + '"'
            )
            self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("x-amz-request-id", "bench")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()

        def _missing(self) -> None:
            body = b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>"
            self.send_response(404)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            path = self._object()
            if path is None:
                return self._missing()
            size = path.stat().st_size
            self._head(path, 200, 0, size, size)

        def do_GET(self) -> None:
            if first_byte_s:  # S3's time to first byte: 10-30 ms for a GET from Lambda
                time.sleep(first_byte_s)
            path = self._object()
            if path is None:
                return self._missing()
            size = path.stat().st_size
            start, end, status = 0, size, 200
            found = _RANGE.match(self.headers.get("Range", ""))
            if found:
                start = int(found.group(1))
                end = min(size, int(found.group(2)) + 1) if found.group(2) else size
                status = 206
            self._head(path, status, start, end, size)
            with path.open("rb") as handle:
                handle.seek(start)
                self._send(handle, end - start)

        def _send(self, handle: object, length: int) -> None:
            if not rate:  # the kernel copies file to socket: S3's own CPU is not the loader's
                self.wfile.flush()
                offset = handle.tell()  # type: ignore[attr-defined]
                self.connection.sendfile(handle, offset, length)  # type: ignore[arg-type]
                return
            began, sent = time.perf_counter(), 0
            while sent < length:
                data = handle.read(min(_SLICE, length - sent))  # type: ignore[attr-defined]
                if not data:
                    return
                if rate:
                    due = began + (sent + len(data)) / rate
                    wait = due - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                self.wfile.write(data)
                sent += len(data)

        def log_message(self, *args: object) -> None:
            pass

    return Handler
