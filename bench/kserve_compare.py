"""Iris through tierserve's GPU server and through KServe's Python model server, same model
file, same client: throughput and latency at concurrency 1 and 16, over real HTTP on 127.0.0.1.

- ``tierserve``: ``functions/gpu_server/serve`` as its container runs it, with its shipped
  defaults (dynamic batching on, ``TIERSERVE_MAX_BATCH_SIZE`` 32, metrics on);
- ``tierserve_no_batching``: the same with ``TIERSERVE_MAX_BATCH_SIZE=1`` (a reference);
- ``kserve``: KServe 0.21's ``ModelServer`` with a small custom ``kserve.Model`` running
  onnxruntime on the same ``.onnx`` bytes (``bench/kserve_model.py``), its defaults otherwise
  (one worker, uvloop, FastAPI, latency logging); gRPC off.

KServe is installed by this benchmark into its own virtual environment
(``.tierserve/bench/kserve-venv``, gitignored; ``--kserve-venv`` to put it elsewhere), with
this environment's onnxruntime and numpy versions; it is never one of tierserve's
requirements. The first run creates it (network access to the package index, a minute or two).

The client is the one ``bench.gpu_server`` uses: a thread per client, one keep-alive
``http.client`` connection each, here sending V2 JSON requests of one iris row (each client
its own row) to ``POST /v2/models/iris/infer``, which both servers answer. Servers run side by
side and the scenarios alternate for ``--rounds`` rounds; throughput is the median of the
rounds; the ratios are tierserve over KServe, within this run.

    python -m bench.kserve_compare                  # 3 rounds of 5 s, concurrency 1 and 16
    python -m bench.kserve_compare --rounds 5 --duration 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO_ROOT, WORK_DIR, process_cpu_s, say, summarize, write_results
from bench.gpu_server import load, summary
from tierserve.settings import ModelRef
from tierserve.tools.local import samples
from tierserve.tools.local.gpu_servers import START_TIMEOUT_S, GpuServerProcess
from tierserve.tools.local.processes import free_port, stop_process, wait_for
from tierserve.tools.packaging import package_model

NAME = "kserve_compare"
KSERVE_VERSION = "0.21.0"
TARGET_X = 1.5  # tierserve over KServe, at every concurrency measured
MODEL = "iris"
KSERVE_MODEL = REPO_ROOT / "bench" / "kserve_model.py"


def model_dir() -> Path:
    """Iris packaged as SageMaker unpacks model data (built once, then reused)."""
    folder = WORK_DIR / NAME / MODEL
    source = folder / f"{MODEL}.onnx"
    if not source.exists():
        samples.iris_classifier(source)
    package = folder / "model"
    if not (package / "manifest.json").exists():
        package_model(source, name=MODEL, version="1", out_dir=package)
    return package


def same_model_file(package: Path) -> Path:
    """The ``.onnx`` KServe loads: the source file, checked to be byte for byte the model the
    package serves (the manifest's digest of the decompressed artifact)."""
    source = package.parent / f"{MODEL}.onnx"
    manifest = json.loads((package / "manifest.json").read_text())
    if hashlib.sha256(source.read_bytes()).hexdigest() != manifest["model"]["sha256"]:
        raise RuntimeError(f"{source} is not the model {package} serves: delete {package.parent} and rerun")
    return source


def kserve_python(venv: Path) -> Path:
    """The Python of a virtual environment with KServe, this onnxruntime and this numpy
    (created on first use; reused while its pins match)."""
    import onnxruntime

    pins = [
        f"kserve=={KSERVE_VERSION}",
        f"onnxruntime=={onnxruntime.__version__}",
        f"numpy=={np.__version__}",
    ]
    python = venv / "bin" / "python"
    stamp = venv / ".tierserve-pins"
    if python.exists() and stamp.exists() and stamp.read_text().split() == pins:
        return python
    say(f"installing {' '.join(pins)} into {venv} (once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True)
    stamp.write_text("\n".join(pins) + "\n")
    return python


class KServeProcess:
    """``bench/kserve_model.py`` under the KServe environment's Python, on a free port."""

    def __init__(self, python: Path, model_path: Path, log_dir: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "kserve.log"
        command = [
            str(python),
            "-I",  # isolated: bench/ (whose packaging.py would shadow the library) is not on its path
            str(KSERVE_MODEL),
            "--model-path",
            str(model_path),
            "--model-name",
            MODEL,
            "--http_port",
            str(port),
        ]
        with self.log_path.open("wb") as log:
            # Its own environment only: nothing of tierserve's on its path.
            env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(self.process, self.ready, START_TIMEOUT_S, "KServe's model server", self.log_path)
        except BaseException:
            self.stop()
            raise

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/models/{MODEL}/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        stop_process(self.process)


def start_tierserve(max_batch_size: int) -> GpuServerProcess:
    env = {
        "TIERSERVE_MODEL_DIR": str(model_dir()),
        "TIERSERVE_CACHE_DIR": str(WORK_DIR / NAME / "cache"),
        "TIERSERVE_MAX_BATCH_SIZE": str(max_batch_size),
        # The shipped defaults otherwise: metrics on (EMF lines go to the server's log), as
        # KServe keeps its Prometheus histograms and latency log lines.
        "POWERTOOLS_METRICS_DISABLED": "false",
        "POWERTOOLS_LOG_LEVEL": "INFO",
    }
    suffix = "" if max_batch_size > 1 else "-no-batching"
    return GpuServerProcess.start(ModelRef(MODEL, "1"), env, log_dir=WORK_DIR / NAME / f"logs{suffix}")


def iris_bodies(clients: int) -> list[tuple[bytes, dict[str, str]]]:
    """One V2 JSON request of one iris row per client, each client its own row."""
    rows = samples.iris_rows()
    bodies = []
    for index in range(clients):
        row = rows[(index * 37) % len(rows)].tolist()
        body = json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": row}]}
        ).encode()
        bodies.append((body, {"Content-Type": "application/json"}))
    return bodies


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kserve_compare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the servers alternating")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per scenario and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--kserve-venv", type=Path, default=WORK_DIR / "kserve-venv")
    args = parser.parse_args(argv)
    package = model_dir()
    python = kserve_python(args.kserve_venv)
    say(f"iris: tierserve's GPU server vs KServe {KSERVE_VERSION}, concurrency {args.concurrency}")
    servers: dict[str, Any] = {}
    try:
        servers["tierserve"] = start_tierserve(32)
        servers["tierserve_no_batching"] = start_tierserve(1)
        servers["kserve"] = KServeProcess(python, same_model_file(package), WORK_DIR / NAME / "logs")
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {
            m: {c: [] for c in args.concurrency} for m in servers
        }
        path = f"/v2/models/{MODEL}/infer"
        for round_index in range(args.rounds):
            order = list(servers)
            order = order[round_index % len(order) :] + order[: round_index % len(order)]
            for mode in order:
                for concurrency in args.concurrency:
                    pid = servers[mode].process.pid
                    cpu_before = process_cpu_s(pid)
                    run = load(servers[mode].url, path, iris_bodies(concurrency), args.duration, args.warmup)
                    run["server_cpu_s"] = process_cpu_s(pid) - cpu_before
                    runs[mode][concurrency].append(run)
                    latency = summarize(run["samples_ms"])
                    say(
                        f"  round {round_index + 1} {mode:<21s} concurrency={concurrency:<3d} "
                        f"{run['throughput_rps']:8.1f} req/s  p50 {latency['p50']:6.2f} ms  "
                        f"p99 {latency['p99']:6.2f} ms  errors {run['errors']}"
                    )
    finally:
        for server in servers.values():
            server.stop()
    figures = {mode: {f"c{c}": summary(runs[mode][c]) for c in args.concurrency} for mode in servers}
    ratios = {
        key: figures["tierserve"][key]["throughput_rps"] / max(figures["kserve"][key]["throughput_rps"], 1e-9)
        for key in figures["tierserve"]
    }
    for mode, by_concurrency in figures.items():
        for key, line in by_concurrency.items():
            say(
                f"{mode:<21s} {key:<4s} {line['throughput_rps']:8.1f} req/s (median of {args.rounds})  "
                f"p50 {line['latency_ms']['p50']:6.2f} ms  p99 {line['latency_ms']['p99']:6.2f} ms  "
                f"server CPU {line['server_cpu_ms_per_request']:.2f} ms/request"
            )
    for key, x in ratios.items():
        say(f"tierserve / KServe {key:<4s} throughput {x:.2f}x (target >= {TARGET_X}x)")
    results = {
        "model": MODEL,
        "kserve": KSERVE_VERSION,
        "rounds": args.rounds,
        "duration_s": args.duration,
        **figures,
        "tierserve_over_kserve": {key: {"x": x, "target": TARGET_X} for key, x in ratios.items()},
    }
    written = write_results(NAME, results, command="python -m bench.kserve_compare " + " ".join(argv or []))
    say(f"results: {written}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
