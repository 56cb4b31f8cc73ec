"""The local API's HTTP front: uvicorn (this working tree) vs the threaded ``http.server`` it
replaced (commit ``--baseline``), through the real Lambda handler, over real HTTP on 127.0.0.1.

Each variant is ``tierserve local`` as a child process (its own embedded S3, the iris sample
only, the S3 pipeline idle), run from its own tree: the working tree, and the baseline commit
extracted with ``git archive``. Clients are threads in this process, one keep-alive
connection each, posting one-row JSON infer requests for iris. Scenarios, alternating between
the variants for ``--rounds`` rounds of ``--duration`` seconds:

- ``c1``: one client;
- ``c32``: 32 clients at once (the handler still serves one request at a time, as one Lambda
  execution environment does: what changes is how the front holds the waiting connections);
- ``idle300``: one client while 300 other connections are open and idle (half of them in the
  middle of a request head).

Throughput is the median of the rounds; latency percentiles are over every request; server
CPU per request is the child process's CPU time (all threads) over the requests it answered;
errors are requests that failed (refused or reset connections, non-200 answers).

    python -m bench.local_api                      # 3 rounds of 5 s
    python -m bench.local_api --rounds 5 --duration 3
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    REPO_ROOT,
    THREADED_SERVER_REV,
    WORK_DIR,
    baseline_tree,
    process_cpu_s,
    say,
    summarize,
    write_results,
)
from bench.gpu_server import load, versus
from tierserve.protocol import encode_infer_request

NAME = "local_api"
IDLE_CONNECTIONS = 300
START_TIMEOUT_S = 300
# The child: the local stack on the iris sample, its URL written to a file, until stdin closes.
RUNNER = """
import sys
import time
from pathlib import Path
from tierserve.tools.local import stack
chosen = tuple(s for s in stack.SAMPLES if s.name == "iris")
local = stack.start(Path(sys.argv[1]), port=0, chosen=chosen)
Path(sys.argv[2]).write_text(local.api.url)
sys.stdin.read()
local.stop()
"""


class LocalApiProcess:
    """``tierserve local`` (iris only) from the tree at ``root``, as a child process."""

    def __init__(self, name: str, root: Path) -> None:
        work_dir = WORK_DIR / NAME / name
        work_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERSERVE_", "AWS_"))}
        env["PYTHONPATH"] = str(root / "layers" / "tierserve" / "python")
        self.log_path = work_dir / "local.log"
        url_file = work_dir / "url"
        url_file.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:  # its metric lines too: a pipe nobody reads would fill
            self.process = subprocess.Popen(
                [sys.executable, "-c", RUNNER, str(work_dir), str(url_file)],
                cwd=root,
                env=env,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not url_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {name} local API did not start; see {self.log_path}")
            time.sleep(0.1)
        self.url = url_file.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def iris_body() -> tuple[bytes, dict[str, str]]:
    encoded = encode_infer_request({"input": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)})
    return encoded.body, encoded.headers


def open_idle(url: str, count: int) -> tuple[list[socket.socket], int]:
    """``count`` idle connections (every other one holding half a request head); the ones the
    server refused are counted, not raised."""
    host, port = url.removeprefix("http://").split(":")
    connections, refused = [], 0
    for index in range(count):
        try:
            connection = socket.create_connection((host, int(port)), timeout=10)
            if index % 2:
                connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
            connections.append(connection)
        except OSError:
            refused += 1
    return connections, refused


def run_scenario(api: LocalApiProcess, scenario: str, duration: float, warmup: float) -> dict[str, Any]:
    bodies = [iris_body()] * (32 if scenario == "c32" else 1)
    idle, refused = open_idle(api.url, IDLE_CONNECTIONS) if scenario == "idle300" else ([], 0)
    try:
        cpu_before = process_cpu_s(api.process.pid)
        run = load(api.url, "/v2/models/iris/infer", bodies, duration, warmup)
        run["server_cpu_s"] = process_cpu_s(api.process.pid) - cpu_before
    finally:
        for connection in idle:
            connection.close()
    run["idle_refused"] = refused
    return run


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    pooled = [x for run in runs for x in run["samples_ms"]]
    return {
        "throughput_rps": statistics.median(run["throughput_rps"] for run in runs),
        "throughput_rps_per_round": [round(run["throughput_rps"], 1) for run in runs],
        "requests": len(pooled),
        "errors": sum(run["errors"] for run in runs),
        "idle_connections_refused": sum(run["idle_refused"] for run in runs),
        "server_cpu_ms_per_request": 1000
        * sum(run["server_cpu_s"] for run in runs)
        / max(sum(run["requests_total"] for run in runs), 1),
        "latency_ms": summarize(pooled) if pooled else {},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.local_api", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the variants alternating")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per scenario and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--baseline", default=THREADED_SERVER_REV, help="commit of the threaded local API")
    args = parser.parse_args(argv)
    say(f"local API: uvicorn (working tree) vs threaded ({args.baseline[:12]}), iris through the handler")
    apis = {
        "uvicorn": LocalApiProcess("uvicorn", REPO_ROOT),
        "threaded": LocalApiProcess("threaded", baseline_tree(args.baseline)),
    }
    scenarios = ("c1", "c32", "idle300")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {v: {s: [] for s in scenarios} for v in apis}
    try:
        for round_index in range(args.rounds):
            order = list(apis) if round_index % 2 == 0 else list(reversed(apis))
            for variant in order:
                for scenario in scenarios:
                    run = run_scenario(apis[variant], scenario, args.duration, args.warmup)
                    runs[variant][scenario].append(run)
                    latency = summarize(run["samples_ms"]) if run["samples_ms"] else {"p50": 0, "p99": 0}
                    say(
                        f"  round {round_index + 1} {variant:<8s} {scenario:<7s} {run['throughput_rps']:7.1f} req/s  "
                        f"p50 {latency['p50']:7.2f} ms  p99 {latency['p99']:7.2f} ms  errors {run['errors']}"
                        + (f"  idle refused {run['idle_refused']}" if scenario == "idle300" else "")
                    )
    finally:
        for api in apis.values():
            api.stop()
    figures = {v: {s: summary(runs[v][s]) for s in scenarios} for v in apis}
    for variant, by_scenario in figures.items():
        for scenario, line in by_scenario.items():
            latency = line["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}
            say(
                f"{variant:<8s} {scenario:<7s} {line['throughput_rps']:7.1f} req/s  p50 {latency['p50']:7.2f} ms  "
                f"p99 {latency['p99']:7.2f} ms  server CPU {line['server_cpu_ms_per_request']:.2f} ms/request  "
                f"errors {line['errors']}"
            )
    ratios = versus(figures["uvicorn"], figures["threaded"])
    for scenario, line in ratios.items():
        say(
            f"uvicorn / threaded {scenario:<7s} throughput {line['throughput_x']:.2f}x  p99 {line['p99_x']:.2f}x  "
            f"server CPU per request {line['cpu_per_request_x']:.2f}x"
        )
    results = {
        "model": "iris",
        "rounds": args.rounds,
        "duration_s": args.duration,
        "baseline": args.baseline,
        **figures,
        "uvicorn_vs_threaded": ratios,
    }
    path = write_results(NAME, results, command="python -m bench.local_api " + " ".join(argv or []))
    say(f"results: {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
