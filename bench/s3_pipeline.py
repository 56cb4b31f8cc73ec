"""S3-triggered inference throughput: objects per second for one worker, and how many got lost.

N small inputs (one iris row each, ``.json`` by default) are put under ``inputs/iris/`` of
the embedded S3 (moto's server, in a child process, as S3 is never inside the Lambda); its
S3 -> SQS notifications fill the queue; one poller hands SQS batches to the real worker
handler the way Lambda's event source mapping does (one worker = Lambda concurrency 1),
deleting what it did not report as failed. The model is already warm (the cold start is
reported apart).

Inputs arrive in waves (``--wave``, default 100), each drained before the next: moto's
ReceiveMessage costs grow with the queue's depth (about 26 ms at 10 messages, 2.7 s at 1,000 on
the development machine), while SQS's do not; waves keep the figure about our code. The
time is the sum of the drains; the puts are timed apart.

Then the bucket is listed: every input must have exactly one result (output or error) or a
message in the DLQ; ``lost`` counts those that have neither (target 0), ``duplicates`` the
results without an input or beyond one per input.

    python -m bench.s3_pipeline                      # 1,000 .json inputs, SQS batches of 10
    python -m bench.s3_pipeline --inputs 200 --format jsonl --rows 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import WORK_DIR, S3Server, say, summarize, write_results

MODEL_BUCKET = "bench-models"
DATA_BUCKET = "bench-data"
NAME, VERSION = "iris", "1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.s3_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1000, help="objects to put (default 1000)")
    parser.add_argument("--format", choices=("json", "npy", "jsonl"), default="json", help="input format")
    parser.add_argument("--rows", type=int, default=1, help="rows per input (default 1)")
    parser.add_argument(
        "--wave", type=int, default=100, help="inputs put before each drain (default 100; see the docstring)"
    )
    parser.add_argument("--sqs-batch", type=int, default=10, help="messages per handler call (default 10)")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    parser.add_argument("--mode", choices=("process", "thread"), default="process", help="where moto runs")
    return parser


def encode(fmt: str, rows: Any) -> bytes:
    import io

    import numpy as np

    if fmt == "json":
        data = {
            "inputs": [
                {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
            ]
        }
        return json.dumps(data).encode()
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, rows)
        return buffer.getvalue()
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows.tolist())


def prepare_model(client: Any) -> None:
    from tierserve.tools.local import samples
    from tierserve.tools.packaging import package_model, upload

    source = WORK_DIR / "samples" / "iris.onnx"
    if not source.exists():
        samples.iris_classifier(source)
    packaged = package_model(source, name=NAME, version=VERSION, out_dir=WORK_DIR / "pipeline" / "package")
    client.create_bucket(Bucket=MODEL_BUCKET)
    upload(packaged, client, MODEL_BUCKET, "models")


def load_worker() -> Any:
    from tierserve.settings import CACHE_DIR_ENV, MODEL_BUCKET_ENV, MODELS_ENV, PRELOAD_ENV
    from tierserve.tools.local.stack import load_handler

    return load_handler(
        {
            MODEL_BUCKET_ENV: MODEL_BUCKET,
            MODELS_ENV: f"{NAME}@{VERSION}",
            PRELOAD_ENV: "*",  # the cold start is measured apart, below
            CACHE_DIR_ENV: str(WORK_DIR / "pipeline" / "cache"),
        },
        module="worker",
    )


def depth(sqs: Any, url: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return sum(int(v) for v in attributes.values())


def list_keys(s3: Any, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=DATA_BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import boto3
    import numpy as np

    from tierserve.tools.local import samples
    from tierserve.tools.local.s3_queue import QueuePoller, create_resources

    with S3Server(args.mode) as server:
        os.environ["AWS_ENDPOINT_URL_SQS"] = server.endpoint
        s3 = server.client()
        sqs = boto3.client("sqs", endpoint_url=server.endpoint)
        prepare_model(s3)
        queues = create_resources(s3, sqs, bucket=DATA_BUCKET, max_receive_count=3, visibility_timeout_s=60)

        started = time.perf_counter()
        handler = load_worker()
        cold_ms = (time.perf_counter() - started) * 1000
        calls: list[float] = []

        def timed(event: dict[str, Any], context: Any) -> dict[str, Any]:
            start = time.perf_counter()
            try:
                return handler(event, context)
            finally:
                calls.append((time.perf_counter() - start) * 1000)

        poller = QueuePoller(sqs, queues, timed, batch_size=args.sqs_batch, wait_s=0)
        while poller.poll_once().received:  # the s3:TestEvent
            pass

        rows = np.resize(samples.iris_rows(), (args.inputs * args.rows, 4)).astype(np.float32)
        bodies = [encode(args.format, rows[i * args.rows : (i + 1) * args.rows]) for i in range(args.inputs)]
        keys = [f"inputs/{NAME}/bench/{i:06d}.{args.format}" for i in range(args.inputs)]
        from tierserve import aws

        s3_calls: dict[str, int] = {}

        def count_call(model: Any, **_: Any) -> None:
            s3_calls[model.name] = s3_calls.get(model.name, 0) + 1

        aws.s3_client().meta.events.register("before-call.s3", count_call)
        say(
            f"pipeline: {args.inputs} .{args.format} inputs ({args.rows} row(s) each) in waves of "
            f"{args.wave}, one worker draining the queue after each wave"
        )
        received = failed = 0
        put_s = seconds = cpu_s = 0.0
        deadline = time.monotonic() + args.timeout
        with ThreadPoolExecutor(8) as pool:
            for start in range(0, args.inputs, args.wave):
                wave = list(
                    zip(keys[start : start + args.wave], bodies[start : start + args.wave], strict=True)
                )
                put_started = time.perf_counter()
                list(pool.map(lambda kv: s3.put_object(Bucket=DATA_BUCKET, Key=kv[0], Body=kv[1]), wave))
                put_s += time.perf_counter() - put_started
                drain_started, cpu_started = time.perf_counter(), time.process_time()
                while time.monotonic() < deadline:
                    result = poller.poll_once()
                    received += result.received
                    failed += result.failed
                    if not result.received and depth(sqs, queues.url) == 0:
                        break
                seconds += time.perf_counter() - drain_started
                cpu_s += time.process_time() - cpu_started
        cpu_ms_per_object = cpu_s * 1000 / args.inputs
        s3_requests = {name: round(count / args.inputs, 2) for name, count in sorted(s3_calls.items())}

        inputs = set(list_keys(s3, "inputs/"))
        outputs = list_keys(s3, "outputs/")
        errors = list_keys(s3, "errors/")
        answered = [f"inputs/{k.split('/', 1)[1].removesuffix('.json')}" for k in outputs + errors]
        dead = depth(sqs, queues.dlq_url)
        still_queued = depth(sqs, queues.url)
        lost = len(inputs - set(answered)) - dead
        duplicates = len(answered) - len(set(answered)) + len(set(answered) - inputs)
        return {
            "config": vars(args),
            "objects": args.inputs,
            "rows_per_object": args.rows,
            "objects_per_second": args.inputs / seconds if seconds else float("nan"),
            "rows_per_second": args.inputs * args.rows / seconds if seconds else float("nan"),
            "drain_seconds": seconds,
            # Time inside the worker handler only: what one Lambda environment would sustain
            # if receiving from SQS cost nothing (moto's ReceiveMessage slows as the queue grows).
            "handler_objects_per_second": args.inputs / (sum(calls) / 1000) if calls else float("nan"),
            "put_seconds": put_s,
            "cold_start_ms": cold_ms,
            # This process only (worker + poller + their boto3 clients); moto runs in a child.
            "worker_cpu_ms_per_object": cpu_ms_per_object,
            "s3_requests_per_object": s3_requests,
            "handler_call_ms": summarize(calls),
            "messages_received": received,
            "messages_failed": failed,
            "outputs": len(outputs),
            "errors": len(errors),
            "dead_lettered": dead,
            "still_queued": still_queued,
            "lost": lost,
            "duplicates": duplicates,
            "written_under_inputs": len(inputs) - args.inputs,  # anything but the inputs themselves
        }


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    results = run(args)
    command = " ".join(["python -m bench.s3_pipeline", *(argv if argv is not None else sys.argv[1:])])
    name = (
        "pipeline" if (args.format, args.rows) == ("json", 1) else f"pipeline-{args.format}-{args.rows}rows"
    )
    path = write_results(name, results, command=command)
    print(
        f"{results['objects']} .{args.format} objects through S3 -> SQS -> one worker: "
        f"{results['objects_per_second']:.1f} objects/s ({results['rows_per_second']:.0f} rows/s), "
        f"drained in {results['drain_seconds']:.1f} s\n"
        f"  inside the handler alone: {results['handler_objects_per_second']:.1f} objects/s\n"
        f"  handler call (batch of up to {args.sqs_batch}): median {results['handler_call_ms']['median']:.1f} ms, "
        f"p90 {results['handler_call_ms']['p90']:.1f} ms; cold start (import + preload) {results['cold_start_ms']:.0f} ms\n"
        f"  worker CPU {results['worker_cpu_ms_per_object']:.1f} ms/object; S3 requests/object "
        f"{results['s3_requests_per_object']}\n"
        f"  outputs {results['outputs']}, errors {results['errors']}, dead-lettered {results['dead_lettered']}, "
        f"still queued {results['still_queued']}, lost {results['lost']}, duplicates {results['duplicates']}\n"
        f"  results: {path}"
    )


if __name__ == "__main__":
    main()
