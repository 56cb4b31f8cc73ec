"""The GPU tier's SageMaker container: HTTP on port 8080 (``SAGEMAKER_BIND_TO_PORT``).

A thin adapter: uvicorn (:mod:`tierserve.asgi`) hands each request to
:meth:`tierserve.sagemaker_hosting.ModelHost.respond` (``/ping``, ``/invocations`` and every
OIP route, from one route table) on a thread pool, so concurrent requests reach the dynamic
batcher together. What this file adds is the process:

- the listen socket, bound before the models load (``/ping`` says 503 meanwhile);
- graceful shutdown on SIGTERM (what ``docker stop`` and SageMaker send) or SIGINT: stop
  accepting, close idle keep-alive connections, let in-flight requests finish (up to
  ``TIERSERVE_DRAIN_TIMEOUT_S``), close the batchers, then exit 0.

Run it as SageMaker does, ``serve`` (the executable next to this file), or
``python functions/gpu_server/serve --port 8081`` locally.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

from tierserve.asgi import OipServer, ServerLimits, bind, build_server, serve_until_stopped
from tierserve.sagemaker_hosting import ModelHost, ServerSettings, build_host
from tierserve.telemetry import buffer_metrics, logger

IDLE_TIMEOUT_S = 120.0  # a keep-alive connection with no request for this long is closed
EXIT_CONFIG = 2


def server_limits(host: ModelHost) -> ServerLimits:
    """The HTTP limits for ``host``: bodies up to ``TIERSERVE_MAX_REQUEST_MB`` (a larger one is
    refused before it is read), and enough request threads for a full batch in flight and a
    full queue behind it, so the batcher's queue limit (503) is what refuses, not the pool."""
    batching = host.server.batching
    return ServerLimits(
        max_body_bytes=host.registry.settings.max_request_bytes,
        idle_timeout_s=IDLE_TIMEOUT_S,
        threads=max(batching.max_queue_size + batching.max_batch_size, 32),
    )


def make_server(host: ModelHost, limits: ServerLimits | None = None) -> OipServer:
    """The GPU server's HTTP server over ``host`` (not yet serving)."""
    return build_server(
        host.respond,
        name="tierserve-gpu",
        limits=limits or server_limits(host),
        drain_timeout_s=host.server.drain_timeout_s,
    )


def serve(host: ModelHost, sock: socket.socket) -> int:
    """Serve on ``sock``, loading the models in the background, until SIGTERM or SIGINT;
    drain, close the host, and return the exit status (0)."""
    server = make_server(host)
    buffer_metrics()  # a long-running process: metrics leave the request path (tierserve.telemetry)
    host.start()
    address = "{}:{}".format(*sock.getsockname()[:2])
    logger.info("GPU server listening", extra={"address": address})
    try:
        drained = serve_until_stopped(server, sock)
    finally:
        host.close()
    logger.info("GPU server stopped", extra={"drained": drained})
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="serve",
        description="tierserve GPU server: the SageMaker hosting contract (/ping, /invocations) and the "
        "Open Inference Protocol over one model. Configured by environment variables (docs/gpu-tier.md).",
    )
    every_interface = "0.0.0.0"  # noqa: S104 - SageMaker reaches the container from outside
    parser.add_argument("--host", default=every_interface, help="interface to bind (default all)")
    parser.add_argument("--port", type=int, default=None, help="default $SAGEMAKER_BIND_TO_PORT or 8080")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        host = build_host()
    except Exception as error:  # a configuration that can never serve: say so and exit
        message = getattr(error, "message", None) or str(error)
        logger.error("GPU server cannot start", extra={"error": message})
        print(f"serve: {message}", file=sys.stderr)
        return EXIT_CONFIG
    port = args.port if args.port is not None else host.server.port
    try:
        sock = bind(args.host, port)
    except OSError as error:
        logger.error("GPU server cannot listen", extra={"host": args.host, "port": port, "error": str(error)})
        print(f"serve: cannot listen on {args.host}:{port} ({error.strerror}): pick --port", file=sys.stderr)
        return EXIT_CONFIG
    return serve(host, sock)


__all__ = ["ServerSettings", "main", "make_server", "serve", "server_limits"]
