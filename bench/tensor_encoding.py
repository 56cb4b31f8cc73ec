"""Binary vs JSON tensors for one 1x3x224x224 FP32 image (the convnet sample, 1000 classes).

For each encoding, every step a request takes, timed on its own with the project's
protocol code: the client encodes the request (``encode_infer_request``), the server
parses and validates it (``parse_infer_request``), the server encodes the 1x1000 response
(``encode_infer_response``), the client decodes it (``decode_infer_response``). Bytes on
the wire are the bodies as sent, and as API Gateway carries them (binary bodies travel
base64-encoded inside the Lambda proxy event).

``json-stdlib`` is the JSON encoding with the protocol's JSON pair (``loads``/``dumps``, orjson)
swapped for the standard library's (``json.loads``, ``stdlib_dumps``) in the same run: what
tierserve measured before orjson, and the ratio the report gives for JSON.

``--http`` adds the whole round trip through the local API on 127.0.0.1: real HTTP, the
API Gateway proxy event, the Lambda handler and onnxruntime.

    python -m bench tensor_encoding --iterations 200 --http
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from bench.common import WORK_DIR, S3Server, fmt_ms, plot_bars, repeat, say, summarize, write_results

BUCKET = "bench-models"
SHAPE = (1, 3, 224, 224)
ENCODINGS = ("json", "binary")
# What the steps of each encoding measure: (wire format, the protocol's JSON pair or the stdlib's).
VARIANTS = {"json": ("json", False), "json-stdlib": ("json", True), "binary": ("binary", False)}
# The steps that turn the input tensor into JSON and back: the request, 150,528 values.
REQUEST_STEPS = ("client_encode_request", "server_parse_request")


def build_convnet() -> Path:
    from tierserve.tools.local import samples

    path = WORK_DIR / "samples" / "convnet.onnx"
    if not path.exists():
        samples.convnet(path)
    return path


def encode_steps(manifest: Any, image: np.ndarray, outputs: dict[str, np.ndarray], iterations: int) -> dict:
    """Every step of every variant (``VARIANTS``), timed in this one run."""
    results: dict[str, Any] = {}
    for variant, (encoding, stdlib) in VARIANTS.items():
        with stdlib_json() if stdlib else contextlib.nullcontext():
            results[variant] = _encoding_steps(manifest, image, outputs, iterations, encoding == "binary")
    return results


@contextlib.contextmanager
def stdlib_json() -> Iterator[None]:
    """The protocol with the standard library's JSON in place of its orjson pair."""
    from tierserve import protocol

    with (
        mock.patch.object(protocol, "loads", json.loads),
        mock.patch.object(protocol, "dumps", protocol.stdlib_dumps),
    ):
        yield


def _encoding_steps(
    manifest: Any, image: np.ndarray, outputs: dict[str, np.ndarray], iterations: int, binary: bool
) -> dict[str, Any]:
    from tierserve.protocol import (
        decode_infer_response,
        encode_infer_request,
        encode_infer_response,
        parse_infer_request,
    )

    input_name = manifest.inputs[0].name

    def client_encode() -> Any:
        return encode_infer_request({input_name: image}, binary=binary, binary_outputs=binary)

    request_body = client_encode()

    def server_parse() -> Any:
        return parse_infer_request(request_body.body, request_body.headers, manifest, max_bytes=64 << 20)

    parsed = server_parse()
    np.testing.assert_array_equal(parsed.inputs[input_name], image)

    def server_encode() -> Any:
        return encode_infer_response(parsed, outputs, model_name="convnet", model_version="1")

    response_body = server_encode()

    def client_decode() -> Any:
        return decode_infer_response(response_body.body, response_body.headers)

    decoded = client_decode()
    for name, array in outputs.items():
        np.testing.assert_array_equal(decoded[name], array)
    steps = {
        "client_encode_request": summarize(repeat(client_encode, iterations, warmup=3)),
        "server_parse_request": summarize(repeat(server_parse, iterations, warmup=3)),
        "server_encode_response": summarize(repeat(server_encode, iterations, warmup=3)),
        "client_decode_response": summarize(repeat(client_decode, iterations, warmup=3)),
    }
    return {
        "request_bytes": len(request_body.body),
        "response_bytes": len(response_body.body),
        "request_bytes_via_api_gateway": _api_gateway_size(request_body.body, binary),
        "steps_ms": steps,
        "request_p50_ms": sum(steps[name]["p50"] for name in REQUEST_STEPS),
        "total_p50_ms": sum(s["p50"] for s in steps.values()),
    }


def _api_gateway_size(body: bytes, binary: bool) -> int:
    """Binary media types reach Lambda base64-encoded in the proxy event."""
    return 4 * math.ceil(len(body) / 3) if binary else len(body)


def http_round_trips(
    server: S3Server, package: Any, image: np.ndarray, iterations: int, tmp: Path
) -> dict[str, Any]:
    import http.client

    from tierserve import aws
    from tierserve.protocol import decode_infer_response, encode_infer_request
    from tierserve.settings import CACHE_DIR_ENV, MODEL_BUCKET_ENV, MODELS_ENV, PRELOAD_ENV
    from tierserve.tools.local.api_server import LocalApi
    from tierserve.tools.local.stack import load_handler
    from tierserve.tools.packaging import upload

    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    upload(package, client, BUCKET, "models")
    aws.clear_clients()
    handler = load_handler(
        {
            MODEL_BUCKET_ENV: BUCKET,
            MODELS_ENV: "convnet@1",
            PRELOAD_ENV: "convnet",
            CACHE_DIR_ENV: str(tmp / "cache"),
        }
    )
    api = LocalApi(handler, host="127.0.0.1", port=0).start()
    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    name = package.manifest.inputs[0].name
    results: dict[str, Any] = {}
    try:
        for encoding in ENCODINGS:
            binary = encoding == "binary"

            def round_trip(binary: bool = binary) -> dict[str, np.ndarray]:
                request = encode_infer_request({name: image}, binary=binary, binary_outputs=binary)
                connection.request(
                    "POST", "/v2/models/convnet/infer", body=request.body, headers=request.headers
                )
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"local API answered {response.status}: {body[:200]!r}")
                return decode_infer_response(body, dict(response.headers.items()))

            round_trip()
            results[encoding] = summarize(repeat(round_trip, iterations, warmup=3))
    finally:
        connection.close()
        api.stop()
        aws.clear_clients()
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    import onnxruntime as ort

    from tierserve.tools.packaging import package_model

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    source = build_convnet()
    with tempfile.TemporaryDirectory(prefix="tierserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        package = package_model(source, name="convnet", version="1", out_dir=tmp / "package")
        manifest = package.manifest
        image = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
        session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(names, {manifest.inputs[0].name: image}), strict=True))
        results: dict[str, Any] = {
            "input": {"shape": list(SHAPE), "datatype": "FP32", "raw_bytes": image.nbytes},
            "output": {n: list(a.shape) for n, a in outputs.items()},
            "iterations": args.iterations,
            "steps": encode_steps(manifest, image, outputs, args.iterations),
        }
        if args.http:
            say("tensor_encoding: round trips through the local API")
            feed = {manifest.inputs[0].name: image}
            results["session_run_ms"] = summarize(
                repeat(lambda: session.run(names, feed), args.http_iterations)
            )
            # The handler's EMF metric lines go to stdout, as in Lambda; keep them out of the report.
            with (
                S3Server(args.s3) as server,
                open(os.devnull, "w") as sink,
                contextlib.redirect_stdout(sink),
            ):
                results["http_round_trip_ms"] = http_round_trips(
                    server, package, image, args.http_iterations, tmp
                )
    json_p50, binary_p50 = (results["steps"][e]["total_p50_ms"] for e in ENCODINGS)
    results["binary_speedup"] = json_p50 / binary_p50
    results["json_vs_binary_request_bytes"] = (
        results["steps"]["json"]["request_bytes"] / results["steps"]["binary"]["request_bytes"]
    )
    stdlib, fast = results["steps"]["json-stdlib"], results["steps"]["json"]
    results["orjson_request_speedup"] = stdlib["request_p50_ms"] / fast["request_p50_ms"]
    results["orjson_total_speedup"] = stdlib["total_p50_ms"] / fast["total_p50_ms"]
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        f"tensor encoding, FP32 {results['input']['shape']} in ({results['input']['raw_bytes']:,} raw bytes), "
        f"{results['output']} out; {results['iterations']} iterations (p50 / p99):"
    ]
    for encoding, figures in results["steps"].items():
        lines.append(
            f"  {encoding:11s} request {figures['request_bytes']:>10,} B (via API Gateway "
            f"{figures['request_bytes_via_api_gateway']:,} B), response {figures['response_bytes']:,} B"
        )
        for step, stats in figures["steps_ms"].items():
            lines.append(f"              {step:24s} {fmt_ms(stats['p50'])} / {fmt_ms(stats['p99'])}")
        lines.append(f"              {'sum of p50s':24s} {fmt_ms(figures['total_p50_ms'])}")
    lines.append(
        f"  binary is {results['binary_speedup']:.1f}x faster to encode+decode and "
        f"{results['json_vs_binary_request_bytes']:.1f}x smaller on the wire than JSON"
    )
    lines.append(
        f"  JSON with orjson vs the standard library: the request tensor encoded + parsed "
        f"{results['orjson_request_speedup']:.1f}x faster "
        f"({fmt_ms(results['steps']['json-stdlib']['request_p50_ms'])} -> "
        f"{fmt_ms(results['steps']['json']['request_p50_ms'])}), all four steps "
        f"{results['orjson_total_speedup']:.1f}x"
    )
    if "session_run_ms" in results:
        lines.append(f"  (the convnet's session.run alone: p50 {fmt_ms(results['session_run_ms']['p50'])})")
    for encoding, stats in results.get("http_round_trip_ms", {}).items():
        lines.append(
            f"  HTTP round trip via the local API, {encoding:6s}: p50 {fmt_ms(stats['p50'])}  p99 {fmt_ms(stats['p99'])}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=int, default=100, help="timed runs of each step (default 100)")
    parser.add_argument("--http", action="store_true", help="also time round trips through the local API")
    parser.add_argument(
        "--http-iterations", type=int, default=50, help="round trips per encoding (default 50)"
    )
    parser.add_argument("--s3", choices=("process", "thread"), default="process")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench tensor_encoding", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    print(report(results), flush=True)
    path = write_results("tensor_encoding", results)
    plot_bars(
        "tensor_encoding",
        "1x3x224x224 FP32: encode + parse + encode + decode (sum of p50 ms)",
        {v: results["steps"][v]["total_p50_ms"] for v in VARIANTS},
    )
    say(f"tensor_encoding: results in {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
