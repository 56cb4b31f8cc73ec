"""Warm handler overhead: the real Lambda API handler against a bare ``session.run``.

The handler is ``functions/inference/api.py``, imported as Lambda's init would (the way
``tests/support/common.make_invoke`` does), with the iris classifier from the embedded S3
already loaded. Each iteration hands it an API Gateway REST proxy event (the shared
``events/infer-json.json`` and ``events/infer-binary.json``) and gets the proxy response
back; the baseline runs the same session on the same decoded input. Overhead is
p50(handler) - p50(session.run). Blocks of the two alternate so drift hits both alike.

Two settings: ``deployed`` (what the CDK stack sets: INFO logs, metrics on, their EMF line
written to stdout, here /dev/null) and ``quiet`` (metrics off, WARNING).

    python -m bench warm_overhead --iterations 5000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    WORK_DIR,
    S3Server,
    fmt_ms,
    plot_bars,
    repeat,
    say,
    summarize,
    write_results,
)

BUCKET = "bench-models"
TARGET_OVERHEAD_MS = 1.0
EVENTS = ("infer-json", "infer-binary")
SETTINGS = {
    "deployed": {"POWERTOOLS_METRICS_DISABLED": "false", "POWERTOOLS_LOG_LEVEL": "INFO"},
    "quiet": {"POWERTOOLS_METRICS_DISABLED": "true", "POWERTOOLS_LOG_LEVEL": "WARNING"},
}


def load_event(name: str) -> dict[str, Any]:
    return json.loads((REPO_ROOT / "events" / f"{name}.json").read_text())


def baseline_for(event: dict[str, Any], model: Any) -> tuple[Any, list[str] | None, dict[str, Any]]:
    """The session, output names and feed that the handler ends up running for ``event``."""
    from tierserve.protocol import parse_infer_request

    body = event["body"].encode()
    if event.get("isBase64Encoded"):
        import base64

        body = base64.b64decode(body)
    request = parse_infer_request(body, event["headers"], model.manifest, max_bytes=6 << 20)
    return model.session, request.output_names(), request.inputs


def run(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from tierserve import aws, telemetry
    from tierserve.settings import CACHE_DIR_ENV, MODEL_BUCKET_ENV, MODELS_ENV, PRELOAD_ENV
    from tierserve.tools.local import samples
    from tierserve.tools.local.apigw import LocalLambdaContext
    from tierserve.tools.local.stack import load_handler
    from tierserve.tools.packaging import package_model, upload

    source = WORK_DIR / "samples" / "iris.onnx"
    if not source.exists():
        samples.iris_classifier(source)
    results: dict[str, Any] = {"iterations": args.iterations, "blocks": args.blocks, "settings": {}}
    with S3Server(args.s3) as server, tempfile.TemporaryDirectory(prefix="tierserve-bench-") as tmp:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        packaged = package_model(source, name="iris", version="1", out_dir=Path(tmp) / "package")
        upload(packaged, client, BUCKET, "models")
        aws.clear_clients()
        for setting in args.settings:
            os.environ.update(SETTINGS[setting])  # metrics: read at each flush
            telemetry.logger.setLevel("WARNING")  # keep the init's "model loaded" line out of the report
            handler = load_handler(
                {
                    MODEL_BUCKET_ENV: BUCKET,
                    MODELS_ENV: "iris@1",
                    PRELOAD_ENV: "iris",
                    CACHE_DIR_ENV: str(Path(tmp) / f"cache-{setting}"),
                }
            )
            telemetry.logger.setLevel(SETTINGS[setting]["POWERTOOLS_LOG_LEVEL"])  # read at import otherwise
            api = sys.modules["api"]
            model = api.registry.get(api.registry.resolve("iris"))
            context = LocalLambdaContext()
            per_event = {}
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                for name in EVENTS:
                    event = load_event(name)
                    response = handler(event, context)
                    assert response["statusCode"] == 200, response
                    session, outputs, feed = baseline_for(event, model)
                    samples_handler: list[float] = []
                    samples_run: list[float] = []
                    per_block = max(1, args.iterations // args.blocks)
                    for _ in range(args.blocks):
                        samples_handler += repeat(
                            lambda h=handler, e=event, c=context: h(e, c), per_block, warmup=20
                        )
                        samples_run += repeat(
                            lambda s=session, o=outputs, f=feed: s.run(o, f), per_block, warmup=20
                        )
                    handler_stats, run_stats = summarize(samples_handler), summarize(samples_run)
                    per_event[name] = {
                        "handler_ms": handler_stats,
                        "session_run_ms": run_stats,
                        "overhead_p50_ms": handler_stats["p50"] - run_stats["p50"],
                        "overhead_p99_ms": handler_stats["p99"] - run_stats["p99"],
                        "request_bytes": len(event["body"] or ""),
                    }
            results["settings"][setting] = per_event
            say(f"warm_overhead: {setting} done")
    aws.clear_clients()
    overheads = [e["overhead_p50_ms"] for s in results["settings"].values() for e in s.values()]
    results["target_overhead_p50_ms"] = TARGET_OVERHEAD_MS
    results["met"] = max(overheads) <= TARGET_OVERHEAD_MS
    return results


def report(results: dict[str, Any]) -> str:
    lines = [f"warm handler overhead, iris, {results['iterations']} iterations per figure (p50 / p99):"]
    for setting, events in results["settings"].items():
        for name, figures in events.items():
            handler, bare = figures["handler_ms"], figures["session_run_ms"]
            lines.append(
                f"  {setting:8s} {name:13s} handler {fmt_ms(handler['p50'])} / {fmt_ms(handler['p99'])}   "
                f"session.run {fmt_ms(bare['p50'])} / {fmt_ms(bare['p99'])}   "
                f"overhead p50 {figures['overhead_p50_ms']:.3f} ms"
            )
    lines.append(
        f"  target: overhead p50 <= {TARGET_OVERHEAD_MS} ms -> {'met' if results['met'] else 'NOT met'}"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=int, default=5000, help="timed calls per figure (default 5000)")
    parser.add_argument("--blocks", type=int, default=10, help="alternating blocks (default 10)")
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--s3", choices=("process", "thread"), default="process")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench warm_overhead", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    print(report(results), flush=True)
    path = write_results("warm_overhead", results)
    bars = {
        f"{setting} {name} overhead p50": figures["overhead_p50_ms"]
        for setting, events in results["settings"].items()
        for name, figures in events.items()
    }
    plot_bars("warm_overhead", "handler overhead over session.run (p50 ms)", bars)
    say(f"warm_overhead: results in {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
