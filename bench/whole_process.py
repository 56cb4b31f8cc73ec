"""A whole cold start as Lambda runs it: a new process, the API handler's import and preload
(its init), then one infer event; against a floor process that imports boto3, numpy and
onnxruntime, GETs the model's bytes and opens the session.

    python -m bench.whole_process --size-mb 100 --rounds 7
    taskset -c 0 python -m bench.whole_process --size-mb 100 --rounds 7

Each round runs, in a rotating order, fresh interpreters (wall time from start to exit, as the
parent sees it):

- ours: ``import api`` with ``TIERSERVE_PRELOAD`` naming the model (a new /tmp cache each time),
  then ``api.handler(event, context)`` with a JSON infer event built by the local stack's
  API Gateway event builder; the process checks the answer is a 200.
- floor_path / floor_bytes: ``import boto3, numpy, onnxruntime``, one GET of the stored bytes,
  a session (from a file written to /tmp, or from the bytes), one ``run``.

The S3 is ``bench/loopback_s3.py`` (unpaced) in its own process; the model is the cold_start
benchmark's packaged MLP. The target: ours at most 1.2x the faster floor, per round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cold_start import BUCKET, NAME, PREFIX, VERSION, packaged_model
from bench.common import REPO_ROOT, say, write_results

TARGET = 1.2

OURS = """
import json, sys
import api
from tierserve.tools.local.apigw import LocalLambdaContext
event = json.load(open(sys.argv[1]))
answer = api.handler(event, LocalLambdaContext())
assert answer["statusCode"] == 200, answer
"""

FLOOR = """
import sys
import boto3, numpy, onnxruntime
onnxruntime.disable_telemetry_events()
client = boto3.client("s3")
data = client.get_object(Bucket=sys.argv[1], Key=sys.argv[2])["Body"].read()
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = 1
options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
if sys.argv[3] == "path":
    path = sys.argv[4] + "/model.onnx"
    open(path, "wb").write(data)
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
else:
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
x = numpy.zeros((1, session.get_inputs()[0].shape[1]), numpy.float32)
session.run(None, {session.get_inputs()[0].name: x})
"""


def infer_event(manifest: Any, path: Path) -> Path:
    import numpy as np

    from tierserve.protocol import encode_infer_request
    from tierserve.tools.local.apigw import proxy_event

    spec = manifest.inputs[0]
    x = np.zeros((1, spec.shape[1]), np.float32)
    encoded = encode_infer_request({spec.name: x})
    event = proxy_event(
        "POST", f"/v2/models/{NAME}/infer", {"Content-Type": "application/json"}, encoded.body
    )
    path.write_text(json.dumps(event))
    return path


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, timeout=300)
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.loopback_s3 import LoopbackS3
    from tierserve.tools.local.embedded_s3 import LOCAL_CREDENTIALS

    parser = argparse.ArgumentParser(prog="python -m bench.whole_process", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size-mb", type=float, default=100)
    args = parser.parse_args(argv)
    packaged = packaged_model(args.size_mb)
    manifest = packaged.manifest
    with tempfile.TemporaryDirectory(prefix="tierserve-bench-") as tmp:
        root = Path(tmp) / "s3"
        folder = root / BUCKET / PREFIX / manifest.key_prefix
        folder.mkdir(parents=True)
        shutil.copy(packaged.artifact, folder / manifest.artifact)
        (folder / "manifest.json").write_text(manifest.to_json())
        event = infer_event(manifest, Path(tmp) / "event.json")
        key = f"{PREFIX}/{manifest.key_prefix}/{manifest.artifact}"
        with LoopbackS3(root) as s3:
            base = {
                **os.environ,
                **LOCAL_CREDENTIALS,
                "AWS_ENDPOINT_URL_S3": s3.endpoint,
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO_ROOT / "layers/tierserve/python"), str(REPO_ROOT / "functions/inference")]
                ),
                "POWERTOOLS_METRICS_DISABLED": "true",
                "POWERTOOLS_LOG_LEVEL": "WARNING",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "2048",
            }
            base.pop("POWERTOOLS_TRACE_DISABLED", None)

            def ours() -> float:
                cache = Path(tmp) / "cache"
                shutil.rmtree(cache, ignore_errors=True)
                env = {
                    **base,
                    "TIERSERVE_MODEL_BUCKET": BUCKET,
                    "TIERSERVE_MODEL_PREFIX": PREFIX,
                    "TIERSERVE_MODELS": f"{NAME}@{VERSION}",
                    "TIERSERVE_PRELOAD": NAME,
                    "TIERSERVE_CACHE_DIR": str(cache),
                }
                return timed([sys.executable, "-c", OURS, str(event)], env)

            def floor(form: str) -> float:
                work = Path(tmp) / "floor"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                return timed([sys.executable, "-c", FLOOR, BUCKET, key, form, str(work)], base)

            runs = {"ours": ours, "floor_path": lambda: floor("path"), "floor_bytes": lambda: floor("bytes")}
            say(f"whole_process: {manifest.model.bytes / 1e6:.1f} MB model; {args.rounds} rounds + 1 warm-up")
            for run in runs.values():
                run()
            samples: dict[str, list[float]] = {name: [] for name in runs}
            names = list(runs)
            for index in range(args.rounds):
                for name in names[index % len(names) :] + names[: index % len(names)]:
                    samples[name].append(runs[name]())
                say(
                    "  round " + str(index + 1) + ": " + "  ".join(f"{n} {samples[n][-1]:.0f}" for n in names)
                )
    ratios = [
        o / min(p, b)
        for o, p, b in zip(samples["ours"], samples["floor_path"], samples["floor_bytes"], strict=True)
    ]
    results = {
        "model_bytes": manifest.model.bytes,
        "rounds": args.rounds,
        "median_ms": {name: statistics.median(values) for name, values in samples.items()},
        "ours_vs_floor_per_round_median": statistics.median(ratios),
        "target": TARGET,
    }
    for name, value in results["median_ms"].items():
        say(f"  {name:12s} {value:7.0f} ms")
    say(
        f"  ours / floor (per round, the faster floor) = {results['ours_vs_floor_per_round_median']:.2f}x (target <= {TARGET})"
    )
    write_results(
        "whole_process", results, command=" ".join(["python -m bench.whole_process", *(argv or [])])
    )
    return results


if __name__ == "__main__":
    main()
