"""`tierserve batch`: against a local stack (its state file, catalog and embedded S3, as
`tierserve local` leaves them) end to end, and against Step Functions through botocore's
Stubber (no request leaves the process: the client's endpoint is a closed port on loopback)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import pytest
from botocore.stub import Stubber

from support.pipeline import assert_one_result_per_input, infer_request
from tierserve import aws
from tierserve.catalog import Catalog
from tierserve.tools import batch as batch_cli
from tierserve.tools import cli
from tierserve.tools.local.state import write_state
from tierserve.tools.packaging import upload_package

LOCAL_DATA = "tierserve-data"
STATE_MACHINE = "arn:aws:states:us-east-1:123456789012:stateMachine:TierserveBatch"
EXECUTION = "arn:aws:states:us-east-1:123456789012:execution:TierserveBatch:run-1"
MAP_RUN = "arn:aws:states:us-east-1:123456789012:mapRun:TierserveBatch/Map:0a1b"


@pytest.fixture
def local_stack(s3, embedded_s3, iris_package, tmp_path, restore_environ):
    """What a running `tierserve local` leaves for other commands: models, catalog, state."""
    s3.create_bucket(Bucket="tierserve-models")
    s3.create_bucket(Bucket=LOCAL_DATA)
    stored = upload_package(iris_package, s3, "tierserve-models", "models").manifest
    Catalog(()).with_entry(stored).save(tmp_path / "catalog.json")
    write_state(
        tmp_path, {"pid": os.getpid(), "s3_endpoint": embedded_s3.endpoint, "data_bucket": LOCAL_DATA}
    )
    return tmp_path


def test_a_local_run_serves_the_prefix_and_says_where_everything_is(s3, local_stack, capsys):
    for i in range(12):
        s3.put_object(Bucket=LOCAL_DATA, Key=f"inputs/iris/2026/{i:02d}.json", Body=infer_request())
    s3.put_object(Bucket=LOCAL_DATA, Key="inputs/iris/2026/bad.json", Body=b"{")
    command = [
        "batch",
        f"s3://{LOCAL_DATA}/inputs/iris/2026/",
        "--model",
        "iris",
        "--local",
        "--work-dir",
        str(local_stack),
    ]
    assert cli.main(command) == 0
    out = capsys.readouterr()
    assert "SUCCEEDED: 13 of 13 items in succeeded batches (12 outputs, 1 errors, 0 skipped" in out.out
    assert f"outputs: s3://{LOCAL_DATA}/outputs/iris/2026/" in out.out
    summary = next(line for line in out.out.splitlines() if line.startswith("summary: "))
    bucket, key = summary.removeprefix("summary: s3://").split("/", 1)
    assert json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())["ResultFiles"]["SUCCEEDED"]
    assert "13 succeeded, 0 failed, 0 pending of 13 items" in out.err  # the progress line's last state
    assert_one_result_per_input(s3, LOCAL_DATA, extra_prefixes=("batch-summaries/",))
    assert cli.main(command) == 0  # again: every result is current
    assert "(0 outputs, 0 errors, 13 skipped as current)" in capsys.readouterr().out


def test_a_dry_run_counts_items_and_batches_and_starts_nothing(s3, local_stack, capsys):
    for i in range(3):
        s3.put_object(Bucket=LOCAL_DATA, Key=f"inputs/iris/d/{i}.json", Body=infer_request())
    s3.put_object(Bucket=LOCAL_DATA, Key="inputs/iris/d/", Body=b"")
    command = ["batch", f"s3://{LOCAL_DATA}/inputs/iris/d/", "--model", "iris", "--local", "--dry-run"]
    assert cli.main([*command, "--work-dir", str(local_stack)]) == 0
    out = capsys.readouterr().out
    assert "4 items in 1 batches of up to 100: 3 inputs of iris, 1 skipped (folder markers" in out
    assert "dry run: nothing started" in out
    assert not [
        k
        for k in s3.list_objects_v2(Bucket=LOCAL_DATA).get("Contents", [])
        if not k["Key"].startswith("inputs/")
    ]


def test_a_local_run_of_a_manifest_that_names_other_models_fails_and_names_them(s3, local_stack, capsys):
    s3.put_object(Bucket=LOCAL_DATA, Key="inputs/iris/a.json", Body=infer_request())
    s3.put_object(
        Bucket=LOCAL_DATA, Key="manifests/run.csv", Body=b"Key\ninputs/iris/a.json\ninputs/mlp/b.json\n"
    )
    command = [
        "batch",
        f"s3://{LOCAL_DATA}/manifests/run.csv",
        "--manifest",
        "csv",
        "--model",
        "iris",
        "--local",
    ]
    assert cli.main([*command, "--work-dir", str(local_stack)]) == 1
    err = capsys.readouterr().err
    assert "States.ExceedToleratedFailureThreshold: 2 of 2 items failed, over the tolerated 0%" in err


def test_a_local_run_names_the_local_data_bucket_and_the_running_stack(tmp_path, local_stack, capsys):
    assert (
        cli.main(
            [
                "batch",
                "s3://other-bucket/inputs/iris/",
                "--model",
                "iris",
                "--local",
                "--work-dir",
                str(local_stack),
            ]
        )
        == 1
    )
    assert "the local stack's data bucket is tierserve-data, not other-bucket" in capsys.readouterr().err
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    assert (
        cli.main(
            [
                "batch",
                "s3://tierserve-data/inputs/iris/",
                "--model",
                "iris",
                "--local",
                "--work-dir",
                str(empty),
            ]
        )
        == 1
    )
    assert "start `tierserve local` first" in capsys.readouterr().err


def test_a_missing_manifest_says_it_does_not_exist(local_stack, capsys):
    command = [
        "batch",
        f"s3://{LOCAL_DATA}/manifests/none.csv",
        "--manifest",
        "csv",
        "--model",
        "iris",
        "--local",
    ]
    assert cli.main([*command, "--work-dir", str(local_stack), "--dry-run"]) == 1
    assert f"s3://{LOCAL_DATA}/manifests/none.csv does not exist (NoSuchKey)" in capsys.readouterr().err


# ---------------------------------------------------------------- against Step Functions


@pytest.fixture
def sfn(monkeypatch):
    """The command's Step Functions client, stubbed; its endpoint is a closed port on loopback."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STEPFUNCTIONS", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_CLOUDFORMATION", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setattr(batch_cli, "POLL_INTERVAL_S", 0)
    aws.clear_clients()
    with Stubber(aws.client("stepfunctions")) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def execution(status: str, **extra) -> dict:
    return {
        "executionArn": EXECUTION,
        "stateMachineArn": STATE_MACHINE,
        "status": status,
        "startDate": datetime(2026, 1, 1, tzinfo=UTC),
        **extra,
    }


def map_run(succeeded: int, failed: int, total: int) -> dict:
    counts = {
        "pending": total - succeeded - failed,
        "running": 0,
        "succeeded": succeeded,
        "failed": failed,
        "timedOut": 0,
        "aborted": 0,
        "total": total,
        "resultsWritten": succeeded + failed,
    }
    return {
        "mapRunArn": MAP_RUN,
        "executionArn": EXECUTION,
        "status": "RUNNING",
        "startDate": datetime(2026, 1, 1, tzinfo=UTC),
        "maxConcurrency": 100,
        "toleratedFailurePercentage": 0.0,
        "toleratedFailureCount": 0,
        "itemCounts": counts,
        "executionCounts": counts,
    }


def expect_start(sfn, source_input: dict) -> None:
    sfn.add_response(
        "start_execution",
        {"executionArn": EXECUTION, "startDate": datetime(2026, 1, 1, tzinfo=UTC)},
        {"stateMachineArn": STATE_MACHINE, "input": json.dumps(source_input)},
    )


def expect_poll(sfn, status: str, succeeded: int, failed: int, total: int, **extra) -> None:
    sfn.add_response("describe_execution", execution(status, **extra), {"executionArn": EXECUTION})
    listed = {"mapRunArn": MAP_RUN, "executionArn": EXECUTION, "stateMachineArn": STATE_MACHINE,
              "startDate": datetime(2026, 1, 1, tzinfo=UTC)}  # fmt: skip
    sfn.add_response("list_map_runs", {"mapRuns": [listed]}, {"executionArn": EXECUTION})
    sfn.add_response("describe_map_run", map_run(succeeded, failed, total), {"mapRunArn": MAP_RUN})


PREFIX_INPUT = {"reader": "prefix", "key": "inputs/iris/2026/", "model": "iris"}
COMMAND = ["batch", "s3://data-bucket/inputs/iris/2026/", "--model", "iris", "--state-machine", STATE_MACHINE]


def test_a_run_is_followed_by_its_map_run_counters_until_it_succeeds(sfn, capsys):
    expect_start(sfn, PREFIX_INPUT)
    expect_poll(sfn, "RUNNING", 0, 0, 0)
    expect_poll(sfn, "RUNNING", 600, 0, 1000)
    writer = {"Bucket": "data-bucket", "Key": "batch-summaries/0a1b/manifest.json"}
    output = json.dumps({"MapRunArn": MAP_RUN, "ResultWriterDetails": writer})
    expect_poll(sfn, "SUCCEEDED", 1000, 0, 1000, output=output)
    assert cli.main(COMMAND) == 0
    out = capsys.readouterr()
    assert f"started {EXECUTION}" in out.err
    assert "1,000 succeeded, 0 failed, 0 pending of 1,000 items" in out.err
    assert "SUCCEEDED: 1,000 of 1,000 items succeeded, 0 failed" in out.out
    assert "summary: s3://data-bucket/batch-summaries/0a1b/manifest.json" in out.out
    assert "outputs: s3://data-bucket/outputs/iris/2026/" in out.out


def test_a_failed_run_exits_1_with_its_error_and_cause(sfn, capsys):
    expect_start(sfn, PREFIX_INPUT)
    expect_poll(
        sfn, "FAILED", 900, 100, 1000, error="States.ExceedToleratedFailureThreshold", cause="too many"
    )
    assert cli.main(COMMAND) == 1
    out = capsys.readouterr()
    assert "900 of 1,000 items succeeded, 100 failed" in out.out
    assert "the run failed: States.ExceedToleratedFailureThreshold too many" in out.err


def test_detach_starts_the_run_and_says_how_to_follow_it(sfn, capsys):
    expect_start(sfn, {"reader": "csv", "key": "manifests/k.csv", "model": "iris"})
    command = [
        "batch",
        "s3://data-bucket/manifests/k.csv",
        "--manifest",
        "csv",
        "--model",
        "iris",
        "--detach",
    ]
    assert cli.main([*command, "--state-machine", STATE_MACHINE]) == 0
    err = capsys.readouterr().err
    assert f"aws stepfunctions describe-execution --execution-arn {EXECUTION}" in err


def test_the_state_machine_comes_from_the_stacks_outputs_and_its_bucket_must_match(sfn, capsys):
    outputs = [
        {"OutputKey": "StateMachineArn", "OutputValue": STATE_MACHINE},
        {"OutputKey": "DataBucketName", "OutputValue": "the-data-bucket"},
    ]
    stack = {"StackName": "TierserveBatch", "CreationTime": datetime(2026, 1, 1, tzinfo=UTC), "StackStatus": "CREATE_COMPLETE", "Outputs": outputs}  # fmt: skip
    with Stubber(aws.client("cloudformation")) as cloudformation:
        cloudformation.add_response("describe_stacks", {"Stacks": [stack]}, {"StackName": "TierserveBatch"})
        assert cli.main(["batch", "s3://data-bucket/inputs/iris/", "--model", "iris"]) == 1
    assert (
        "serves the data bucket the-data-bucket, not data-bucket: give s3://the-data-bucket/inputs/iris/"
        in (capsys.readouterr().err)
    )


def test_a_state_machine_that_is_not_there_says_to_deploy_it(sfn, capsys):
    sfn.add_client_error("start_execution", "StateMachineDoesNotExist", "State Machine Does Not Exist", 400)
    assert cli.main(COMMAND) == 1
    assert "is not there (StateMachineDoesNotExist" in capsys.readouterr().err
