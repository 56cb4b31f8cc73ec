"""Binary vs JSON tensors for one 1x3x224x224 FP32 image (the convnet sample, 1000 classes).

For each encoding, every step a request takes, timed on its own with the project's
protocol code: the client encodes the request (``encode_infer_request``), the server
parses and validates it (``parse_infer_request``), the server encodes the 1x1000 response
(``encode_infer_response``), the client decodes it (``decode_infer_response``). Bytes on
the wire are the bodies as sent, and as API Gateway carries them (binary bodies travel
base64-encoded inside the Lambda proxy event).

``--http`` adds the whole round trip through the local API on 127.0.0.1: real HTTP, the
API Gateway proxy event, the Lambda handler and onnxruntime.

    python -m bench tensor_encoding --iterations 200 --http
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import WORK_DIR, S3Server, fmt_ms, plot_bars, repeat, say, summarize, write_results

BUCKET = "bench-models"
SHAPE = (1, 3, 224, 224)
ENCODINGS = ("json", "binary")


def build_convnet() -> Path:
    from tierserve.tools.local import samples

    path = WORK_DIR / "samples" / "convnet.onnx"
    if not path.exists():
        samples.convnet(path)
    return path


def encode_steps(manifest: Any, image: np.ndarray, outputs: dict[str, np.ndarray], iterations: int) -> dict:
    from tierserve.protocol import (
        decode_infer_response,
        encode_infer_request,
        encode_infer_response,
        parse_infer_request,
    )

    input_name = manifest.inputs[0].name
    results: dict[str, Any] = {}
    for encoding in ENCODINGS:
        binary = encoding == "binary"

        def client_encode(binary: bool = binary) -> Any:
            return encode_infer_request({input_name: image}, binary=binary, binary_outputs=binary)

        request_body = client_encode()

        def server_parse(body: Any = request_body) -> Any:
            return parse_infer_request(body.body, body.headers, manifest, max_bytes=64 << 20)

        parsed = server_parse()
        np.testing.assert_array_equal(parsed.inputs[input_name], image)

        def server_encode(request: Any = parsed) -> Any:
            return encode_infer_response(request, outputs, model_name="convnet", model_version="1")

        response_body = server_encode()

        def client_decode(response: Any = response_body) -> Any:
            return decode_infer_response(response.body, response.headers)

        decoded = client_decode()
        for name, array in outputs.items():
            np.testing.assert_allclose(decoded[name], array, rtol=1e-6)
        steps = {
            "client_encode_request": summarize(repeat(client_encode, iterations, warmup=3)),
            "server_parse_request": summarize(repeat(server_parse, iterations, warmup=3)),
            "server_encode_response": summarize(repeat(server_encode, iterations, warmup=3)),
            "client_decode_response": summarize(repeat(client_decode, iterations, warmup=3)),
        }
        results[encoding] = {
            "request_bytes": len(request_body.body),
            "response_bytes": len(response_body.body),
            "request_bytes_via_api_gateway": _api_gateway_size(request_body.body, binary),
            "steps_ms": steps,
            "total_p50_ms": sum(s["p50"] for s in steps.values()),
        }
    return results


def _api_gateway_size(body: bytes, binary: bool) -> int:
    """Binary media types reach Lambda base64-encoded in the proxy event."""
    return 4 * math.ceil(len(body) / 3) if binary else len(body)


def http_round_trips(
    server: S3Server, package: Any, image: np.ndarray, iterations: int, tmp: Path
) -> dict[str, Any]:
    import http.client

    from tierserve import store
    from tierserve.protocol import decode_infer_response, encode_infer_request
    from tierserve.settings import CACHE_DIR_ENV, MODEL_BUCKET_ENV, MODELS_ENV, PRELOAD_ENV
    from tierserve.tools.local.api_server import LocalApi
    from tierserve.tools.local.stack import load_handler
    from tierserve.tools.packaging import upload

    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    upload(package, client, BUCKET, "models")
    store.clear_clients()
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
        store.clear_clients()
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
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        f"tensor encoding, FP32 {results['input']['shape']} in ({results['input']['raw_bytes']:,} raw bytes), "
        f"{results['output']} out; {results['iterations']} iterations (p50 / p99):"
    ]
    for encoding, figures in results["steps"].items():
        lines.append(
            f"  {encoding:6s} request {figures['request_bytes']:>10,} B (via API Gateway "
            f"{figures['request_bytes_via_api_gateway']:,} B), response {figures['response_bytes']:,} B"
        )
        for step, stats in figures["steps_ms"].items():
            lines.append(f"         {step:24s} {fmt_ms(stats['p50'])} / {fmt_ms(stats['p99'])}")
        lines.append(f"         {'sum of p50s':24s} {fmt_ms(figures['total_p50_ms'])}")
    lines.append(
        f"  binary is {results['binary_speedup']:.1f}x faster to encode+decode and "
        f"{results['json_vs_binary_request_bytes']:.1f}x smaller on the wire than JSON"
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
        {e: results["steps"][e]["total_p50_ms"] for e in ENCODINGS},
    )
    say(f"tensor_encoding: results in {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
