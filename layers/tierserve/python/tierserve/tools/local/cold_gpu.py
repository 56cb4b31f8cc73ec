"""GPU-tier models that scale to zero on a developer machine (``tierserve local --gpu-idle-s N``).

In AWS a GPU-tier model idle for a while has no copy running; the next request gets 503 with
``Retry-After`` while SageMaker starts one, and the S3 worker's inputs wait in the queue. Here
the copy is the model's GPU server process:

    no process ──request──> 503 + Retry-After (ModelStarting); the process starts in the background
    starting   ──request──> 503 + Retry-After
    ready      ──request──> forwarded to it; each request restarts the idle clock
    ready, no request for idle_s, none in flight ──> the process stops (SIGTERM: it drains)

The local API forwards through :meth:`ColdGpuServer.forward`, and the local SageMaker runtime
(:class:`ScalingRuntime`) answers SageMaker's own no-capacity error for a component whose process
is not ready, so the worker waits the model out exactly as it does in AWS
(:mod:`tierserve.s3_pipeline.cold`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from tierserve.errors import ModelStarting
from tierserve.routes import HttpRequest, HttpResponse
from tierserve.settings import ModelRef
from tierserve.telemetry import logger
from tierserve.tools.local.api_server import FORWARDED_HEADERS, forward
from tierserve.tools.local.gpu_servers import START_TIMEOUT_S, GpuServerProcess
from tierserve.tools.local.sagemaker_runtime import FORWARDED, SageMakerError, SageMakerRuntime, no_capacity

# What a cold request is told to wait: a local process loads in seconds (minutes on SageMaker).
LOCAL_RETRY_AFTER_S = 5
IDLE_CHECK_S = 0.5  # how often the idle clock is read


class ColdGpuServer:
    """One gpu-tier model's GPU server process, started on demand and stopped after ``idle_s``
    seconds without a request (see the module docstring). Thread-safe."""

    def __init__(
        self,
        ref: ModelRef,
        environ: Mapping[str, str],
        *,
        log_dir: Path,
        idle_s: float,
        start_timeout_s: float = START_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ref = ref
        self.environ = dict(environ)
        self.log_dir = log_dir
        self.idle_s = idle_s
        self.start_timeout_s = start_timeout_s
        self.starts = 0  # processes started (tests and the banner read it)
        self._clock = clock
        self._lock = threading.Lock()
        self._process: GpuServerProcess | None = None
        self._in_flight = 0  # requests forwarded and not answered yet: an idle stop waits for them
        self._starting: threading.Thread | None = None
        self._last_used = clock()
        self._failure = ""
        self._stopped = threading.Event()
        self._watch = threading.Thread(
            target=self._stop_when_idle, name=f"tierserve-idle-{ref.name}", daemon=True
        )
        self._watch.start()

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"gpu-server-{self.ref.name}.log"

    @property
    def running(self) -> bool:
        with self._lock:
            return self._process is not None

    def url(self) -> str:
        """The base URL of the ready process (the idle clock restarts).

        Raises:
            ModelStarting: no process is ready; one is starting now (this call may have started it).
        """
        with self._lock:
            self._last_used = self._clock()
            if self._process is not None and self._process.process.poll() is None:
                return self._process.url
            self._process = None
            if self._starting is None:
                self._starting = threading.Thread(
                    target=self._start, name=f"tierserve-start-{self.ref.name}", daemon=True
                )
                self._starting.start()
            failure = self._failure
        raise ModelStarting(
            f"model {self.ref.name} is starting from zero: no copy of it was running, and its local GPU "
            f"server process is starting (seconds here; minutes on SageMaker). Retry after "
            f"{LOCAL_RETRY_AFTER_S} s" + (f" (the last start failed: {failure})" if failure else ""),
            retry_after_s=LOCAL_RETRY_AFTER_S,
        )

    def forward(
        self, request: HttpRequest, forwarded_headers: Collection[str] = FORWARDED_HEADERS
    ) -> HttpResponse:
        """``request`` forwarded to the ready process; the process is not stopped for idleness
        while it runs.

        Raises:
            ModelStarting: as :meth:`url`.
        """
        with self._lock:
            self._in_flight += 1
        try:
            return forward(self.url(), request, forwarded_headers)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_used = self._clock()

    def wait_ready(self, timeout: float) -> bool:
        """Start the process if it is not running and wait until it is ready (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.url()
                return True
            except ModelStarting:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop the process, if one runs, and the idle clock."""
        self._stopped.set()
        starting = self._starting
        if starting is not None:
            starting.join(self.start_timeout_s + 5)
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            process.stop()

    def _start(self) -> None:
        logger.info("starting the GPU server process of a cold model", extra={"model": str(self.ref)})
        try:
            process = GpuServerProcess.start(
                self.ref, self.environ, log_dir=self.log_dir, timeout=self.start_timeout_s
            )
        except Exception as error:  # the next request tries again; its 503 says why this one failed
            logger.warning(
                "the GPU server process did not start", extra={"model": str(self.ref), "error": str(error)}
            )
            with self._lock:
                self._failure, self._starting = str(error), None
            return
        with self._lock:
            self.starts += 1
            self._failure, self._starting = "", None
            self._last_used = self._clock()
            if self._stopped.is_set():
                process_to_stop: GpuServerProcess | None = process
            else:
                self._process, process_to_stop = process, None
        if process_to_stop is not None:
            process_to_stop.stop()

    def _stop_when_idle(self) -> None:
        while not self._stopped.wait(IDLE_CHECK_S):
            with self._lock:
                idle = (
                    self._process is not None
                    and not self._in_flight
                    and self._clock() - self._last_used >= self.idle_s
                )
                process = self._process if idle else None
                if idle:
                    self._process = None
            if process is not None:
                logger.info(
                    "a cold model was idle: its GPU server process stops", extra={"model": str(self.ref)}
                )
                process.stop()


def cold_container(server: ColdGpuServer) -> Callable[[HttpRequest], HttpResponse]:
    """The container the local SageMaker runtime forwards to: the server's process, wherever it
    runs now (each start takes a new port)."""
    keep = frozenset(name.lower() for name in FORWARDED)
    return lambda request: server.forward(request, keep)


class ScalingRuntime(SageMakerRuntime):
    """The local SageMaker runtime for components that scale to zero: while a component's
    process is not ready, SageMaker's own no-capacity answer (and the process starts)."""

    def __init__(self, servers: Mapping[str, ColdGpuServer], *, endpoint: str) -> None:
        super().__init__(
            {name: cold_container(server) for name, server in servers.items()},
            components=dict.fromkeys(servers, endpoint),
        )
        self.servers = dict(servers)

    def refusal(self, endpoint: str, component: str | None) -> SageMakerError | None:
        refused = super().refusal(endpoint, component)
        if refused is not None or component not in self.servers:
            return refused
        try:
            self.servers[component].url()
        except ModelStarting:
            return no_capacity()
        return None
