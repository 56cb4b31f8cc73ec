"""Bulk inference throughput: objects per second of a ``tierserve batch --local`` run, against
the S3 worker's handler throughput in the same run (the orchestration's overhead).

On the embedded S3 (moto's server in a child process), rounds take turns: a wave of one-row
iris ``.json`` inputs drained by the real worker handler through S3 -> SQS (timed inside the
handler, as ``bench.s3_pipeline`` times it), then as many inputs under a fresh prefix of a
bucket without the notification served by :func:`tierserve.batch.run_locally` with the settings the command uses (``cdk.json``'s
``batch_*`` context, at most ``LOCAL_MAX_CONCURRENCY`` batches at once), timed from the first
listing to the summary written. A second run over each prefix times a rerun, where every
result is current. Both serve the same warm model with the same S3 client policy.

After each round its objects are listed, every input must have exactly one result (``lost``,
target 0; ``duplicates``, target 0), and removed (moto lists a bucket's every key per
ListObjectsV2; see ``bench.s3_pipeline``).

    python -m bench.batch                      # 5 rounds of 200 inputs each way
    python -m bench.batch --rounds 3 --inputs 500
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import S3Server, say, summarize, write_results
from bench.s3_pipeline import NAME, Lane, Stack, encode, lane_figures, worker_env

BATCH_BUCKET = "bench-batch-data"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds, each a worker wave and a batch run (default 5)"
    )
    parser.add_argument("--inputs", type=int, default=200, help="inputs per round and way (default 200)")
    parser.add_argument(
        "--sqs-batch", type=int, default=10, help="messages per worker handler call (default 10)"
    )
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    return parser


def local_run_settings() -> Any:
    """What ``tierserve batch --local`` runs with."""
    from tierserve.batch import MapSettings
    from tierserve.tools.batch import LOCAL_MAX_CONCURRENCY, map_settings
    from tierserve.tools.cdk_context import InfraConfig
    from tierserve.tools.local.stack import CDK_JSON

    config = map_settings(InfraConfig.from_cdk_json(CDK_JSON))
    return MapSettings(
        items_per_batch=config.items_per_batch,
        max_concurrency=min(config.max_concurrency, LOCAL_MAX_CONCURRENCY),
        tolerated_failure_percentage=config.tolerated_failure_percentage,
        function_timeout_s=config.function_timeout_s,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from tierserve.batch import BatchSource, run_locally
    from tierserve.registry import ModelRegistry
    from tierserve.s3_pipeline import Pipeline, PipelineSettings
    from tierserve.settings import DATA_BUCKET_ENV, Settings
    from tierserve.tools.local import samples

    with S3Server("process") as server:
        stack = Stack(server, args.sqs_batch)
        # The batch's inputs get a bucket of their own, without the worker's notification.
        stack.s3.create_bucket(Bucket=BATCH_BUCKET)
        env = {**worker_env(), DATA_BUCKET_ENV: BATCH_BUCKET}
        pipeline = Pipeline(ModelRegistry(Settings.from_env(env)), PipelineSettings.from_env(env))
        pipeline.registry.preload()
        settings = local_run_settings()
        worker = Lane("worker", stack.worker)
        batch_lane = Lane("batch", stack.worker)  # its audit only: the batch runs without SQS
        rows = np.resize(samples.iris_rows(), (args.inputs, 4)).astype(np.float32)
        bodies = [encode("json", rows[i : i + 1]) for i in range(args.inputs)]
        first_s, rerun_s, outcomes = [], [], []
        say(
            f"batch: {args.rounds} rounds of {args.inputs} .json inputs: a worker wave, then a local map run of "
            f"{settings.items_per_batch} items per batch, at most {settings.max_concurrency} batches at once"
        )
        deadline = time.monotonic() + args.timeout
        with ThreadPoolExecutor(8) as pool:
            for round_number in range(args.rounds):
                keys = [
                    f"inputs/{NAME}/bench/worker/{round_number:03d}/{i:06d}.json" for i in range(args.inputs)
                ]
                stack.wave(worker, list(zip(keys, bodies, strict=True)), pool, deadline)
                stack.settle(worker, f"{NAME}/bench/worker/{round_number:03d}/", args.inputs, keep=False)
                prefix = f"inputs/{NAME}/bench/batch/{round_number:03d}/"
                keys = [f"{prefix}{i:06d}.json" for i in range(args.inputs)]
                items = list(zip(keys, bodies, strict=True))
                list(
                    pool.map(
                        lambda kv: stack.s3.put_object(Bucket=BATCH_BUCKET, Key=kv[0], Body=kv[1]), items
                    )
                )
                source = BatchSource(BATCH_BUCKET, NAME, "prefix", prefix)
                for times in (first_s, rerun_s):
                    started = time.perf_counter()
                    result = run_locally(pipeline, stack.s3, source, settings)
                    times.append(time.perf_counter() - started)
                    outcomes.append(result.outcomes)
                    if result.status != "SUCCEEDED":
                        raise RuntimeError(f"the local map run failed: {result.error}: {result.cause}")
                stack.settle(
                    batch_lane, prefix.removeprefix("inputs/"), args.inputs, keep=False, bucket=BATCH_BUCKET
                )
        objects = args.rounds * args.inputs
        batch = {
            "objects": objects,
            "objects_per_second": objects / sum(first_s),
            "rerun_objects_per_second": objects / sum(rerun_s),
            "run_seconds": summarize([s * 1000 for s in first_s]),
            "rerun_seconds": summarize([s * 1000 for s in rerun_s]),
            "outputs": sum(o.get("outputs", 0) for o in outcomes[0::2]),
            "rerun_skipped": sum(o.get("skipped", 0) for o in outcomes[1::2]),
            **batch_lane.audit,
        }
        results: dict[str, Any] = {
            "config": vars(args),
            "settings": vars(settings),
            "worker": {**lane_figures(worker), **worker.audit},
            "batch": batch,
        }
        results["batch_to_worker_handler"] = (
            batch["objects_per_second"] / results["worker"]["handler_objects_per_second"]
        )
        return results


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    results = run(args)
    command = " ".join(["python -m bench.batch", *(argv if argv is not None else sys.argv[1:])])
    path = write_results("batch", results, command=command)
    worker, batch = results["worker"], results["batch"]
    print(
        f"worker handler: {worker['handler_objects_per_second']:.1f} objects/s "
        f"({worker['objects_per_second']:.1f} end to end through SQS); lost {worker['lost']}, duplicates {worker['duplicates']}\n"
        f"tierserve batch --local: {batch['objects_per_second']:.1f} objects/s "
        f"({batch['objects']} objects, {results['settings']['items_per_batch']} per batch); "
        f"rerun (all current) {batch['rerun_objects_per_second']:.1f} objects/s; "
        f"lost {batch['lost']}, duplicates {batch['duplicates']}\n"
        f"batch / worker handler: {results['batch_to_worker_handler']:.2f}x\n"
        f"results: {path}"
    )


if __name__ == "__main__":
    main()
