"""S3-triggered inference throughput: objects per second for one worker, the same for a
minimal GET-run-PUT worker in the same run, and how many inputs got lost.

N small inputs (one iris row each, ``.json`` by default) are put under ``inputs/iris/`` of
the embedded S3 (moto's server, in a child process, as S3 is never inside the Lambda); its
S3 -> SQS notifications fill the queue; one poller hands SQS batches to a worker handler the
way Lambda's event source mapping does (one worker = Lambda concurrency 1), deleting what it
did not report as failed. The model is already warm (the cold start is reported apart).

Two handlers take turns, wave by wave, on the same S3, queue and model (ratios within one
run: the machine is shared and noisy):

- ``worker``: the real worker handler (``functions/inference/worker.py``) with every
  guarantee: exactly one current result per input version, duplicates and stale events
  harmless, nothing under ``inputs/``.
- ``minimal``: the least a worker can do: GetObject, run, PutObject, nothing else (no
  idempotency, no ordering, no error files; ``.json`` inputs only), on the same thread pool
  size, S3 client policy and warm model.

Inputs arrive in waves (``--wave``, default 20), each drained before the next: moto's
ReceiveMessage costs grow with the queue's depth (about 45 ms at 10 messages, 150 ms at 100,
2.7 s at 1,000 on the development machine: it rescans every message per message returned),
while SQS's do not; small waves keep the figure about our code (waves of 100 cost the end to
end figure about a fifth). The time is the sum of the drains; the puts are timed apart. ``handler_objects_per_second`` is
the time inside the handler alone (what one Lambda environment sustains if receiving from
SQS cost nothing); ``objects_per_second`` is end to end on the local stack (receive, handle,
delete).

After each wave its objects are listed: every input must have exactly one result (output or
error) or a message in the DLQ; ``lost`` counts those that have neither (target 0),
``duplicates`` the results without an input or beyond one per input. Then the wave's objects
are removed (``--keep-objects`` keeps them): moto's ListObjectsV2 scans every key of the
bucket (about 3 ms with none, 10 ms with 6,000), where S3's costs one request whatever the
bucket holds, and the worker lists one page of results per batch.

    python -m bench.s3_pipeline                      # 1,000 .json inputs per handler, SQS batches of 10
    python -m bench.s3_pipeline --inputs 200 --format jsonl --rows 100   # the worker alone
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from bench.common import WORK_DIR, S3Server, say, summarize, write_results

MODEL_BUCKET = "bench-models"
DATA_BUCKET = "bench-data"
NAME, VERSION = "iris", "1"
VISIBILITY_TIMEOUT_S = 60
Handler = Callable[[dict[str, Any], Any], dict[str, Any]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.s3_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1000, help="objects per handler (default 1000)")
    parser.add_argument("--format", choices=("json", "npy", "jsonl"), default="json", help="input format")
    parser.add_argument("--rows", type=int, default=1, help="rows per input (default 1)")
    parser.add_argument(
        "--wave", type=int, default=20, help="inputs put before each drain (default 20; see the docstring)"
    )
    parser.add_argument("--sqs-batch", type=int, default=10, help="messages per handler call (default 10)")
    parser.add_argument(
        "--no-baseline", action="store_true", help="the worker alone (always so for other formats than json)"
    )
    parser.add_argument(
        "--keep-objects",
        action="store_true",
        help="keep every wave's objects (by default each wave is audited, then removed: see Stack.settle)",
    )
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


def worker_env() -> dict[str, str]:
    from tierserve.settings import CACHE_DIR_ENV, MODEL_BUCKET_ENV, MODELS_ENV, PRELOAD_ENV

    return {
        MODEL_BUCKET_ENV: MODEL_BUCKET,
        MODELS_ENV: f"{NAME}@{VERSION}",
        PRELOAD_ENV: "*",  # the cold start is measured apart, below
        CACHE_DIR_ENV: str(WORK_DIR / "pipeline" / "cache"),
    }


def load_worker() -> Handler:
    from tierserve.tools.local.stack import load_handler

    return load_handler(worker_env(), module="worker")


def minimal_worker(concurrency: int) -> Handler:
    """GetObject, run, PutObject for each S3 record of an SQS batch, on ``concurrency`` threads
    and the worker's warm model and S3 client policy: the floor for the worker's own work."""
    import numpy as np

    from tierserve import aws
    from tierserve.settings import ModelRef

    model = sys.modules["worker"].pipeline.registry.get(ModelRef(NAME, VERSION))
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="minimal-worker")

    def serve(body: str) -> None:
        for record in json.loads(body).get("Records", []):  # the s3:TestEvent has none
            bucket, key = record["s3"]["bucket"]["name"], unquote_plus(record["s3"]["object"]["key"])
            s3 = aws.client("s3")
            request = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            tensor = request["inputs"][0]
            array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
            outputs = model.predict({tensor["name"]: array}, None)
            document = {
                "model_name": NAME,
                "outputs": [
                    {"name": name, "shape": list(value.shape), "data": value.ravel().tolist()}
                    for name, value in outputs.items()
                ],
            }
            result_key = f"outputs/{key.removeprefix('inputs/')}.json"
            s3.put_object(Bucket=bucket, Key=result_key, Body=json.dumps(document).encode())

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        list(pool.map(serve, [record["body"] for record in event["Records"]]))
        return {"batchItemFailures": []}

    return handler


def depth(sqs: Any, url: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return sum(int(v) for v in attributes.values())


def list_keys(s3: Any, prefix: str, bucket: str = DATA_BUCKET) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@dataclass
class Lane:
    """One handler's share of the run: its calls, drains and S3 requests."""

    name: str
    handler: Handler
    calls_ms: list[float] = field(default_factory=list)
    drain_s: float = 0.0
    put_s: float = 0.0
    cpu_s: float = 0.0
    received: int = 0
    failed: int = 0
    objects: int = 0
    s3_calls: dict[str, int] = field(default_factory=dict)
    audit: dict[str, int] = field(default_factory=dict)  # summed over the waves

    def timed(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            return self.handler(event, context)
        finally:
            self.calls_ms.append((time.perf_counter() - start) * 1000)


class Stack:
    """The embedded S3 with the data bucket, queue and notification, and the warm worker."""

    def __init__(self, server: S3Server, sqs_batch: int) -> None:
        import boto3

        from tierserve import aws
        from tierserve.tools.local.s3_queue import QueuePoller, create_resources

        os.environ["AWS_ENDPOINT_URL_SQS"] = server.endpoint
        self.s3 = server.client()
        self.sqs = boto3.client("sqs", endpoint_url=server.endpoint)
        prepare_model(self.s3)
        self.queues = create_resources(
            self.s3,
            self.sqs,
            bucket=DATA_BUCKET,
            max_receive_count=3,
            visibility_timeout_s=VISIBILITY_TIMEOUT_S,
        )
        started = time.perf_counter()
        self.worker = load_worker()
        self.cold_start_ms = (time.perf_counter() - started) * 1000
        self._poller = QueuePoller(self.sqs, self.queues, self.worker, batch_size=sqs_batch, wait_s=0)
        while self._poller.poll_once().received:  # the s3:TestEvent
            pass
        self._lane: Lane | None = None
        aws.s3_client().meta.events.register("before-call.s3", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        if self._lane is not None:
            self._lane.s3_calls[model.name] = self._lane.s3_calls.get(model.name, 0) + 1

    def wave(
        self, lane: Lane, items: list[tuple[str, bytes]], pool: ThreadPoolExecutor, deadline: float
    ) -> None:
        """Put ``items``, then drain the queue through ``lane``'s handler."""
        put_started = time.perf_counter()
        list(pool.map(lambda kv: self.s3.put_object(Bucket=DATA_BUCKET, Key=kv[0], Body=kv[1]), items))
        lane.put_s += time.perf_counter() - put_started
        self._poller.handler = lane.timed
        self._lane = lane
        drain_started, cpu_started = time.perf_counter(), time.process_time()
        try:
            while time.monotonic() < deadline:
                result = self._poller.poll_once()
                lane.received += result.received
                lane.failed += result.failed
                if not result.received and depth(self.sqs, self.queues.url) == 0:
                    break
        finally:
            self._lane = None
        lane.drain_s += time.perf_counter() - drain_started
        lane.cpu_s += time.process_time() - cpu_started
        lane.objects += len(items)

    def settle(
        self, lane: Lane, prefix: str, expected: int, *, keep: bool, bucket: str = DATA_BUCKET
    ) -> None:
        """Audit the wave under ``inputs/{prefix}`` into ``lane``, then (unless ``keep``) remove its
        objects: moto's ListObjectsV2 scans every key of the bucket (about 3 ms with none, 10 ms
        with 6,000), where S3's costs one request whatever the bucket holds."""
        for name, value in self.audit(prefix, expected, bucket).items():
            lane.audit[name] = lane.audit.get(name, 0) + value
        if keep:
            return
        found = [
            k
            for kind in ("inputs", "outputs", "errors")
            for k in list_keys(self.s3, f"{kind}/{prefix}", bucket)
        ]
        for start in range(0, len(found), 1000):
            objects = [{"Key": k} for k in found[start : start + 1000]]
            self.s3.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})

    def audit(self, prefix: str, expected: int, bucket: str = DATA_BUCKET) -> dict[str, int]:
        """Every input under ``inputs/{prefix}`` answered once (or dead-lettered)?"""
        inputs = set(list_keys(self.s3, f"inputs/{prefix}", bucket))
        outputs = list_keys(self.s3, f"outputs/{prefix}", bucket)
        errors = list_keys(self.s3, f"errors/{prefix}", bucket)
        answered = [f"inputs/{k.split('/', 1)[1].removesuffix('.json')}" for k in outputs + errors]
        dead = depth(self.sqs, self.queues.dlq_url)
        return {
            "outputs": len(outputs),
            "errors": len(errors),
            "dead_lettered": dead,
            "still_queued": depth(self.sqs, self.queues.url),
            "lost": len(inputs - set(answered)) - dead,
            "duplicates": len(answered) - len(set(answered)) + len(set(answered) - inputs),
            "inputs_missing_or_extra": len(inputs) - expected,
        }


def lane_figures(lane: Lane) -> dict[str, Any]:
    seconds = lane.drain_s
    return {
        "objects": lane.objects,
        "objects_per_second": lane.objects / seconds if seconds else float("nan"),
        "handler_objects_per_second": lane.objects / (sum(lane.calls_ms) / 1000)
        if lane.calls_ms
        else float("nan"),
        "drain_seconds": seconds,
        "put_seconds": lane.put_s,
        # This process only (worker + poller + their boto3 clients); moto runs in a child.
        "cpu_ms_per_object": lane.cpu_s * 1000 / lane.objects if lane.objects else float("nan"),
        "s3_requests_per_object": {
            name: round(count / lane.objects, 2) for name, count in sorted(lane.s3_calls.items())
        },
        "handler_call_ms": summarize(lane.calls_ms) if lane.calls_ms else {},
        "messages_received": lane.received,
        "messages_failed": lane.failed,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from tierserve.tools.local import samples

    baseline = args.format == "json" and not args.no_baseline
    with S3Server(args.mode) as server:
        stack = Stack(server, args.sqs_batch)
        concurrency = sys.modules["worker"].pipeline.settings.concurrency
        lanes = [Lane("worker", stack.worker)]
        if baseline:
            lanes.append(Lane("minimal", minimal_worker(concurrency)))
        rows = np.resize(samples.iris_rows(), (args.inputs * args.rows, 4)).astype(np.float32)
        bodies = [encode(args.format, rows[i * args.rows : (i + 1) * args.rows]) for i in range(args.inputs)]
        say(
            f"pipeline: {args.inputs} .{args.format} inputs ({args.rows} row(s) each) per handler "
            f"({', '.join(lane.name for lane in lanes)}), in waves of {args.wave} taking turns, "
            "each drained by one worker"
        )
        deadline = time.monotonic() + args.timeout
        with ThreadPoolExecutor(8) as pool:
            for start in range(0, args.inputs, args.wave):
                for lane in lanes:
                    prefix = f"{NAME}/bench/{lane.name}/{start:06d}/"
                    keys = [
                        f"inputs/{prefix}{i:06d}.{args.format}"
                        for i in range(start, min(start + args.wave, args.inputs))
                    ]
                    items = list(zip(keys, bodies[start : start + len(keys)], strict=True))
                    stack.wave(lane, items, pool, deadline)
                    stack.settle(lane, prefix, len(keys), keep=args.keep_objects)
        results: dict[str, Any] = {"config": vars(args), "cold_start_ms": stack.cold_start_ms}
        for lane in lanes:
            results[lane.name] = {**lane_figures(lane), **lane.audit}
        if baseline:
            results["handler_ratio_worker_to_minimal"] = (
                results["worker"]["handler_objects_per_second"]
                / results["minimal"]["handler_objects_per_second"]
            )
        return results


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    results = run(args)
    command = " ".join(["python -m bench.s3_pipeline", *(argv if argv is not None else sys.argv[1:])])
    name = (
        "pipeline" if (args.format, args.rows) == ("json", 1) else f"pipeline-{args.format}-{args.rows}rows"
    )
    path = write_results(name, results, command=command)
    lines = []
    for lane in ("worker", "minimal"):
        if lane not in results:
            continue
        figures = results[lane]
        lines += [
            f"{lane}: {figures['objects']} .{args.format} objects through S3 -> SQS -> one worker: "
            f"{figures['objects_per_second']:.1f} objects/s end to end, drained in {figures['drain_seconds']:.1f} s",
            f"  inside the handler alone: {figures['handler_objects_per_second']:.1f} objects/s; handler call "
            f"(batch of up to {args.sqs_batch}): median {figures['handler_call_ms']['median']:.1f} ms, "
            f"p90 {figures['handler_call_ms']['p90']:.1f} ms",
            f"  CPU {figures['cpu_ms_per_object']:.1f} ms/object; S3 requests/object {figures['s3_requests_per_object']}",
            f"  outputs {figures['outputs']}, errors {figures['errors']}, dead-lettered {figures['dead_lettered']}, "
            f"still queued {figures['still_queued']}, lost {figures['lost']}, duplicates {figures['duplicates']}",
        ]
    if "handler_ratio_worker_to_minimal" in results:
        lines.append(
            f"worker / minimal, inside the handler: {results['handler_ratio_worker_to_minimal']:.2f}x (target 0.9x)"
        )
    lines.append(f"cold start (import + preload) {results['cold_start_ms']:.0f} ms; results: {path}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
