"""What capture adds to an inference: ``Capture.offer`` on the request's thread, against the
data plane's whole ``infer`` of the same request (iris, and a 256-feature perceptron row).

    python -m bench.capture_overhead               # 5 rounds of 2,000 requests each
    python -m bench.capture_overhead --requests 5000

Each round times ``DataPlane.infer`` (parse, run, the capture hook) on a JSON request with
capture off, at rate 1 (every request kept: the worst case), and at rate 1 while the writer's
S3 put hangs (the buffer fills, then drops: an inference must not wait). The put is an
in-memory stand-in here: what is timed is the request thread's share, not S3's. Medians of the
rounds, and the ratio to capture off within each round. JSON to bench/results/capture_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import say, write_results


def build(folder: Path) -> dict[str, tuple[Any, bytes]]:
    from tierserve.dataplane import DataPlane
    from tierserve.registry import ModelRegistry
    from tierserve.settings import ModelRef, Settings
    from tierserve.tools.local import samples
    from tierserve.tools.packaging import package_model

    models = {
        "iris": (samples.iris_classifier, np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)),
        "mlp": (lambda p: samples.mlp(p, hidden=64, layers=3), np.full((1, 256), 0.5, np.float32)),
    }
    planes = {}
    for name, (builder, row) in models.items():
        package_model(
            builder(folder / f"{name}.onnx"), name=name, version="1", out_dir=folder / "models" / name / "1"
        )
        registry = ModelRegistry(
            Settings(
                model_root=f"file://{folder / 'models'}",
                models=(ModelRef(name, "1"),),
                cache_dir=folder / "cache",
            )
        )
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(row.shape),
                        "datatype": "FP32",
                        "data": row.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        planes[name] = (DataPlane(registry), body)
    return planes


def time_infer(plane: Any, name: str, body: bytes, requests: int) -> float:
    plane.infer(name, body, {"Content-Type": "application/json"})  # warm
    start = time.perf_counter()
    for _ in range(requests):
        plane.infer(name, body, {"Content-Type": "application/json"})
    return (time.perf_counter() - start) / requests * 1e6


def time_offer(name: str, requests: int) -> float:
    """Microseconds of ``Capture.offer`` alone for one kept request of ``name``'s shape."""
    from tierserve.capture import Capture, CaptureRule
    from tierserve.settings import ModelRef

    width = 4 if name == "iris" else 256
    inputs = {"input": np.full((1, width), 0.5, np.float32)}
    capture = Capture({name: CaptureRule(1.0)}, put=lambda key, data: None, batch=200)
    start = time.perf_counter()
    for _ in range(requests):
        capture.offer(ModelRef(name, "1"), inputs, {})
    elapsed = (time.perf_counter() - start) / requests * 1e6
    capture.close()
    return elapsed


def main(argv: list[str] | None = None) -> None:
    from tierserve.capture import Capture, CaptureRule

    parser = argparse.ArgumentParser(
        prog="python -m bench.capture_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"rounds": args.rounds, "requests": args.requests, "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        planes = build(Path(folder))
        for name, (plane, body) in planes.items():
            rows: dict[str, list[float]] = {"off": [], "rate 1": [], "rate 1, S3 hangs": []}
            for _ in range(args.rounds):
                plane.capture = None
                rows["off"].append(time_infer(plane, name, body, args.requests))
                plane.capture = Capture({name: CaptureRule(1.0)}, put=lambda key, data: None, batch=200)
                rows["rate 1"].append(time_infer(plane, name, body, args.requests))
                plane.capture.close()
                hang = threading.Event()
                plane.capture = Capture(
                    {name: CaptureRule(1.0)}, put=lambda key, data, hang=hang: hang.wait(), batch=200
                )
                rows["rate 1, S3 hangs"].append(time_infer(plane, name, body, args.requests))
                hang.set()
                plane.capture.close()
            entry = {k: statistics.median(v) for k, v in rows.items()}
            entry["offer alone"] = time_offer(name, args.requests)
            entry["ratio rate 1"] = statistics.median(
                a / b for a, b in zip(rows["rate 1"], rows["off"], strict=True)
            )
            entry["ratio S3 hangs"] = statistics.median(
                a / b for a, b in zip(rows["rate 1, S3 hangs"], rows["off"], strict=True)
            )
            results["models"][name] = entry
            say(
                f"  {name:5s} infer {entry['off']:7.1f} us off, {entry['rate 1']:7.1f} us at rate 1 "
                f"({entry['ratio rate 1']:.2f}x), {entry['rate 1, S3 hangs']:7.1f} us while S3 hangs "
                f"({entry['ratio S3 hangs']:.2f}x); offer alone {entry['offer alone']:.1f} us"
            )
    print(json.dumps(results["models"], indent=2))
    write_results(
        "capture_overhead", results, command=" ".join(["python -m bench.capture_overhead", *(argv or [])])
    )


if __name__ == "__main__":
    main()
