"""``tierserve batch``: bulk inference over an S3 prefix (or a manifest), on the ``TierserveBatch``
state machine in AWS, or in this process against a running ``tierserve local``.

:func:`add_batch_command` adds the command to the main parser (``tierserve.tools.cli``).
In AWS it starts an execution and follows the map run's item counters (``DescribeMapRun``)
until the run ends, or returns at once with ``--detach``; ``--local`` runs the same item
reader, batches and batch code over the local stack's embedded S3
(:func:`tierserve.batch.run_locally`); ``--dry-run`` counts the items and starts nothing.
Every failure is one line on stderr that says what to do, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tierserve import aws
from tierserve.batch import (
    MANIFEST_READERS,
    BadManifest,
    BadSource,
    BatchSource,
    ItemCounts,
    MapSettings,
    PoisonItem,
    read_items,
    run_locally,
    to_object,
)
from tierserve.settings import ERROR_PREFIX, INPUT_PREFIX, OUTPUT_PREFIX, SUMMARY_PREFIX
from tierserve.telemetry import logger
from tierserve.tools.cdk_context import ConfigError

BATCH_STACK = "TierserveBatch"
STATE_MACHINE_OUTPUT = "StateMachineArn"
DATA_BUCKET_OUTPUT = "DataBucketName"
POLL_INTERVAL_S = 2.0
# In this process the items of every batch share one pool of TIERSERVE_WORKER_CONCURRENCY
# threads; more batches in flight than this would only wait on it.
LOCAL_MAX_CONCURRENCY = 4
DONE = {"SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"}

EXAMPLES = """\
examples:
  # every input under a prefix, on the TierserveBatch state machine (cdk deploy TierserveBatch)
  tierserve batch s3://DATA-BUCKET/inputs/iris/2026/ --model iris

  # the keys a manifest lists (CSV with a Key column, a JSON array, or an S3 Inventory report)
  tierserve batch s3://DATA-BUCKET/manifests/retry.csv --manifest csv --model iris
  tierserve batch s3://DATA-BUCKET/inventory/DATA-BUCKET/daily/2026-01-01T00-00Z/manifest.json \\
      --manifest inventory --model iris

  tierserve batch s3://DATA-BUCKET/inputs/iris/ --model iris --dry-run   # count, start nothing
  tierserve batch s3://DATA-BUCKET/inputs/iris/ --model iris --detach    # start, do not follow

  # the same run in this process, against `tierserve local` (its data bucket is tierserve-data)
  tierserve batch s3://tierserve-data/inputs/iris/ --model iris --local

Results go where the S3 pipeline writes them: outputs/MODEL/PATH.json or errors/MODEL/PATH.json;
a rerun skips every input whose result is current. The run's summary (the Distributed Map's
ResultWriter files) goes to batch-summaries/RUN/manifest.json. Exit 0 when the run succeeded.
See docs/batch-and-streams.md.
"""


class BatchCommandError(RuntimeError):
    """What stops the command; the message says what to do."""


def add_batch_command(commands: Any) -> None:
    """Add ``tierserve batch`` to the main parser's subcommands."""
    batch = commands.add_parser(
        "batch",
        help="bulk inference over an S3 prefix or manifest (Step Functions, or --local)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Serves every input under s3://BUCKET/inputs/MODEL/PREFIX (or every key a manifest lists)\n"
            "with MODEL, in batches, on the TierserveBatch state machine's Distributed Map, and shows\n"
            "the items succeeded, failed and pending until the run ends."
        ),
        epilog=EXAMPLES,
    )
    batch.add_argument(
        "uri", help="s3://BUCKET/inputs/MODEL/PREFIX, or a manifest's s3:// URI with --manifest"
    )
    batch.add_argument("--model", required=True, help="the model that serves the inputs, e.g. iris")
    batch.add_argument(
        "--manifest", choices=MANIFEST_READERS, help="URI is a manifest of this kind, not a prefix"
    )
    batch.add_argument("--dry-run", action="store_true", help="count the items and batches; start nothing")
    batch.add_argument("--detach", action="store_true", help="start the run and return without following it")
    batch.add_argument(
        "--local", action="store_true", help="run in this process against a running `tierserve local`"
    )
    batch.add_argument(
        "--state-machine", help=f"the state machine's ARN (default: the {BATCH_STACK} stack's output)"
    )
    batch.add_argument("--work-dir", type=Path, default=Path(".tierserve"), help="as for `tierserve local`")
    batch.set_defaults(run=run_batch)


def run_batch(args: argparse.Namespace) -> int:
    try:
        source = BatchSource.parse(args.uri, args.model, args.manifest)
        if args.local:
            return _run_local(args, source)
        return _run_aws(args, source)
    except (BadSource, BadManifest, BatchCommandError, ConfigError) as error:
        print(f"tierserve batch: {error}", file=sys.stderr)
        return 1 if not isinstance(error, BadSource) else 2
    except KeyboardInterrupt:
        print("tierserve batch: stopped following (a run in AWS goes on)", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- counting


@dataclass
class ItemCount:
    inputs: int = 0
    not_inputs: int = 0  # folder markers, noncurrent versions
    poison: int = 0
    items: int = 0


def count_items(s3: Any, source: BatchSource) -> ItemCount:
    """What the item reader gives for ``source``, item by item, as the batch function sees it."""
    counted = ItemCount()
    for item in read_items(s3, source):
        counted.items += 1
        try:
            found = to_object(item, source)
        except PoisonItem:
            counted.poison += 1
            continue
        if found is None:
            counted.not_inputs += 1
        else:
            counted.inputs += 1
    return counted


def _dry_run(s3: Any, source: BatchSource, items_per_batch: int, out: TextIO) -> int:
    counted = _s3_call(lambda: count_items(s3, source), source.uri, "reading")
    batches = -(-counted.items // items_per_batch)
    print(
        f"{source.uri}: {counted.items:,} items in {batches:,} batches of up to {items_per_batch:,}: "
        f"{counted.inputs:,} inputs of {source.model}"
        + (
            f", {counted.not_inputs:,} skipped (folder markers, noncurrent versions)"
            if counted.not_inputs
            else ""
        )
        + (f", {counted.poison:,} that can never be served (their batches fail)" if counted.poison else ""),
        file=out,
    )
    _print_where(source, out, summary=f"s3://{source.bucket}/{SUMMARY_PREFIX}/RUN/manifest.json")
    print("dry run: nothing started", file=out)
    return 0


def _print_where(source: BatchSource, out: TextIO, *, summary: str) -> None:
    path = source.key.removeprefix(f"{INPUT_PREFIX}/") if source.reader == "prefix" else f"{source.model}/"
    print(f"outputs: s3://{source.bucket}/{OUTPUT_PREFIX}/{path}", file=out)
    print(f"errors:  s3://{source.bucket}/{ERROR_PREFIX}/{path}", file=out)
    print(f"summary: {summary}", file=out)


def _s3_call(call: Callable[[], Any], where: str, doing: str) -> Any:
    try:
        return call()
    except (BadManifest, BadSource):
        raise
    except Exception as error:
        failure = aws.classify(error)
        if failure.kind == "gone":
            raise BatchCommandError(
                f"{where} does not exist ({failure.code}): check the bucket and key"
            ) from None
        if failure.kind == "denied":
            raise BatchCommandError(
                f"access to {where} is denied ({failure.code}): check your credentials"
            ) from None
        raise BatchCommandError(f"S3 failed while {doing} {where} ({failure.code}); retry") from None


# ---------------------------------------------------------------- local


def _run_local(args: argparse.Namespace, source: BatchSource) -> int:
    from tierserve.registry import ModelRegistry
    from tierserve.s3_pipeline import Pipeline, PipelineSettings
    from tierserve.settings import Settings
    from tierserve.tools.cdk_context import InfraConfig
    from tierserve.tools.local.embedded_s3 import embedded_client, endpoint_env
    from tierserve.tools.local.stack import CDK_JSON, local_function_env
    from tierserve.tools.local.state import LocalStackNotRunning, read_state

    try:
        state = read_state(args.work_dir)
        env = {
            **endpoint_env(state["s3_endpoint"], state.get("sagemaker_endpoint")),
            **local_function_env(args.work_dir),
        }
        config = map_settings(InfraConfig.from_cdk_json(CDK_JSON))
    except (LocalStackNotRunning, ConfigError) as error:
        raise BatchCommandError(str(error)) from None
    if source.bucket != state["data_bucket"]:
        raise BatchCommandError(
            f"the local stack's data bucket is {state['data_bucket']}, not {source.bucket}: "
            f"give s3://{state['data_bucket']}/{source.key}"
        )
    os.environ.update(env)  # this process's clients reach the embedded S3, never AWS
    aws.clear_clients()
    # One line per item is for a function's log; here the progress line and the summary say it.
    logger.setLevel(os.environ.get("POWERTOOLS_LOG_LEVEL") or "WARNING")
    s3 = embedded_client(state["s3_endpoint"])
    if args.dry_run:
        return _dry_run(s3, source, config.items_per_batch, sys.stdout)
    pipeline = Pipeline(ModelRegistry(Settings.from_env(env)), PipelineSettings.from_env(env))
    settings = MapSettings(
        items_per_batch=config.items_per_batch,
        max_concurrency=min(config.max_concurrency, LOCAL_MAX_CONCURRENCY),
        tolerated_failure_percentage=config.tolerated_failure_percentage,
        function_timeout_s=config.function_timeout_s,
    )
    display = Progress(sys.stderr)
    started = time.perf_counter()
    result = _s3_call(
        lambda: run_locally(pipeline, s3, source, settings, progress=display), source.uri, "reading"
    )
    display.close(result.counts)
    seconds = time.perf_counter() - started
    done = result.outcomes
    print(
        f"{result.status}: {result.counts.succeeded:,} of {result.counts.total:,} items in succeeded batches "
        f"({done.get('outputs', 0):,} outputs, {done.get('errors', 0):,} errors, {done.get('skipped', 0):,} skipped as "
        f"current), {result.counts.failed:,} in failed batches, in {seconds:.1f} s",
        file=sys.stdout,
    )
    _print_where(source, sys.stdout, summary=f"s3://{source.bucket}/{result.summary_key}")
    if result.error:
        print(f"tierserve batch: {result.error}: {result.cause}", file=sys.stderr)
    return 0 if result.status == "SUCCEEDED" else 1


def map_settings(config: Any) -> MapSettings:
    """The Distributed Map's settings from ``cdk.json``'s ``batch_*`` context (an InfraConfig)."""
    return MapSettings(
        items_per_batch=config.batch_items_per_batch,
        max_concurrency=config.batch_max_concurrency,
        tolerated_failure_percentage=config.batch_tolerated_failure_percentage,
        function_timeout_s=config.batch_function_timeout_seconds,
    )


# ---------------------------------------------------------------- AWS


def _run_aws(args: argparse.Namespace, source: BatchSource) -> int:
    if args.dry_run:
        from tierserve.tools.cdk_context import InfraConfig, find_cdk_json

        found = find_cdk_json(Path.cwd())
        config = map_settings(InfraConfig.from_cdk_json(found) if found else InfraConfig())
        return _dry_run(aws.client("s3"), source, config.items_per_batch, sys.stdout)
    sfn = aws.client("stepfunctions")
    state_machine = args.state_machine or _deployed_state_machine(source)
    try:
        started = sfn.start_execution(
            stateMachineArn=state_machine, input=json.dumps(source.execution_input())
        )
    except Exception as error:
        raise _aws_error(error, "starting a run of", state_machine) from None
    execution = started["executionArn"]
    print(f"started {execution}", file=sys.stderr)
    if args.detach:
        print(
            f"follow it: aws stepfunctions describe-execution --execution-arn {execution}\n"
            "(or the Step Functions console: the map run shows the items succeeded, failed and pending)",
            file=sys.stderr,
        )
        _print_where(source, sys.stdout, summary=f"s3://{source.bucket}/{SUMMARY_PREFIX}/RUN/manifest.json")
        return 0
    return follow(sfn, execution, source, out=sys.stdout, err=sys.stderr)


def follow(
    sfn: Any,
    execution: str,
    source: BatchSource,
    *,
    out: TextIO,
    err: TextIO,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Show the map run's item counters until the execution ends (polled every
    :data:`POLL_INTERVAL_S`); 0 when it succeeded."""
    display = Progress(err)
    counts = ItemCounts()
    while True:
        try:
            described = sfn.describe_execution(executionArn=execution)
            counts = _map_run_counts(sfn, execution) or counts
        except Exception as error:
            raise _aws_error(error, "following", execution) from None
        display(counts)
        if described["status"] in DONE:
            break
        sleep(POLL_INTERVAL_S)
    display.close(counts)
    status = described["status"]
    output = _json(described.get("output"))
    details = output.get("ResultWriterDetails") if isinstance(output, dict) else None
    summary = (
        f"s3://{details['Bucket']}/{details['Key']}"
        if isinstance(details, dict) and "Bucket" in details and "Key" in details
        else f"s3://{source.bucket}/{SUMMARY_PREFIX}/ (not written)"
    )
    print(
        f"{status}: {counts.succeeded:,} of {counts.total:,} items succeeded, {counts.failed:,} failed",
        file=out,
    )
    _print_where(source, out, summary=summary)
    if status != "SUCCEEDED":
        print(
            f"tierserve batch: the run {status.lower()}: {described.get('error', '')} {described.get('cause', '')}".rstrip(),
            file=err,
        )
        return 1
    return 0


def _map_run_counts(sfn: Any, execution: str) -> ItemCounts | None:
    runs = sfn.list_map_runs(executionArn=execution).get("mapRuns", [])
    if not runs:
        return None  # the map has not started yet
    counts = sfn.describe_map_run(mapRunArn=runs[0]["mapRunArn"]).get("itemCounts", {})
    return ItemCounts(
        pending=int(counts.get("pending", 0)),
        running=int(counts.get("running", 0)),
        succeeded=int(counts.get("succeeded", 0)),
        failed=int(counts.get("failed", 0)) + int(counts.get("timedOut", 0)) + int(counts.get("aborted", 0)),
        total=int(counts.get("total", 0)),
    )


def _deployed_state_machine(source: BatchSource) -> str:
    """The ``TierserveBatch`` stack's state machine, once its data bucket is ``source``'s."""
    try:
        stacks = aws.client("cloudformation").describe_stacks(StackName=BATCH_STACK)["Stacks"]
    except Exception as error:
        raise _aws_error(error, "reading the outputs of", f"the {BATCH_STACK} stack") from None
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])} if stacks else {}
    if STATE_MACHINE_OUTPUT not in outputs:
        raise BatchCommandError(
            f"the {BATCH_STACK} stack has no {STATE_MACHINE_OUTPUT} output: deploy it (npx cdk deploy {BATCH_STACK}) "
            "or pass --state-machine ARN"
        )
    bucket = outputs.get(DATA_BUCKET_OUTPUT)
    if bucket and bucket != source.bucket:
        raise BatchCommandError(
            f"the state machine serves the data bucket {bucket}, not {source.bucket}: give s3://{bucket}/{source.key}"
        )
    return outputs[STATE_MACHINE_OUTPUT]


def _aws_error(error: BaseException, doing: str, what: str) -> BatchCommandError:
    failure = aws.classify(error)
    if failure.kind == "denied":
        return BatchCommandError(
            f"access denied while {doing} {what} ({failure.code}): check your AWS credentials"
        )
    if failure.kind == "gone" or failure.code in (
        "StateMachineDoesNotExist",
        "ExecutionDoesNotExist",
        "ValidationError",
    ):
        return BatchCommandError(
            f"{what} is not there ({failure.code}: {failure.message}): deploy {BATCH_STACK} or fix the ARN"
        )
    return BatchCommandError(f"AWS failed while {doing} {what} ({failure.code}); retry")


def _json(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


# ---------------------------------------------------------------- progress


class Progress:
    """A map run's counters on one line: redrawn on a terminal, printed every
    :data:`LOG_EVERY_S` seconds elsewhere (CI logs), and a last line at the end."""

    LOG_EVERY_S = 10.0

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._interactive = bool(getattr(stream, "isatty", lambda: False)())
        self._printed = 0.0
        self._started = time.perf_counter()

    def __call__(self, counts: ItemCounts) -> None:
        now = time.perf_counter()
        if self._interactive:
            self.stream.write("\r" + self.line(counts))
            self.stream.flush()
        elif now - self._printed >= self.LOG_EVERY_S:
            self._printed = now
            print(self.line(counts), file=self.stream, flush=True)

    def line(self, counts: ItemCounts) -> str:
        width = 30
        total = max(counts.total, 1)
        done = int(width * (counts.succeeded + counts.failed) / total)
        elapsed = max(time.perf_counter() - self._started, 1e-6)
        return (
            f"[{'#' * done}{'.' * (width - done)}] {counts.succeeded:,} succeeded, {counts.failed:,} failed, "
            f"{counts.pending + counts.running:,} pending of {counts.total:,} items "
            f"({(counts.succeeded + counts.failed) / elapsed:,.1f}/s)"
        )

    def close(self, counts: ItemCounts) -> None:
        prefix = "\r" if self._interactive else ""
        self.stream.write(prefix + self.line(counts) + "\n")
        self.stream.flush()
