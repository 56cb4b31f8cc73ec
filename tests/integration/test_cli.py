"""The `tierserve` command line as a user meets it: --version, output piped into a reader that
stops early (`| head`), a --catalog that does not exist, and sizes in the unit that reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.common import REPO_ROOT
from tierserve import __version__
from tierserve.catalog import Catalog
from tierserve.tools.cli import EXIT_BROKEN_PIPE, main


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def catalog(iris_package, tmp_path: Path) -> Path:
    """A catalog of 200 small models (the iris package under other names)."""
    path = tmp_path / "catalog.json"
    catalog = Catalog(())
    for index in range(200):
        catalog = catalog.with_entry(
            Catalog.from_dict(
                {"models": [{"manifest": {**iris_package.manifest.to_dict(), "name": f"iris-{index}"}}]}
            )
            .entries[0]
            .manifest
        )
    catalog.save(path)
    return path


def test_version(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out == f"tierserve {__version__}\n"


@pytest.mark.parametrize(
    ("argv", "codes"),
    [
        (["--help"], {0, EXIT_BROKEN_PIPE}),  # argparse itself ignores a failed write of its help
        (["catalog", "list"], {EXIT_BROKEN_PIPE}),
        (["catalog", "show", "iris-7"], {EXIT_BROKEN_PIPE}),
    ],
    ids=["help", "list", "show"],
)
def test_output_into_a_reader_that_went_away_ends_quietly(catalog, argv, codes):
    extra = ["--catalog", str(catalog)] if argv[0] == "catalog" else []
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "layers" / "tierserve" / "python")}
    child = subprocess.Popen(
        [sys.executable, "-m", "tierserve.tools.cli", *argv, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    child.stdout.close()  # as `| head` does once it has its lines: every write now fails
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=60) in codes, stderr
    assert stderr == ""


@pytest.mark.parametrize(
    "action", [["list"], ["show", "iris"], ["validate"]], ids=["list", "show", "validate"]
)
def test_a_catalog_named_that_does_not_exist_is_an_error(tmp_path, capsys, action):
    missing = tmp_path / "missing.json"
    code, out, err = cli(capsys, "catalog", *action, "--catalog", missing)
    assert code == 1 and out == ""
    assert err == (
        f"tierserve catalog: error: no catalog at {missing}: check the path, or leave out --catalog "
        "for the one cdk.json names\n"
    )


def test_a_catalog_cdk_json_names_may_not_exist_yet(tmp_path, capsys, monkeypatch):
    (tmp_path / "cdk.json").write_text(json.dumps({"context": {"catalog": "catalog.json"}}))
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "catalog", "list")
    assert code == 0 and "no models yet" in out


def test_sizes_under_a_megabyte_are_listed_in_kilobytes(iris_package, tmp_path, capsys):
    path = tmp_path / "catalog.json"
    Catalog(()).with_entry(iris_package.manifest).save(path)
    code, out, _ = cli(capsys, "catalog", "list", "--catalog", path)
    assert code == 0
    [row] = [line for line in out.splitlines() if line.startswith("iris ")]
    model_kb = f"{iris_package.manifest.model.bytes / 1e3:,.1f} kB"
    stored_kb = f"{iris_package.manifest.stored.bytes / 1e3:,.1f} kB zstd"
    assert model_kb in row and stored_kb in row and "0.0 MB" not in row, row


def test_a_deeply_nested_event_file_is_a_usage_error(tmp_path, capsys):
    event = tmp_path / "event.json"
    event.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = cli(capsys, "local", "invoke", event, "--work-dir", tmp_path)
    assert code == 2 and f"tierserve local invoke: {event} is not JSON" in err


def test_a_deeply_nested_cdk_json_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "cdk.json").write_text('{"context": ' + "[" * 100_000 + "]" * 100_000 + "}")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "catalog", "list")
    assert code == 1 and err.startswith(
        f"tierserve catalog: error: {tmp_path / 'cdk.json'} cannot be read as JSON"
    )
