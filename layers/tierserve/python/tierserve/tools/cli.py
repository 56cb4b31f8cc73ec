"""The ``tierserve`` command line (``EXAMPLES`` is its --help epilog)."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tierserve import __version__
from tierserve.settings import SettingsError, whole

EXAMPLES = """\
A model goes from an ONNX file to a served API in three steps:
  1. try it locally    tierserve local            (then: curl localhost:3000/v2/models/iris)
  2. package it        tierserve package model.onnx --name NAME --version V --quantization int8
  3. upload, deploy    ... --upload s3://BUCKET/models, then: npx cdk deploy --all

examples:
    tierserve local                      # sample models, embedded S3, OIP on 127.0.0.1:3000
    tierserve local --port 8000
    tierserve local --models .tierserve/packages --no-samples   # your packages, each on its tier
    tierserve local put rows.jsonl --model iris   # S3-triggered inference on the running stack
    tierserve local stream rows.jsonl             # records on the local Kinesis stream, their results
    tierserve local invoke events/infer-json.json # the handler under Lambda's runtime emulator
    tierserve batch s3://BUCKET/inputs/iris/ --model iris          # bulk inference (Step Functions)
    tierserve batch s3://tierserve-data/inputs/iris/ --model iris --local
    tierserve infer iris request.json      # one input: sync when small, an async job when large
    tierserve package model.onnx --name iris --version 1 --quantization int8 --upload s3://BUCKET/models
    tierserve catalog validate
    tierserve drift iris --local              # captured requests against the packaging baseline (PSI)
    tierserve --version

`tierserve COMMAND --help` explains each command, with examples.
"""

EXIT_USAGE = 2
# What a shell reports for a writer whose reader went away (128 + SIGPIPE): `tierserve ... | head`.
EXIT_BROKEN_PIPE = 141
DEFAULT_LOCAL_PORT = 3000
LOCAL_PORT = whole("PORT", high=65535, unset=f"the default, {DEFAULT_LOCAL_PORT}")
# What each handler of the Lambda image takes: a key its events have, and an example.
HANDLER_EVENTS = {
    "api.handler": ("httpMethod", "an API Gateway proxy event such as events/infer-json.json"),
    "worker.handler": ("Records", "an SQS event such as events/sqs-s3-put.json"),
    "batch.handler": ("Items", "a Distributed Map batch such as events/sfn-batch.json"),
    "drift.handler": ("detail-type", "an EventBridge scheduled event such as events/drift-schedule.json"),
    "stream.handler": ("Records", "a Kinesis event such as events/kinesis-records.json"),
    "jobs.handler": ("httpMethod", "an API Gateway proxy event such as events/job-create.json"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierserve",
        description="Serve ONNX models on AWS: package them, run them locally, deploy them with CDK.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("--version", action="version", version=f"tierserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    local = commands.add_parser(
        "local",
        help="serve sample models, or your own packages, locally (no Docker, no AWS account)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Builds sample models (a scikit-learn classifier, a perceptron, a convnet on the Lambda tier,\n"
            "and convnet-xl on the GPU tier), packages them (zstd + manifest), puts them into an embedded\n"
            "S3 on 127.0.0.1 and serves the Open Inference Protocol by handing API Gateway proxy events\n"
            "to the real Lambda handler, each model in its own execution environment; gpu-tier models\n"
            "are forwarded to the GPU server running as a local process (CPU). An embedded queue runs\n"
            "S3-triggered inference on every model: see `local put`.\n"
            "\n"
            "Your own models: --models DIR serves the packages `tierserve package` wrote (DIR itself, or\n"
            "its NAME/VERSION folders), --catalog PATH exactly the catalog's entries (their bytes found\n"
            "under --models, default .tierserve/packages); each on its tier by the tier rule (cdk.json's\n"
            "lambda_max_model_mb, or the manifest's override). --no-samples leaves the samples out.\n"
            "The banner names the embedded S3 endpoint, its credentials and buckets. Ready means all of\n"
            "it answers; the other `tierserve local` commands find it through .tierserve/local-stack.json."
        ),
        epilog=(
            "examples:\n"
            "  tierserve local\n"
            "  PORT=8000 tierserve local\n"
            "  tierserve package model.onnx --name mymodel --version 1\n"
            "  tierserve local --models .tierserve/packages --no-samples\n"
            "  tierserve local --catalog catalog.json --no-samples\n"
            "  tierserve local --gpu-idle-s 60      # gpu-tier models start on demand, stop when idle\n"
            "  curl -s localhost:3000/v2/models/iris"
        ),
    )
    local.add_argument("--port", type=int, default=None, help="default $PORT or 3000")
    local.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    local.add_argument(
        "--work-dir",
        type=Path,
        default=Path(".tierserve"),
        help="models, cache, catalog, logs, state (default .tierserve)",
    )
    local.add_argument(
        "--models",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="serve the packages in DIR (from `tierserve package`); repeatable",
    )
    local.add_argument(
        "--catalog",
        type=Path,
        metavar="PATH",
        help="serve exactly this catalog's models, found under --models (default .tierserve/packages)",
    )
    local.add_argument("--no-samples", action="store_true", help="leave the sample models out")
    local.add_argument(
        "--gpu-idle-s",
        type=float,
        default=None,
        metavar="SECONDS",
        help=(
            "run gpu-tier models cold, as they scale to zero in AWS: no GPU server process until a request "
            "comes (it gets 503 + Retry-After while the process starts), stopped after SECONDS without requests"
        ),
    )
    local.add_argument(
        "--capture-rate",
        type=float,
        default=1.0,
        metavar="RATE",
        help="share of each model's requests captured for `tierserve drift` (default 1, 0: off)",
    )
    local.set_defaults(run=run_local)
    local_commands = local.add_subparsers(dest="local_command", metavar="SUBCOMMAND")
    put = local_commands.add_parser(
        "put",
        help="put a file under inputs/ of the running local stack and print its result",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Puts FILE at s3://tierserve-data/inputs/MODEL/PATH of the embedded S3 that a running\n"
            "`tierserve local` started; S3 notifies SQS, the worker handler serves it, and this prints\n"
            "outputs/MODEL/PATH.json (exit 0) or errors/MODEL/PATH.json (exit 1). Formats: .json (a v2\n"
            "infer request), .npy (one tensor), .jsonl (one row per line). See docs/s3-inference.md."
        ),
        epilog=(
            "examples:\n"
            "  printf '[5.1,3.5,1.4,0.2]\\n[6.7,3.0,5.2,2.3]\\n' > rows.jsonl\n"
            "  tierserve local put rows.jsonl --model iris\n"
            "  tierserve local put batch.npy --model iris --path 2026/batch.npy"
        ),
    )
    put.add_argument("file", type=Path, help="the input file (.json, .npy or .jsonl)")
    put.add_argument("--model", required=True, help="the model that serves it, e.g. iris")
    put.add_argument("--path", help="its path under inputs/MODEL/ (default: the file's name)")
    put.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the result (default 60)"
    )
    put.add_argument("--work-dir", type=Path, default=argparse.SUPPRESS, help="as for `tierserve local`")
    put.set_defaults(run=run_local_put)
    stream = local_commands.add_parser(
        "stream",
        help="put records on the running local stack's Kinesis stream and print their results",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Puts each line of FILE (or stdin, with -) as one record of the local Kinesis stream\n"
            "tierserve-records that a running `tierserve local` polls; the stream worker serves them\n"
            "in order with its model (iris) and writes results to tierserve-results, which this prints,\n"
            "one JSON document per line, in the records' order. A line is a v2 infer request or one\n"
            "row of the model's inputs. Exit 0 when every record has an output, 1 when one has an error\n"
            "result or none came in time. See docs/batch-and-streams.md."
        ),
        epilog=(
            "examples:\n"
            "  printf '[5.1,3.5,1.4,0.2]\\n[6.7,3.0,5.2,2.3]\\n' | tierserve local stream -\n"
            "  tierserve local stream rows.jsonl --partition-key sensor-7"
        ),
    )
    stream.add_argument("file", help="a file with one record per line, or - for stdin")
    stream.add_argument("--partition-key", default="tierserve-local", help="the records' partition key")
    stream.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the results (default 30)"
    )
    stream.add_argument("--work-dir", type=Path, default=argparse.SUPPRESS, help="as for `tierserve local`")
    stream.set_defaults(run=run_local_stream)
    invoke = local_commands.add_parser(
        "invoke",
        help="run a handler on one event as Lambda runs it (sam local invoke, without Docker)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Runs HANDLER under the Lambda Runtime Interface Emulator with awslambdaric, the runtime\n"
            "client of the Lambda image, on this machine (no Docker), and prints its response. The\n"
            "function reads the models of a running `tierserve local` from its embedded S3. The\n"
            "events/ folder holds an event per scenario (API Gateway for api.handler, SQS for\n"
            "worker.handler). Exit 1 when the function fails; its log is named on stderr."
        ),
        epilog=(
            "examples:\n"
            "  tierserve local invoke events/infer-json.json\n"
            "  tierserve local invoke events/bad-shape.json\n"
            "  tierserve local invoke events/sqs-s3-test-event.json --handler worker.handler"
        ),
    )
    invoke.add_argument("event", type=Path, help="a JSON event file, e.g. events/infer-json.json")
    invoke.add_argument(
        "--handler",
        default="api.handler",
        choices=tuple(HANDLER_EVENTS),
        help="the function's handler (default api.handler, the image's CMD)",
    )
    invoke.add_argument("--work-dir", type=Path, default=argparse.SUPPRESS, help="as for `tierserve local`")
    invoke.set_defaults(run=run_local_invoke)
    from tierserve.tools.batch import add_batch_command
    from tierserve.tools.drift import add_drift_command
    from tierserve.tools.infer import add_infer_command
    from tierserve.tools.packaging.commands import add_commands

    add_commands(commands)  # package, upload, catalog
    add_batch_command(commands)
    add_infer_command(commands)
    add_drift_command(commands)
    return parser


def run_local(args: argparse.Namespace) -> int:
    from tierserve.tools.cdk_context import ConfigError
    from tierserve.tools.local.packages import LocalModelsError
    from tierserve.tools.local.stack import SAMPLES, LocalStackRunning, describe, say, start

    previous = stop_on_termination()  # before anything starts: a signal during the start cleans up too
    stack = None
    try:
        port = args.port if args.port is not None else LOCAL_PORT.read(os.environ, DEFAULT_LOCAL_PORT)
        if not 0 <= args.capture_rate <= 1:
            raise SettingsError(
                f"--capture-rate {args.capture_rate:g} must be from 0 (off) to 1 (every request)"
            )
        if args.gpu_idle_s is not None and not 0 < args.gpu_idle_s < float("inf"):
            raise SettingsError(f"--gpu-idle-s {args.gpu_idle_s:g} must be a number of seconds over 0")
        stack = start(
            args.work_dir,
            host=args.host,
            port=port,
            chosen=() if args.no_samples else SAMPLES,
            model_dirs=args.models,
            catalog_path=args.catalog,
            gpu_idle_s=args.gpu_idle_s,
            capture_rate=args.capture_rate,
        )
        print(describe(stack), flush=True)
        stack.wait()
    except KeyboardInterrupt:
        say("stopping")
    except (ConfigError, SettingsError, LocalModelsError, LocalStackRunning, RuntimeError) as error:
        print(f"tierserve local: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES) and stack is None:
            print(
                f"tierserve local: cannot listen on {args.host}:{port} ({error.strerror}); pick --port",
                file=sys.stderr,
            )
        else:
            print(f"tierserve local: {error}", file=sys.stderr)
        return 1
    finally:
        ignore_termination()  # stopping is bounded; a second Ctrl-C must not cut it short
        try:
            if stack is not None:
                stack.stop()
        finally:
            restore_signals(previous)
    return 0


TERMINATION = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_on_termination() -> dict[int, Any]:
    """Ctrl-C, SIGTERM and SIGHUP (kill, a closed terminal) stop the local stack alike, once
    (a repeated signal must not cut the stop short), so its GPU server processes drain and exit
    instead of outliving it and its state file goes. Returns the handlers it replaced."""

    def interrupt(signum: int, _frame: object) -> None:
        ignore_termination()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return {signum: signal.signal(signum, interrupt) for signum in TERMINATION}


def ignore_termination() -> None:
    for signum in TERMINATION:
        signal.signal(signum, signal.SIG_IGN)


def restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def run_local_put(args: argparse.Namespace) -> int:
    import json

    from tierserve.tools.local.s3_queue import put_and_wait
    from tierserve.tools.local.state import LocalStackNotRunning

    if not args.file.is_file():
        print(f"tierserve local put: no file {args.file}", file=sys.stderr)
        return EXIT_USAGE
    try:
        status, document, where = put_and_wait(
            args.work_dir, args.file, model=args.model, path=args.path, timeout_s=args.timeout
        )
    except LocalStackNotRunning as error:
        print(f"tierserve local put: {error}", file=sys.stderr)
        return 1
    if document is None:
        print(f"tierserve local put: no result at {where} after {args.timeout:g} s", file=sys.stderr)
        return 1
    print(f"{where}:", file=sys.stderr)
    print(json.dumps(document, indent=2))
    return 0 if status == "output" else 1


def run_local_stream(args: argparse.Namespace) -> int:
    import json

    from tierserve.tools.local.kinesis_stream import put_and_read
    from tierserve.tools.local.state import LocalStackNotRunning

    try:
        text = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as error:
        print(f"tierserve local stream: cannot read {args.file}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        print(f"tierserve local stream: {args.file} has no records: write one per line", file=sys.stderr)
        return EXIT_USAGE
    try:
        results = put_and_read(args.work_dir, lines, partition_key=args.partition_key, timeout_s=args.timeout)
    except LocalStackNotRunning as error:
        print(f"tierserve local stream: {error}", file=sys.stderr)
        return 1
    for document in results:
        print(json.dumps(document) if document is not None else "null")
    missing = sum(d is None for d in results)
    errors = sum(d is not None and "error" in d for d in results)
    print(
        f"{len(lines)} records -> {len(results) - missing} results ({errors} errors"
        + (f", {missing} not seen after {args.timeout:g} s" if missing else "")
        + ") from tierserve-results",
        file=sys.stderr,
    )
    return 0 if not missing and not errors else 1


def run_local_invoke(args: argparse.Namespace) -> int:
    import json

    from tierserve.tools.cdk_context import ConfigError
    from tierserve.tools.local.emulator import FunctionError
    from tierserve.tools.local.stack import invoke_in_emulator
    from tierserve.tools.local.state import LocalStackNotRunning

    try:
        event = json.loads(args.event.read_text())
    except OSError as error:
        print(f"tierserve local invoke: cannot read {args.event}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, RecursionError) as error:
        print(f"tierserve local invoke: {args.event} is not JSON: {error}", file=sys.stderr)
        return EXIT_USAGE
    key, takes = HANDLER_EVENTS[args.handler]
    if not isinstance(event, dict) or key not in event:
        print(
            f"tierserve local invoke: {args.event} is not what {args.handler} takes: {takes}", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        response, log_path = invoke_in_emulator(args.work_dir, event, args.handler)
    except FunctionError as error:
        print(json.dumps(error.payload, indent=2))
        print(f"tierserve local invoke: {error}", file=sys.stderr)
        return 1
    except (LocalStackNotRunning, RuntimeError, ConfigError) as error:
        print(f"tierserve local invoke: {error}", file=sys.stderr)
        return 1
    print(f"{args.handler} answered (log: {log_path}):", file=sys.stderr)
    print(json.dumps(response, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``tierserve`` command; returns its exit code. Output piped into a reader that
    stops early (``| head``) ends the command quietly, as other command-line tools do."""
    try:
        try:
            code = _run(argv)
        finally:  # also after --help and --version, which exit from argparse
            sys.stdout.flush()  # a pipe that closed shows here, not in the interpreter's last flush
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to write, and nothing to complain about
        return EXIT_BROKEN_PIPE
    return code


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
