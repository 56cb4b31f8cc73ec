"""An async job end to end on the local stack against the floor of its parts, in the same run.

A ``--mb`` MB ``.npy`` (FP32 rows of a 256-feature perceptron, 16 classes out) goes through the
jobs routes as ``tierserve infer`` sends it: ``POST .../jobs`` for an upload URL, the presigned
PUT to the embedded S3, the status polled (every ``--poll-ms``) until it succeeds, and the
result fetched by its presigned GET. The S3 notification, the embedded queue's poller and the
real worker handler run in between, as they do in ``tierserve local``.

The floor is the three things a job cannot avoid, each measured alone in the same round:

- **put**: the same bytes PUT through a presigned URL to another key of the same S3;
- **run**: ``session.run`` on the same array, in this process, the model warm;
- **get**: the job's result object fetched by presigned GET.

Everything else is the overhead of being a job: the notification and the queue, the worker's
GET of the input, decoding it, encoding the OIP response as JSON and writing it, the status
calls. The largest of those, the worker's read of the input, is measured too (**read**: a GET
of the same bytes), and a second ratio puts it in the floor. Rounds interleave the job and its
parts; medians are reported.

    python -m bench.jobs
    python -m bench.jobs --mb 50 --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import say, write_results

FEATURES, CLASSES = 256, 16
MODEL = "bench-mlp"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50, help="size of the .npy input (default 50)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of job and parts (default 3)")
    parser.add_argument("--poll-ms", type=float, default=50, help="status poll interval (default 50 ms)")
    return parser


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.read()


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def one_job(api: str, data: bytes, poll_s: float) -> tuple[float, str, dict[str, float]]:
    """A job end to end; returns its seconds, its result object's key and its phases."""
    started = time.perf_counter()
    ask = json.dumps({"upload": {"format": "npy", "bytes": len(data)}}).encode()
    job = json.loads(http("POST", f"{api}/v2/models/{MODEL}/jobs", ask, {"Content-Type": "application/json"}))
    created = time.perf_counter()
    http("PUT", job["upload"]["url"], data, job["upload"]["headers"])
    uploaded = time.perf_counter()
    while True:
        status = json.loads(http("GET", job["result"]))
        if status["status"] == "succeeded":
            break
        if status["status"] == "failed":
            raise RuntimeError(status["error"])
        time.sleep(poll_s)
    done = time.perf_counter()
    body = (
        http("GET", status["result_url"]) if "result_url" in status else json.dumps(status["result"]).encode()
    )
    finished = time.perf_counter()
    assert json.loads(body)["outputs"][0]["shape"][1] == CLASSES
    phases = {
        "create_s": created - started,
        "upload_s": uploaded - created,
        "served_after_upload_s": done - uploaded,
        "download_s": finished - done,
    }
    return finished - started, status.get("result_url", ""), phases


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import onnxruntime as ort

    from tierserve.tools.local import samples
    from tierserve.tools.local import stack as local_stack

    rows = int(args.mb * 2**20 // (FEATURES * 4))
    array = np.random.default_rng(0).standard_normal((rows, FEATURES)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    work = Path(tempfile.mkdtemp(prefix="tierserve-bench-jobs-"))
    chosen = (
        local_stack.Sample(
            MODEL, "1", partial(samples.mlp, features=FEATURES, hidden=64, layers=2, classes=CLASSES)
        ),
    )
    saved = dict(os.environ)
    say(f"starting the local stack in {work}")
    stack = local_stack.start(work, port=0, chosen=chosen)
    try:
        api = stack.api.url
        session = ort.InferenceSession(
            str(work / "samples" / f"{MODEL}.onnx"), providers=["CPUExecutionProvider"]
        )
        s3 = stack.s3.client()
        session.run(None, {"input": array})  # warm
        one_job(api, data, args.poll_ms / 1000)  # warm: the worker loads the model on its first job
        rounds: list[dict[str, float]] = []
        for index in range(args.rounds):
            total, result_url, phases = one_job(api, data, args.poll_ms / 1000)
            url = s3.generate_presigned_url(
                "put_object",
                Params={"Bucket": local_stack.DATA_BUCKET, "Key": f"bench/put-{index}.npy"},
                ExpiresIn=600,
                HttpMethod="PUT",
            )
            put_s, _ = timed(
                lambda url=url: http("PUT", url, data, {"Content-Type": "application/octet-stream"})
            )
            run_s, _ = timed(lambda: session.run(None, {"input": array}))
            get_s, _ = timed(lambda url=result_url: http("GET", url))
            key = f"bench/put-{index}.npy"
            read_s, _ = timed(
                lambda key=key: s3.get_object(Bucket=local_stack.DATA_BUCKET, Key=key)["Body"].read()
            )
            floor = put_s + run_s + get_s
            rounds.append(
                {
                    "job_s": total,
                    "put_s": put_s,
                    "run_s": run_s,
                    "get_s": get_s,
                    "read_s": read_s,
                    "floor_s": floor,
                    "floor_with_read_s": floor + read_s,
                    **phases,
                }
            )
            say(
                f"round {index + 1}: job {total:.2f} s; floor {floor:.2f} s (put {put_s:.2f} + run {run_s:.2f} "
                f"+ get {get_s:.2f}); ratio {total / floor:.2f}x; with the input's read ({read_s:.2f} s) "
                f"{total / (floor + read_s):.2f}x"
            )
    finally:
        stack.stop()
        os.environ.clear()
        os.environ.update(saved)
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    ratio = statistics.median(r["job_s"] / r["floor_s"] for r in rounds)
    ratio_with_read = statistics.median(r["job_s"] / r["floor_with_read_s"] for r in rounds)
    results = {
        "input_mb": len(data) / 2**20,
        "rows": rows,
        "rounds": rounds,
        "median": medians,
        "ratio_job_to_floor": ratio,
        "ratio_job_to_floor_with_read": ratio_with_read,
    }
    path = write_results(
        "jobs", results, command=" ".join(["python", "-m", "bench.jobs", *(argv or sys.argv[1:])])
    )
    print(
        f"{len(data) / 2**20:.1f} MB .npy job: {medians['job_s']:.2f} s end to end; floor "
        f"{medians['floor_s']:.2f} s (put {medians['put_s']:.2f}, run {medians['run_s']:.2f}, get {medians['get_s']:.2f}); "
        f"job / floor = {ratio:.2f}x; with the worker's read of the input ({medians['read_s']:.2f} s) in the "
        f"floor, {ratio_with_read:.2f}x (medians of {len(rounds)}); {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
