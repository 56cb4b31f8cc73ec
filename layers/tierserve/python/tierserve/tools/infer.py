"""``tierserve infer MODEL INPUT``: one input to its result, through the API, whatever its size.

Small inputs go synchronously (``POST .../infer``); large ones, ``.jsonl`` files, ``--async``
and ``--wait`` go as async jobs (``POST .../jobs`` for an upload URL, the file PUT to S3 with a
progress bar, the status polled with backoff, the result downloaded). Requests are signed with
SigV4 (botocore's signer, the caller's AWS credentials) when the API uses IAM auth, or carry
the API key; against ``tierserve local`` nothing is needed. Every failure is one line that says
what to do, and the exit code says which kind it was (:data:`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
EXIT_CODES = {
    EXIT_OK: "the result was written (or, with --async, the job was created)",
    EXIT_FAILED: "the model or the job refused the input: the message says why (fix the input)",
    EXIT_USAGE: "bad arguments: no such file, an unknown format, no URL to send to",
    EXIT_UNAVAILABLE: "the API or S3 did not answer, answered 5xx, or the job did not finish in time (retry)",
}
# Lambda's 6 MB request limit holds the body base64-encoded: about 4.4 MB of it. Under this, sync.
SYNC_MAX_BYTES = 4 * 1024 * 1024
FORMATS = (".json", ".npy", ".jsonl")
URL_ENV = "TIERSERVE_URL"
API_KEY_ENV = "TIERSERVE_API_KEY"
EXECUTE_API_HOST = re.compile(r"^[a-z0-9]+\.execute-api\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")
FIRST_POLL_S, MAX_POLL_S, POLL_GROWTH = 0.5, 10.0, 1.5
UPLOAD_CHUNK = 1024 * 1024
HTTP_TIMEOUT_S = 60

EXAMPLES = """\
examples:
  tierserve infer iris request.json                      # small: POST /v2/models/iris/infer
  tierserve infer convnet images.npy --out result.json   # 50 MB: an async job, uploaded to S3
  tierserve infer iris rows.jsonl --async                # create the job, print its URL, return
  tierserve infer big-llm request.json --wait            # a job even when small (a cold GPU model)
  tierserve infer iris request.json --url https://ID.execute-api.REGION.amazonaws.com/prod
  TIERSERVE_API_KEY=... tierserve infer iris request.json --url https://.../prod --auth api_key

INPUT is a .json v2 infer request, a .npy tensor (single-input models) or a .jsonl file of rows.
Without --url (or $TIERSERVE_URL) it goes to the running `tierserve local`. Auth: --auth auto
signs with SigV4 for an execute-api URL (your AWS credentials: AWS_PROFILE, env, SSO...), sends
--api-key / $TIERSERVE_API_KEY when given, and nothing for other URLs.

exit codes:
""" + "".join(f"  {code}  {meaning}\n" for code, meaning in EXIT_CODES.items())


class InferError(RuntimeError):
    """What stops the command: a one-line message and its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_infer_command(commands: Any) -> None:
    """Add ``tierserve infer`` to the main parser's subcommands."""
    infer = commands.add_parser(
        "infer",
        help="run one input through a model: synchronously when small, as an async job when large",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Sends INPUT to MODEL through the Open Inference Protocol API: synchronously when it is small\n"
            f"(up to {SYNC_MAX_BYTES // 2**20} MB of .json or .npy), else as an async job (upload to S3 through a\n"
            "presigned URL, poll with backoff, download the result). Writes the OIP response to --out or stdout."
        ),
        epilog=EXAMPLES,
    )
    infer.add_argument("model", help="the model's name, e.g. iris")
    infer.add_argument("input", type=Path, help="a .json v2 infer request, a .npy tensor or a .jsonl file")
    infer.add_argument(
        "--url", help=f"the API's base URL (default ${URL_ENV}, else the running `tierserve local`)"
    )
    infer.add_argument("--model-version", help="a version of the model (default: the deployed one)")
    mode = infer.add_mutually_exclusive_group()
    mode.add_argument("--async", dest="detach", action="store_true", help="create the job, print it, return")
    mode.add_argument("--wait", action="store_true", help="run as a job even when small, and wait for it")
    infer.add_argument("--out", type=Path, help="write the result here (default stdout)")
    infer.add_argument(
        "--auth",
        choices=("auto", "iam", "api_key", "none"),
        default="auto",
        help="how to authenticate (auto)",
    )
    infer.add_argument("--api-key", help=f"the API key (default ${API_KEY_ENV})")
    infer.add_argument("--region", help="the API's region for SigV4 (default: from the URL, else AWS_REGION)")
    infer.add_argument("--timeout", type=float, default=3600.0, help="longest wait for a job, seconds (3600)")
    infer.add_argument("--work-dir", type=Path, default=Path(".tierserve"), help="as for `tierserve local`")
    infer.set_defaults(run=run_infer)


def run_infer(args: argparse.Namespace, *, stderr: TextIO | None = None) -> int:
    """The command: returns its exit code (:data:`EXIT_CODES`)."""
    err = stderr or sys.stderr
    try:
        client = ApiClient.for_args(args)
        return Infer(client, args, err).run()
    except InferError as error:
        print(f"tierserve infer: {error}", file=err)
        return error.code
    except KeyboardInterrupt:
        print("tierserve infer: interrupted (a job already created goes on; its URL was printed)", file=err)
        return 130


# ---------------------------------------------------------------- HTTP, signed


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def error(self) -> str:
        document = self.json()
        if isinstance(document, dict) and isinstance(document.get("error") or document.get("message"), str):
            return str(document.get("error") or document.get("message"))
        return self.body[:200].decode("utf-8", "replace") or f"HTTP {self.status}"


class ApiClient:
    """Requests to one API: ``sign`` adds what its auth needs to a request's headers."""

    def __init__(
        self, base_url: str, sign: Callable[[str, str, Mapping[str, str], bytes], dict[str, str]]
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.sign = sign

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> ApiClient:
        """The API the arguments name, and how to authenticate to it.

        Raises:
            InferError: no URL, or IAM auth without credentials.
        """
        url = args.url or os.environ.get(URL_ENV) or _local_api(args.work_dir)
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InferError(
                f"--url {url!r} is not an http(s) URL such as https://ID.execute-api.REGION.amazonaws.com/prod",
                EXIT_USAGE,
            )
        key = args.api_key or os.environ.get(API_KEY_ENV)
        auth = args.auth
        if auth == "auto":
            auth = "api_key" if key else "iam" if EXECUTE_API_HOST.match(parsed.hostname or "") else "none"
        if auth == "api_key":
            if not key:
                raise InferError(f"--auth api_key needs --api-key or ${API_KEY_ENV}", EXIT_USAGE)
            return cls(url, lambda method, target, headers, body: {**headers, "x-api-key": key})
        if auth == "iam":
            return cls(url, sigv4_signer(_region(args.region, parsed.hostname or "")))
        return cls(url, lambda method, target, headers, body: dict(headers))

    def request(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> Answer:
        """One request to the API at ``path`` (signed); any answer, 5xx included, comes back.

        Raises:
            InferError: nothing answered (exit 3).
        """
        url = path if path.startswith(("http://", "https://")) else self.base_url + path
        signed = self.sign(method, url, dict(headers or {}), body)
        return send(method, url, body, signed)


def send(method: str, url: str, body: bytes | BinaryIO, headers: Mapping[str, str]) -> Answer:
    """One HTTP request, unsigned (``body`` bytes, or a file with Content-Length in ``headers``)."""
    if not url.startswith(("http://", "https://")):
        raise InferError(f"{url[:80]!r} is not an http(s) URL", EXIT_UNAVAILABLE)
    request = urllib.request.Request(url, data=body or None, method=method, headers=dict(headers))  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310 - http(s) checked
            return Answer(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers.items()), error.read())
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        reason = getattr(error, "reason", error)
        raise InferError(
            f"nothing answers at {_origin(url)} ({reason}): check --url, or start the API", EXIT_UNAVAILABLE
        ) from None


def sigv4_signer(region: str) -> Callable[[str, str, Mapping[str, str], bytes], dict[str, str]]:
    """SigV4 for API Gateway (``execute-api``) with the caller's AWS credentials, as botocore finds them.

    Raises:
        InferError: no credentials.
    """
    import botocore.session
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    credentials = botocore.session.get_session().get_credentials()
    if credentials is None:
        raise InferError(
            "the API uses IAM auth and no AWS credentials were found: set AWS_PROFILE (or run "
            "`aws configure` / `aws sso login`), or pass --auth api_key --api-key KEY",
            EXIT_USAGE,
        )

    def sign(method: str, url: str, headers: Mapping[str, str], body: bytes) -> dict[str, str]:
        request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
        SigV4Auth(credentials.get_frozen_credentials(), "execute-api", region).add_auth(request)
        return dict(request.headers.items())

    return sign


def _region(given: str | None, host: str) -> str:
    found = EXECUTE_API_HOST.match(host)
    region = (
        given
        or (found.group(1) if found else None)
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
    )
    if not region:
        raise InferError(
            "cannot tell the API's region for SigV4: pass --region, or set AWS_REGION", EXIT_USAGE
        )
    return region


def _local_api(work_dir: Path) -> str:
    from tierserve.tools.local.state import LocalStackNotRunning, running_stack

    try:
        return str(running_stack(work_dir)["api_url"])
    except LocalStackNotRunning:
        raise InferError(
            f"no --url, no ${URL_ENV}, and no `tierserve local` runs for {work_dir}: pass the API's URL, "
            "or start `tierserve local`",
            EXIT_USAGE,
        ) from None


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# ---------------------------------------------------------------- the command


class Infer:
    """One ``tierserve infer``: sync or job, then the result written."""

    def __init__(self, client: ApiClient, args: argparse.Namespace, stderr: TextIO) -> None:
        self.client, self.args, self.err = client, args, stderr
        self.model = urllib.parse.quote(args.model, safe="")
        version = args.model_version
        self.base = f"/v2/models/{self.model}" + (
            f"/versions/{urllib.parse.quote(version, safe='')}" if version else ""
        )

    def run(self) -> int:
        path: Path = self.args.input
        fmt = path.suffix.lower()
        if fmt not in FORMATS:
            raise InferError(
                f"{path} is not .json, .npy or .jsonl: save the input as one of them", EXIT_USAGE
            )
        try:
            size = path.stat().st_size
        except OSError as error:
            raise InferError(f"cannot read {path}: {error.strerror}", EXIT_USAGE) from None
        as_job = self.args.detach or self.args.wait or fmt == ".jsonl" or size > SYNC_MAX_BYTES
        if not as_job:
            return self._write(self._sync(path, fmt))
        return self._job(path, fmt, size)

    # -------------------------------------------------- sync

    def _sync(self, path: Path, fmt: str) -> bytes:
        data = path.read_bytes()
        headers = {"Content-Type": "application/json"}
        if fmt == ".npy":
            data, headers = self._npy_request(data)
        answer = self.client.request("POST", f"{self.base}/infer", data, headers)
        if answer.status == 200:
            return answer.body
        if answer.status == 503 and "/jobs" in answer.error():
            print(f"tierserve infer: {answer.error()}; sending it as a job instead", file=self.err)
            return self._job_result(self._create_job(path, fmt, path.stat().st_size))
        raise self._refused(answer, "the model")

    def _npy_request(self, data: bytes) -> tuple[bytes, dict[str, str]]:
        """A .npy tensor as a binary OIP request for the model's one input (its name from the metadata)."""
        import numpy as np

        from tierserve.protocol import encode_infer_request

        metadata = self.client.request("GET", self.base)
        if metadata.status != 200:
            raise self._refused(metadata, "the model's metadata")
        inputs = (metadata.json() or {}).get("inputs") or []
        if len(inputs) != 1:
            raise InferError(
                f"a .npy file holds one tensor, and {self.args.model} takes {len(inputs)} inputs: send a .json request",
                EXIT_USAGE,
            )
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError) as error:
            raise InferError(
                f"{self.args.input} is not a .npy file ({error}): write it with numpy.save", EXIT_FAILED
            ) from None
        encoded = encode_infer_request({inputs[0]["name"]: array}, binary=True)
        return encoded.body, dict(encoded.headers)

    # -------------------------------------------------- jobs

    def _job(self, path: Path, fmt: str, size: int) -> int:
        job = self._create_job(path, fmt, size)
        if self.args.detach:
            print(json.dumps({"id": job["id"], "status": job["status"], "result": job["result"]}))
            return EXIT_OK
        return self._write(self._job_result(job))

    def _create_job(self, path: Path, fmt: str, size: int) -> dict[str, Any]:
        ask = json.dumps({"upload": {"format": fmt.lstrip("."), "bytes": size}}).encode()
        answer = self.client.request("POST", f"{self.base}/jobs", ask, {"Content-Type": "application/json"})
        if answer.status != 202:
            raise self._refused(answer, "the jobs route")
        job = answer.json()
        print(f"tierserve infer: job {job['id']} created: {job['result']}", file=self.err)
        self._upload(path, size, job["upload"])
        return job

    def _upload(self, path: Path, size: int, upload: Mapping[str, Any]) -> None:
        with path.open("rb") as file:
            body = ProgressReader(file, size, Bar(self.err, f"uploading {path.name}", size))
            answer = send("PUT", upload["url"], body, dict(upload["headers"]))  # type: ignore[arg-type]
            body.bar.close()
        if answer.status != 200:
            raise InferError(
                f"S3 refused the upload ({answer.status}: {_s3_error(answer.body)}); create a new job",
                EXIT_UNAVAILABLE,
            )

    def _job_result(self, job: Mapping[str, Any]) -> bytes:
        deadline = time.monotonic() + self.args.timeout
        wait, shown = FIRST_POLL_S, ""
        while True:
            answer = self.client.request("GET", str(job["result"]))
            if answer.status != 200:
                raise self._refused(answer, "the job's status")
            status = answer.json() or {}
            state = str(status.get("status"))
            if state == "succeeded":
                return self._download(status)
            if state == "failed":
                raise InferError(f"job {job['id']} failed: {status.get('error')}", EXIT_FAILED)
            if state != shown:
                print(f"tierserve infer: job {job['id']} {state}", file=self.err)
                shown = state
            if time.monotonic() + wait > deadline:
                raise InferError(
                    f"job {job['id']} is still {state} after {self.args.timeout:g} s; it goes on: GET {job['result']}",
                    EXIT_UNAVAILABLE,
                )
            time.sleep(wait)
            wait = min(wait * POLL_GROWTH, MAX_POLL_S)

    def _download(self, status: Mapping[str, Any]) -> bytes:
        if "result" in status:
            return json.dumps(status["result"], separators=(",", ":")).encode()
        answer = send("GET", str(status["result_url"]), b"", {})
        if answer.status != 200:
            raise InferError(
                f"S3 refused the result's download ({answer.status}: {_s3_error(answer.body)}): ask for the "
                "job's status again for a fresh URL",
                EXIT_UNAVAILABLE,
            )
        return answer.body

    # -------------------------------------------------- output

    def _write(self, body: bytes) -> int:
        out: Path | None = self.args.out
        if out is None:
            sys.stdout.buffer.write(body + b"\n")
            sys.stdout.flush()
        else:
            out.write_bytes(body)
            print(f"tierserve infer: result written to {out} ({len(body):,} bytes)", file=self.err)
        return EXIT_OK

    def _refused(self, answer: Answer, what: str) -> InferError:
        code = (
            EXIT_FAILED
            if 400 <= answer.status < 500 and answer.status not in (403, 408, 429)
            else EXIT_UNAVAILABLE
        )
        if answer.status == 403:
            code = EXIT_USAGE
        return InferError(f"{what} answered {answer.status}: {answer.error()}", code)


def _s3_error(body: bytes) -> str:
    found = re.search(rb"<Message>(.*?)</Message>", body)
    return found.group(1).decode("utf-8", "replace") if found else body[:120].decode("utf-8", "replace")


# ---------------------------------------------------------------- progress


class Bar:
    """Bytes sent out of a total on one line: redrawn on a terminal, every 10 s elsewhere."""

    LOG_EVERY_S = 10.0

    def __init__(self, stream: TextIO, label: str, total: int) -> None:
        self.stream, self.label, self.total = stream, label, max(total, 1)
        self._interactive = bool(getattr(stream, "isatty", lambda: False)())
        self._started = self._printed = time.perf_counter()
        self.done = 0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if self._interactive:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif now - self._printed >= self.LOG_EVERY_S:
            self._printed = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        width = 30
        filled = int(width * self.done / self.total)
        rate = self.done / max(time.perf_counter() - self._started, 1e-6) / 2**20
        return (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done / 2**20:,.1f}/{self.total / 2**20:,.1f} MB {rate:,.1f} MB/s"
        )

    def close(self) -> None:
        self.stream.write(("\r" if self._interactive else "") + self.line() + "\n")
        self.stream.flush()


class ProgressReader(io.RawIOBase):
    """``file`` read in chunks for an HTTP body, each chunk counted on ``bar``."""

    def __init__(self, file: BinaryIO, size: int, bar: Bar) -> None:
        self.file, self.size, self.bar = file, size, bar

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self.file.read(UPLOAD_CHUNK if size is None or size < 0 else min(size, UPLOAD_CHUNK))
        if chunk:
            self.bar.advance(len(chunk))
        return chunk

    def __len__(self) -> int:
        return self.size
