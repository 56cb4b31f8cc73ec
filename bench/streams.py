"""Stream throughput and latency on the local stack: records per second through moto's Kinesis
and the real stream handler, and the time from a record's put to its result on the output
stream.

The embedded moto server (a child process) holds both streams; in this process the local
stack's poller (``tierserve.tools.local.kinesis_stream.StreamPoller``, what Lambda's event
source mapping does) hands batches to the real handler (``functions/inference/stream.py``,
one iris row per record, the model warm), and a reader follows the results stream.

- **throughput**: ``--records`` records put at once (PutRecords of 500), timed from the first
  put to the last result read.
- **latency**: records put at ``--rate`` per second for ``--seconds``, each record's latency
  from its PutRecords' return to its result being read (the reader polls every 20 ms, the
  poller waits 50 ms when a shard is idle: both are in the figure).

Every record must have exactly one result, in its shard's order (``lost``, ``out_of_order``).

    python -m bench.streams
    python -m bench.streams --records 5000 --rate 200 --seconds 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from typing import Any

from bench.common import S3Server, say, summarize, write_results
from bench.s3_pipeline import prepare_model, worker_env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--records", type=int, default=3000, help="records for the throughput run (default 3000)"
    )
    parser.add_argument("--rate", type=float, default=100, help="records/s for the latency run (default 100)")
    parser.add_argument("--seconds", type=float, default=15, help="length of the latency run (default 15)")
    parser.add_argument("--batch-size", type=int, default=100, help="records per handler call (default 100)")
    return parser


class ResultReader:
    """Follows the results stream and notes when each record's result is read."""

    def __init__(self, kinesis: Any, stream: str) -> None:
        self.kinesis, self.seen, self.order = kinesis, {}, []
        (shard,) = kinesis.list_shards(StreamName=stream)["Shards"]
        self._iterator = kinesis.get_shard_iterator(
            StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="LATEST"
        )["ShardIterator"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> ResultReader:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            answer = self.kinesis.get_records(ShardIterator=self._iterator, Limit=10000)
            self._iterator = answer["NextShardIterator"]
            now = time.perf_counter()
            for record in answer["Records"]:
                sequence = json.loads(record["Data"])["parameters"]["sequence_number"]
                self.order.append(sequence)
                self.seen.setdefault(sequence, now)
            if not answer["Records"]:
                self._stop.wait(0.02)

    def wait_for(self, sequences: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(s not in self.seen for s in sequences) and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def put(kinesis: Any, stream: str, rows: list[bytes]) -> tuple[list[str], float]:
    answer = kinesis.put_records(
        StreamName=stream, Records=[{"Data": r, "PartitionKey": "bench"} for r in rows]
    )
    return [entry["SequenceNumber"] for entry in answer["Records"]], time.perf_counter()


def audit(reader: ResultReader, sequences: list[str]) -> dict[str, int]:
    wanted = set(sequences)
    ours = [s for s in reader.order if s in wanted]
    firsts = list(dict.fromkeys(ours))
    return {
        "lost": len(wanted - set(reader.seen)),
        "repeated": len(ours) - len(firsts),
        "out_of_order": sum(1 for a, b in itertools.pairwise(firsts) if int(a) > int(b)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from tierserve.settings import OUTPUT_STREAM_ENV, STREAM_MODEL_ENV
    from tierserve.tools.local import samples
    from tierserve.tools.local.kinesis_stream import StreamPoller, create_streams
    from tierserve.tools.local.stack import load_handler

    with S3Server("process") as server:
        import os

        os.environ.update(
            {"AWS_ENDPOINT_URL_KINESIS": server.endpoint, "AWS_ENDPOINT_URL_SQS": server.endpoint}
        )
        from tierserve import aws

        kinesis = aws.new_client("kinesis", endpoint_url=server.endpoint)
        sqs = aws.new_client("sqs", endpoint_url=server.endpoint)
        prepare_model(server.client())
        streams = create_streams(kinesis, sqs)
        handler = load_handler(
            {**worker_env(), OUTPUT_STREAM_ENV: streams.results, STREAM_MODEL_ENV: "iris"}, module="stream"
        )
        rows = [json.dumps(r).encode() for r in samples.iris_rows().astype(np.float32).tolist()]
        poller = StreamPoller(
            kinesis, sqs, streams, handler, batch_size=args.batch_size, starting_position="LATEST"
        )
        reader = ResultReader(
            aws.new_client("kinesis", endpoint_url=server.endpoint), streams.results
        ).start()
        poller.start()
        say(f"streams: {args.records} records at once, then {args.rate:g}/s for {args.seconds:g} s")
        try:
            burst = [rows[i % len(rows)] for i in range(args.records)]
            started = time.perf_counter()
            sequences: list[str] = []
            for start in range(0, len(burst), 500):
                sequences += put(kinesis, streams.records, burst[start : start + 500])[0]
            reader.wait_for(sequences, timeout_s=600)
            finished = max(reader.seen.get(s, time.perf_counter()) for s in sequences)
            throughput = {
                "records": len(sequences),
                "records_per_second": len(sequences) / (finished - started),
                **audit(reader, sequences),
            }
            latencies, paced = [], []
            interval, next_put = 1 / args.rate, time.perf_counter()
            end = next_put + args.seconds
            put_at: dict[str, float] = {}
            while next_put < end:
                time.sleep(max(0.0, next_put - time.perf_counter()))
                [sequence], at = put(kinesis, streams.records, [rows[len(paced) % len(rows)]])
                paced.append(sequence)
                put_at[sequence] = at
                next_put += interval
            reader.wait_for(paced, timeout_s=120)
            latencies = [(reader.seen[s] - put_at[s]) * 1000 for s in paced if s in reader.seen]
            latency = {
                "records": len(paced),
                "rate_per_second": args.rate,
                "latency_ms": summarize(latencies),
                **audit(reader, paced),
            }
        finally:
            poller.stop()
            reader.stop()
        return {"config": vars(args), "throughput": throughput, "latency": latency}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    results = run(args)
    command = " ".join(["python -m bench.streams", *(argv if argv is not None else sys.argv[1:])])
    path = write_results("streams", results, command=command)
    burst, paced = results["throughput"], results["latency"]
    print(
        f"throughput: {burst['records']} records in {burst['records'] / burst['records_per_second']:.1f} s: "
        f"{burst['records_per_second']:.0f} records/s (lost {burst['lost']}, repeated {burst['repeated']}, "
        f"out of order {burst['out_of_order']})\n"
        f"latency at {paced['rate_per_second']:g} records/s: p50 {paced['latency_ms']['p50']:.0f} ms, "
        f"p90 {paced['latency_ms']['p90']:.0f} ms, p99 {paced['latency_ms']['p99']:.0f} ms "
        f"(lost {paced['lost']}, out of order {paced['out_of_order']})\n"
        f"results: {path}"
    )


if __name__ == "__main__":
    main()
