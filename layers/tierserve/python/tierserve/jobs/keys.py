"""Where a job lives in the data bucket, and whose it is: one folder per job.

    jobs/{model}/{caller}/{id}/job.json                    the job: version, format, when, upload expiry
    jobs/{model}/{caller}/{id}/{version}/input.{ext}       its input (the S3 pipeline's trigger)
    jobs/{model}/{caller}/{id}/{version}/output.json       its result, written by the worker
    jobs/{model}/{caller}/{id}/{version}/error.json        or the reason it failed

One ListObjectsV2 of the folder is the job's whole status. ``{caller}`` is a digest of the
caller's identity (:func:`caller_of`): a key never holds an ARN or an API key id, every
caller's keys have one length, and no identity can reach another's folder. ``{id}`` is 128
random bits in hex. The model comes first, so the status route (which names the model) finds
nothing of another model's job. The pipeline's notification takes ``jobs/`` with the suffixes
``/input.{ext}`` (:func:`input_suffixes`), so neither records nor results can trigger it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from tierserve.s3_pipeline.events import InputKey
from tierserve.settings import JOB_INPUT_NAME, JOB_INPUT_SUFFIXES, JOB_RECORD_NAME, JOBS_PREFIX

ID_BYTES = 16  # 128 random bits
ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
CALLER_DIGEST_CHARS = 32
ANONYMOUS = "anonymous"


def new_job_id() -> str:
    """128 bits from the operating system's CSPRNG, as 32 hex digits."""
    return secrets.token_hex(ID_BYTES)


def caller_of(caller: str) -> str:
    """The ``{caller}`` segment of a caller's keys: a digest of who called, as the transport
    names them (:func:`tierserve.audit.api_gateway_caller`: ``iam:{userArn}`` with ``auth=iam``,
    ``api_key:{apiKeyId}`` with ``auth=api_key``; empty is ``anonymous``)."""
    digest = hashlib.sha256((caller or ANONYMOUS).encode()).hexdigest()
    return digest[:CALLER_DIGEST_CHARS]


@dataclass(frozen=True)
class JobKeys:
    """The keys of one job: ``model``'s job ``id`` for ``caller``."""

    model: str
    caller: str
    id: str

    @property
    def folder(self) -> str:
        """Everything of the job is under this prefix (it ends with ``/``)."""
        return f"{JOBS_PREFIX}/{self.model}/{self.caller}/{self.id}/"

    @property
    def record(self) -> str:
        return self.folder + JOB_RECORD_NAME

    def input(self, version: str, fmt: str) -> InputKey:
        """The input key (as the pipeline reads it) for ``version`` and format ``fmt`` (``.npy``)."""
        return InputKey(
            self.model, f"{self.caller}/{self.id}/{version}/{JOB_INPUT_NAME}{fmt}", version, f"{JOBS_PREFIX}/"
        )


def input_object_key(key: InputKey) -> str:
    """The S3 key of a job's input (``key.result_key`` names its results)."""
    return f"{key.root}{key.model}/{key.path}"


def input_suffixes() -> tuple[str, ...]:
    """The key suffixes of every job input (one notification filter each, beside ``jobs/``)."""
    return JOB_INPUT_SUFFIXES
