"""What every benchmark shares: import paths, timing, statistics, an embedded S3, results.

Results go to ``bench/results/{name}.json`` (gitignored) with the machine they ran on, and
to ``bench/results/{name}.png`` when matplotlib happens to be installed (it is optional).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
# Sample models are built once and kept (gitignored) so reruns start fast.
WORK_DIR = REPO_ROOT / ".tierserve" / "bench"

for _extra in ("layers/tierserve/python", "functions/inference"):
    if str(REPO_ROOT / _extra) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / _extra))

# Benchmarks measure the code, not CloudWatch/X-Ray emulation or log formatting.
os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")


def now_ms() -> float:
    return time.perf_counter() * 1000


from tierserve.telemetry import stopwatch  # noqa: E402 - after the path set-up above

timer = stopwatch  # one stopwatch for the product and its benchmarks


def repeat(fn: Callable[[], Any], iterations: int, *, warmup: int = 0) -> list[float]:
    """Milliseconds per call of ``fn``, one sample per call (GC is off while timing)."""
    for _ in range(warmup):
        fn()
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(iterations):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """median/p50, p90, p99, min, max and count of a list of milliseconds."""
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "p50": percentile(samples, 50),
        "p90": percentile(samples, 90),
        "p99": percentile(samples, 99),
        "min": min(samples),
        "max": max(samples),
    }


def fmt_ms(value: float) -> str:
    return f"{value:8.3f} ms" if value < 10 else f"{value:8.1f} ms"


def machine() -> dict[str, Any]:
    """Where the figures came from: a result without its machine cannot be compared."""
    import numpy
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        # 1/5/15-minute load when the results were written: on a shared machine, read figures with it.
        "load_average": [round(x, 2) for x in load],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process ``pid`` has used so far, from
    /proc: on a shared machine, CPU per request is steadier than wall-clock figures."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The last commit whose GPU server and local API ran on the hand-written threaded HTTP server
# (http.server): what bench.gpu_server and bench.local_api compare the uvicorn servers with.
THREADED_SERVER_REV = "b0cb6dc1bf6930d8633faddfaa0a1d55667ae4ad"


def baseline_tree(rev: str) -> Path:
    """The runtime of commit ``rev`` (core, functions, cdk.json) extracted once under the work
    folder, to run a baseline server from in the same session as the working tree's.

    Raises:
        RuntimeError: not a git checkout, or no such commit (the message says which).
    """
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError(
            f"cannot find commit {rev!r} in {REPO_ROOT}: a git checkout is needed ({error})"
        ) from None
    tree = WORK_DIR / "baseline" / sha
    if not (tree / ".extracted").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", sha, "layers/tierserve/python", "functions", "cdk.json"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        (tree / ".extracted").write_text(sha + "\n")
    return tree


def write_results(name: str, results: Mapping[str, Any], *, command: str | None = None) -> Path:
    """Write ``bench/results/{name}.json`` with the date, the machine and the command."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command or " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "machine": machine(),
        **results,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(document, indent=2, default=float) + "\n")
    return path


def plot_bars(name: str, title: str, bars: Mapping[str, float], unit: str = "ms") -> Path | None:
    """A bar chart to ``bench/results/{name}.png`` if matplotlib is installed; None otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(7, 0.6 * len(bars) + 1.5))
    labels = list(bars)
    axes.barh(labels, [bars[k] for k in labels])
    axes.invert_yaxis()
    axes.set_xlabel(unit)
    axes.set_title(title)
    for index, label in enumerate(labels):
        axes.text(bars[label], index, f" {bars[label]:.3g}", va="center")
    figure.tight_layout()
    path = RESULTS_DIR / f"{name}.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- embedded S3


def start_child_server(code: str, *args: str, what: str, **popen: Any) -> tuple[subprocess.Popen[str], str]:
    """A server in a child Python process (``python -c code *args`` in the repository): it
    prints its endpoint on its first line, then serves until its stdin closes. Returns the
    process and the endpoint; raises if the first line is not one (``what`` names it)."""
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        **popen,
    )
    assert process.stdout is not None
    endpoint = process.stdout.readline().strip()
    if not endpoint.startswith("http://"):
        stop_child_server(process)
        raise RuntimeError(f"{what} did not start")
    return process, endpoint


def stop_child_server(process: subprocess.Popen[str]) -> None:
    """Close its stdin (the child exits then), killed if it has not within 5 s."""
    if process.stdin:
        process.stdin.close()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()


class S3Server:
    """The project's EmbeddedS3 (moto's server on 127.0.0.1).

    ``mode="process"`` (the default for benchmarks) runs it in a child process, so serving
    the bytes does not compete with the code under test for this process's GIL: like S3,
    which never runs inside the Lambda. ``mode="thread"`` runs it in this process, as the
    tests and ``tierserve local`` do.

    ``throttle_mb_per_s`` (process mode) puts a proxy in front of it, in the child too, that
    sends each connection's responses at most that fast: loopback moves bytes about ten times
    faster than one S3 connection does (roughly 90 MB/s from Lambda).
    """

    def __init__(self, mode: str = "process", *, throttle_mb_per_s: float | None = None) -> None:
        if mode not in ("process", "thread"):
            raise ValueError("mode is 'process' or 'thread'")
        if throttle_mb_per_s and mode != "process":
            raise ValueError("throttling needs mode='process'")
        self.mode = mode
        self.throttle_mb_per_s = throttle_mb_per_s
        self.endpoint = ""
        self._process: subprocess.Popen[str] | None = None
        self._server: Any = None

    def __enter__(self) -> S3Server:
        if self.mode == "thread":
            from tierserve.tools.local.embedded_s3 import EmbeddedS3

            self._server = EmbeddedS3().start()
            self.endpoint = self._server.endpoint
        else:
            code = "import sys; from bench.common import _serve_s3; _serve_s3(float(sys.argv[1]))"
            self._process, self.endpoint = start_child_server(
                code, str(self.throttle_mb_per_s or 0), what="the embedded S3", stderr=subprocess.DEVNULL
            )
        from tierserve.tools.local.embedded_s3 import LOCAL_CREDENTIALS

        os.environ.update(LOCAL_CREDENTIALS)
        os.environ["AWS_ENDPOINT_URL_S3"] = self.endpoint
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()
        if self._process is not None:
            stop_child_server(self._process)

    def client(self) -> Any:
        """A boto3 S3 client for the embedded S3, with the loader's own policy (tierserve.aws)."""
        from tierserve import aws

        return aws.client("s3", endpoint_url=self.endpoint)


def _serve_s3(throttle_mb_per_s: float) -> None:
    """The child process of :class:`S3Server`: print the endpoint, serve until stdin closes."""
    import logging

    from tierserve.tools.local.embedded_s3 import EmbeddedS3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = EmbeddedS3().start()
    endpoint = server.endpoint
    if throttle_mb_per_s > 0:
        endpoint = _ThrottlingProxy(server.endpoint, throttle_mb_per_s * 1e6).start()
    print(endpoint, flush=True)
    sys.stdin.read()


class _ThrottlingProxy:
    """A TCP proxy on 127.0.0.1 that paces each connection's downstream bytes to ``rate`` B/s."""

    def __init__(self, upstream: str, rate: float) -> None:
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._rate = rate
        self._listener = socket.create_server(("127.0.0.1", 0))

    def start(self) -> str:
        import threading

        threading.Thread(target=self._accept, daemon=True).start()
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            client, _ = self._listener.accept()
            upstream = socket.create_connection(self._upstream)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self._rate), daemon=True).start()

    @staticmethod
    def _pipe(source: Any, target: Any, rate: float | None) -> None:
        import socket

        sent, started = 0, 0.0
        try:
            while data := source.recv(256 * 1024):
                if rate:
                    now = time.perf_counter()
                    if now > started + sent / rate + 0.05:  # idle since the last response: a fresh pace
                        started, sent = now, 0
                    due = started + (sent + len(data)) / rate
                    if due > now:
                        time.sleep(due - now)
                    sent += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
