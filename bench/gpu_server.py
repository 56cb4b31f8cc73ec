"""The GPU server with dynamic batching vs without, and on uvicorn vs the threaded server it
replaced: throughput and latency (p50/p99) at concurrency 1 and 32, over real HTTP on 127.0.0.1.

The servers run as they do in their container (``functions/gpu_server/serve``, separate
processes, model from a SageMaker-style model directory); the clients are threads in this
process, one keep-alive connection each, sending OIP binary requests (what v2 clients send
by default) of one row each, every client its own inputs. Scenarios:

- ``batching``: this working tree's server (uvicorn), ``TIERSERVE_MAX_BATCH_SIZE`` 32;
- ``no_batching``: the same with ``TIERSERVE_MAX_BATCH_SIZE=1``: every request its own
  ``session.run``, concurrently;
- ``threaded``: the server of commit ``--baseline`` (default: the last one on the
  hand-written threaded ``http.server``), extracted with ``git archive`` and run from there,
  same settings as ``batching``. ``--baseline none`` leaves it out.

All servers run side by side and the scenarios alternate for ``--rounds`` rounds of
``--duration`` seconds (after a short warm-up each), so a shared machine's changing load falls
on all alike; throughput is the median of the rounds, latency percentiles are over every
request.

Providers are whatever this machine's onnxruntime has: CPU here (no GPU machine is lent to
this task, so there are no CUDA/TensorRT figures).

    python -m bench.gpu_server                       # mlp (about 70 MB), 3 rounds of 5 s
    python -m bench.gpu_server --model mlp-small --duration 10
    python -m bench.gpu_server --baseline none       # batching vs not only
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    THREADED_SERVER_REV,
    WORK_DIR,
    baseline_tree,
    process_cpu_s,
    say,
    summarize,
    write_results,
)
from tierserve.protocol import decode_infer_response, encode_infer_request
from tierserve.settings import ModelRef
from tierserve.tools.local import samples
from tierserve.tools.local.gpu_servers import START_TIMEOUT_S, GpuServerProcess
from tierserve.tools.local.processes import free_port
from tierserve.tools.packaging import package_model

NAME = "gpu_server"
TARGET_SPEEDUP = 3.0
TARGET_ONE_CLIENT = 0.9  # batching over none for a lone client: batching must not tax it
MODELS = {
    # name -> (builder, input name, one row's shape). The default is a heavy model, what the GPU
    # tier is for: one row costs a pass over all its weights, 32 rows barely more.
    "mlp": (partial(samples.mlp, hidden=2048, layers=6), "input", (256,)),  # about 70 MB
    # A light model: its run is cheaper than the HTTP and protocol work around it, which no
    # batching reduces (a contrast figure).
    "mlp-small": (samples.mlp, "input", (256,)),  # about 10 MB
    "convnet": (partial(samples.convnet, channels=16, classes=100), "image", (3, 224, 224)),
}


def model_dir(model: str) -> Path:
    """The model packaged as SageMaker would unpack its model data (built once, then reused)."""
    build, _, _ = MODELS[model]
    folder = WORK_DIR / NAME / model
    source = folder / f"{model}.onnx"
    if not source.exists():
        build(source)
    package = folder / "model"
    if not (package / "manifest.json").exists():
        package_model(source, name=model, version="1", out_dir=package)
    return package


def client_bodies(model: str, clients: int) -> list[tuple[bytes, dict[str, str]]]:
    _, input_name, row = MODELS[model]
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(clients):
        encoded = encode_infer_request(
            {input_name: rng.standard_normal((1, *row)).astype(np.float32)}, binary=True, binary_outputs=True
        )
        bodies.append((encoded.body, encoded.headers))
    return bodies


def load(
    url: str,
    path: str,
    bodies: Sequence[tuple[bytes, dict[str, str]]],
    duration_s: float,
    warmup_s: float,
) -> dict[str, Any]:
    """One client per body, each on its own keep-alive connection, posting its body to ``path``
    for ``warmup_s`` + ``duration_s``; figures from the last part. A request that fails (a
    connection refused, reset or timed out, or a status other than 200) counts as an error."""
    host, port = url.removeprefix("http://").split(":")
    concurrency = len(bodies)
    start = time.monotonic()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    counts = [0] * concurrency
    barrier = threading.Barrier(concurrency)

    def client(index: int) -> None:
        body, headers = bodies[index]
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        barrier.wait()
        while True:
            sent = time.monotonic()
            if sent >= stop_at:
                break
            try:
                connection.request("POST", path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException):  # refused, reset or timed out: a failure
                errors[index] += 1
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=60)
                continue
            done = time.monotonic()
            counts[index] += 1
            if response.status != 200:
                errors[index] += 1
            elif index == 0 and not latencies[0]:
                decode_infer_response(payload, dict(response.getheaders()))  # the answer is readable
            if sent >= measure_from:
                latencies[index].append((done - sent) * 1000)
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples_ms = [x for per_client in latencies for x in per_client]
    return {
        "samples_ms": samples_ms,
        "errors": sum(errors),
        "throughput_rps": len(samples_ms) / duration_s,
        "requests_total": sum(counts),  # warm-up included, as the server's CPU time is
    }


def server_env(model: str, max_batch_size: int, delay_ms: float) -> dict[str, str]:
    return {
        "TIERSERVE_MODEL_DIR": str(model_dir(model)),
        "TIERSERVE_CACHE_DIR": str(WORK_DIR / NAME / "cache"),
        "TIERSERVE_MAX_BATCH_SIZE": str(max_batch_size),
        "TIERSERVE_MAX_QUEUE_DELAY_MS": str(delay_ms),
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
    }


def start_server(model: str, max_batch_size: int, delay_ms: float) -> GpuServerProcess:
    """This working tree's server."""
    environ = server_env(model, max_batch_size, delay_ms)
    return GpuServerProcess.start(ModelRef(model, "1"), environ, log_dir=WORK_DIR / NAME / "logs")


def start_baseline(rev: str, model: str, max_batch_size: int, delay_ms: float) -> GpuServerProcess:
    """The server of commit ``rev``, run from its own extracted tree (its core on PYTHONPATH)."""
    tree = baseline_tree(rev)
    port = free_port()
    log_path = WORK_DIR / NAME / "logs" / f"gpu-server-{model}-baseline.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **server_env(model, max_batch_size, delay_ms),
        "PYTHONPATH": str(tree / "layers" / "tierserve" / "python"),
    }
    serve = tree / "functions" / "gpu_server" / "serve"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(serve), "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = GpuServerProcess(ModelRef(model, "1"), process, f"http://127.0.0.1:{port}", log_path)
    try:
        server.wait_ready(START_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
    return server


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one scenario: median throughput, latency over every request of every round."""
    pooled = [x for run in runs for x in run["samples_ms"]]
    return {
        "throughput_rps": statistics.median(run["throughput_rps"] for run in runs),
        # the server process's CPU time per request (all its threads), warm-up included
        "server_cpu_ms_per_request": 1000
        * sum(run["server_cpu_s"] for run in runs)
        / max(sum(run["requests_total"] for run in runs), 1),
        "throughput_rps_per_round": [round(run["throughput_rps"], 1) for run in runs],
        "requests": len(pooled),
        "errors": sum(run["errors"] for run in runs),
        "latency_ms": summarize(pooled),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="mlp")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the scenarios alternating")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per scenario and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--delay-ms", type=float, default=5.0, help="TIERSERVE_MAX_QUEUE_DELAY_MS")
    parser.add_argument(
        "--baseline",
        default=THREADED_SERVER_REV,
        help="commit whose server runs as the 'threaded' scenario (default: the last threaded one; none: skip)",
    )
    args = parser.parse_args(argv)
    baseline = None if args.baseline.lower() == "none" else args.baseline
    say(
        f"GPU server, {args.model}: dynamic batching vs none, uvicorn vs threaded (providers: this machine's)"
    )
    # All servers run throughout (an idle one costs nothing) and the scenarios alternate, so a
    # change in the machine's load touches them alike.
    servers = {
        "batching": start_server(args.model, args.max_batch_size, args.delay_ms),
        "no_batching": start_server(args.model, 1, args.delay_ms),
    }
    if baseline is not None:
        servers["threaded"] = start_baseline(baseline, args.model, args.max_batch_size, args.delay_ms)
    concurrencies = (1, args.concurrency)
    path = f"/v2/models/{args.model}/infer"
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {m: {c: [] for c in concurrencies} for m in servers}
    try:
        url = servers["batching"].url
        metadata = json.loads(urllib.request.urlopen(f"{url}/v2/models/{args.model}", timeout=10).read())
        for round_index in range(args.rounds):
            order = list(servers)
            order = order[round_index % len(order) :] + order[: round_index % len(order)]
            for mode in order:
                for concurrency in concurrencies:
                    bodies = client_bodies(args.model, concurrency)
                    cpu_before = process_cpu_s(servers[mode].process.pid)
                    run = load(servers[mode].url, path, bodies, args.duration, args.warmup)
                    run["server_cpu_s"] = process_cpu_s(servers[mode].process.pid) - cpu_before
                    runs[mode][concurrency].append(run)
                    latency = summarize(run["samples_ms"])
                    say(
                        f"  round {round_index + 1} {mode:<11s} concurrency={concurrency:<3d} "
                        f"{run['throughput_rps']:8.1f} req/s  p50 {latency['p50']:7.2f} ms  "
                        f"p99 {latency['p99']:7.2f} ms  errors {run['errors']}"
                    )
    finally:
        for server in servers.values():
            server.stop()
    figures = {mode: {f"c{c}": summary(runs[mode][c]) for c in concurrencies} for mode in servers}
    key = f"c{args.concurrency}"
    speedup = figures["batching"][key]["throughput_rps"] / max(
        figures["no_batching"][key]["throughput_rps"], 1e-9
    )
    for mode, by_concurrency in figures.items():
        for name, line in by_concurrency.items():
            say(
                f"{mode:<11s} {name:<4s} {line['throughput_rps']:8.1f} req/s (median of {args.rounds})  "
                f"p50 {line['latency_ms']['p50']:7.2f} ms  p99 {line['latency_ms']['p99']:7.2f} ms  "
                f"server CPU {line['server_cpu_ms_per_request']:.2f} ms/request"
            )
    alone = figures["batching"]["c1"]["throughput_rps"] / max(
        figures["no_batching"]["c1"]["throughput_rps"], 1e-9
    )
    say(
        f"throughput at concurrency {args.concurrency}: {speedup:.2f}x with batching (target >= {TARGET_SPEEDUP}x)"
    )
    say(f"throughput at concurrency 1: {alone:.2f}x with batching (target >= {TARGET_ONE_CLIENT}x)")
    results: dict[str, Any] = {
        "model": args.model,
        "model_bytes": json.loads((model_dir(args.model) / "manifest.json").read_text())["model"]["bytes"],
        "execution_providers": metadata["parameters"]["execution_providers"],
        "rounds": args.rounds,
        "duration_s": args.duration,
        "batching": {
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_ms": args.delay_ms,
            **figures["batching"],
        },
        "no_batching": {"max_batch_size": 1, **figures["no_batching"]},
        "speedup_at_concurrency": {"concurrency": args.concurrency, "x": speedup, "target": TARGET_SPEEDUP},
        "one_client": {"x": alone, "target": TARGET_ONE_CLIENT},
    }
    if baseline is not None:
        results["threaded"] = {"rev": baseline, **figures["threaded"]}
        results["uvicorn_vs_threaded"] = versus(figures["batching"], figures["threaded"])
        for name, line in results["uvicorn_vs_threaded"].items():
            say(
                f"uvicorn / threaded {name:<4s} throughput {line['throughput_x']:.2f}x (not lower: >= 1)  "
                f"p99 {line['p99_x']:.2f}x (not higher: <= 1)  server CPU per request {line['cpu_per_request_x']:.2f}x"
            )
    name = (
        NAME
        if not argv
        else f"{NAME}-{args.model}-c{args.concurrency}-b{args.max_batch_size}-d{args.delay_ms:g}"
    )
    path_written = write_results(name, results, command="python -m bench.gpu_server " + " ".join(argv or []))
    say(f"results: {path_written}")
    return results


def versus(new: dict[str, Any], old: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per concurrency: new throughput over old (higher is better); new p50, p99 and server CPU
    per request over old (lower is better)."""
    return {
        key: {
            "throughput_x": new[key]["throughput_rps"] / max(old[key]["throughput_rps"], 1e-9),
            "p50_x": new[key]["latency_ms"]["p50"] / max(old[key]["latency_ms"]["p50"], 1e-9),
            "p99_x": new[key]["latency_ms"]["p99"] / max(old[key]["latency_ms"]["p99"], 1e-9),
            "cpu_per_request_x": new[key]["server_cpu_ms_per_request"]
            / max(old[key]["server_cpu_ms_per_request"], 1e-9),
        }
        for key in new
    }


if __name__ == "__main__":
    main(sys.argv[1:])
