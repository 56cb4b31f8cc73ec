"""The GPU server with dynamic batching vs without: throughput at concurrency 32 and latency
(p50/p99) at concurrency 1 and 32, over real HTTP on 127.0.0.1.

The server runs as it does in its container (``functions/gpu_server/serve``, a separate
process, model from a SageMaker-style model directory); the clients are threads in this
process, one keep-alive connection each, sending OIP binary requests (what v2 clients send
by default) of one row each, every client its own inputs. "Without batching" is the same
server with ``TIERSERVE_MAX_BATCH_SIZE=1``: every request is its own ``session.run``,
concurrently. Both servers run side by side and the scenarios alternate for ``--rounds``
rounds of ``--duration`` seconds (after a short warm-up each), so a shared machine's
changing load falls on both alike; throughput is the median of the rounds, latency
percentiles are over every request.

Providers are whatever this machine's onnxruntime has: CPU here (no GPU machine is lent to
this task, so there are no CUDA/TensorRT figures).

    python -m bench.gpu_server                       # mlp (about 70 MB), 3 rounds of 5 s
    python -m bench.gpu_server --model mlp-small --duration 10
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import WORK_DIR, say, summarize, write_results
from tierserve.protocol import decode_infer_response, encode_infer_request
from tierserve.settings import ModelRef
from tierserve.tools.local import samples
from tierserve.tools.local.gpu_servers import GpuServerProcess
from tierserve.tools.packaging import package_model

NAME = "gpu_server"
TARGET_SPEEDUP = 3.0
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


def load(url: str, model: str, concurrency: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    """``concurrency`` clients for ``warmup_s`` + ``duration_s``; figures from the last part."""
    host, port = url.removeprefix("http://").split(":")
    bodies = client_bodies(model, concurrency)
    path = f"/v2/models/{model}/infer"
    start = time.monotonic()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    barrier = threading.Barrier(concurrency)

    def client(index: int) -> None:
        body, headers = bodies[index]
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        barrier.wait()
        while True:
            sent = time.monotonic()
            if sent >= stop_at:
                break
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            done = time.monotonic()
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
    return {"samples_ms": samples_ms, "errors": sum(errors), "throughput_rps": len(samples_ms) / duration_s}


def start_server(model: str, max_batch_size: int, delay_ms: float) -> GpuServerProcess:
    environ = {
        "TIERSERVE_MODEL_DIR": str(model_dir(model)),
        "TIERSERVE_CACHE_DIR": str(WORK_DIR / NAME / "cache"),
        "TIERSERVE_MAX_BATCH_SIZE": str(max_batch_size),
        "TIERSERVE_MAX_QUEUE_DELAY_MS": str(delay_ms),
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
    }
    return GpuServerProcess.start(ModelRef(model, "1"), environ, log_dir=WORK_DIR / NAME / "logs")


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one scenario: median throughput, latency over every request of every round."""
    pooled = [x for run in runs for x in run["samples_ms"]]
    return {
        "throughput_rps": statistics.median(run["throughput_rps"] for run in runs),
        "throughput_rps_per_round": [round(run["throughput_rps"], 1) for run in runs],
        "requests": len(pooled),
        "errors": sum(run["errors"] for run in runs),
        "latency_ms": summarize(pooled),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="mlp")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, batching and not alternating")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per scenario and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--delay-ms", type=float, default=5.0, help="TIERSERVE_MAX_QUEUE_DELAY_MS")
    args = parser.parse_args(argv)
    say(f"GPU server, {args.model}: dynamic batching vs none (providers: this machine's onnxruntime)")
    # Both servers run throughout (an idle one costs nothing) and the scenarios alternate, so a
    # change in the machine's load touches both alike.
    servers = {
        "batching": start_server(args.model, args.max_batch_size, args.delay_ms),
        "no_batching": start_server(args.model, 1, args.delay_ms),
    }
    concurrencies = (1, args.concurrency)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {m: {c: [] for c in concurrencies} for m in servers}
    try:
        url = servers["batching"].url
        metadata = json.loads(urllib.request.urlopen(f"{url}/v2/models/{args.model}", timeout=10).read())
        for round_index in range(args.rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for mode in order:
                for concurrency in concurrencies:
                    run = load(servers[mode].url, args.model, concurrency, args.duration, args.warmup)
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
                f"p50 {line['latency_ms']['p50']:7.2f} ms  p99 {line['latency_ms']['p99']:7.2f} ms"
            )
    say(
        f"throughput at concurrency {args.concurrency}: {speedup:.2f}x with batching (target >= {TARGET_SPEEDUP}x)"
    )
    results = {
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
    }
    name = (
        NAME
        if not argv
        else f"{NAME}-{args.model}-c{args.concurrency}-b{args.max_batch_size}-d{args.delay_ms:g}"
    )
    path = write_results(name, results, command="python -m bench.gpu_server " + " ".join(argv or []))
    say(f"results: {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
