"""The ``tierserve`` command line.

Examples:
    tierserve local                      # sample models, embedded S3, OIP on 127.0.0.1:3000
    tierserve local --port 8000
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierserve",
        description="Serve ONNX models on AWS: package them, run them locally, deploy them with CDK.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    local = commands.add_parser(
        "local",
        help="run the local API on sample models (no Docker, no AWS account)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Builds sample models (a scikit-learn classifier, a perceptron, a convnet), packages them\n"
            "(zstd + manifest), puts them into an embedded S3 on 127.0.0.1 and serves the Open Inference\n"
            "Protocol by handing API Gateway proxy events to the real Lambda handler."
        ),
        epilog=(
            "examples:\n"
            "  tierserve local\n"
            "  PORT=8000 tierserve local\n"
            "  curl -s localhost:3000/v2/models/iris"
        ),
    )
    local.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "3000")), help="default $PORT or 3000"
    )
    local.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    local.add_argument(
        "--work-dir",
        type=Path,
        default=Path(".tierserve"),
        help="models, cache, catalog (default .tierserve)",
    )
    local.set_defaults(run=run_local)
    return parser


def run_local(args: argparse.Namespace) -> int:
    from tierserve.local.run import describe, say, start

    try:
        stack = start(args.work_dir, host=args.host, port=args.port)
    except OSError as error:
        print(
            f"tierserve local: cannot listen on {args.host}:{args.port} ({error.strerror}); pick --port",
            file=sys.stderr,
        )
        return 1
    print(describe(stack), flush=True)
    try:
        stack.api._thread.join() if stack.api._thread else None  # type: ignore[func-returns-value]
    except KeyboardInterrupt:
        say("stopping")
    finally:
        stack.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
