"""Every environment variable tierserve reads, the one reader that parses them, and the
settings object of the model-serving core.

Config flows one way: ``cdk.json`` context -> ``app.py`` -> construct parameters ->
function environment -> one :class:`Settings` per process, read once. An explicit
argument wins over the environment.

Each variable is a :class:`Variable`: its name, how its text becomes a value, what to set it
to and what leaving it unset means, so a bad value is one line that names the variable, the
value and the fix (:class:`SettingsError`)::

    TIERSERVE_THREADS='x' is not a whole number; set it to 1 to 256, or unset it for one per
    1,769 MB of memory (Lambda) or one per CPU (GPU server)

The core's variables are :data:`VARIABLES`; the S3 pipeline (``s3_pipeline/settings.py``) and
the GPU server (``sagemaker_hosting.py``) declare theirs with the same constructors.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

from tierserve.catalog import NAME_PATTERN, VERSION_PATTERN

MODEL_BUCKET_ENV = "TIERSERVE_MODEL_BUCKET"
MODEL_PREFIX_ENV = "TIERSERVE_MODEL_PREFIX"
MODEL_ROOT_ENV = "TIERSERVE_MODEL_ROOT"
MODELS_ENV = "TIERSERVE_MODELS"
PRELOAD_ENV = "TIERSERVE_PRELOAD"
MEMORY_BUDGET_ENV = "TIERSERVE_MEMORY_BUDGET_MB"
THREADS_ENV = "TIERSERVE_THREADS"
CACHE_DIR_ENV = "TIERSERVE_CACHE_DIR"
CACHE_MAX_MB_ENV = "TIERSERVE_CACHE_MAX_MB"
FETCH_CONNECTIONS_ENV = "TIERSERVE_FETCH_CONNECTIONS"
MAX_REQUEST_MB_ENV = "TIERSERVE_MAX_REQUEST_MB"
MAX_RESPONSE_MB_ENV = "TIERSERVE_MAX_RESPONSE_MB"
LAMBDA_MEMORY_ENV = "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
INITIALIZATION_TYPE_ENV = "AWS_LAMBDA_INITIALIZATION_TYPE"
# The S3-triggered pipeline (tierserve/s3_pipeline, read by its PipelineSettings).
DATA_BUCKET_ENV = "TIERSERVE_DATA_BUCKET"
GPU_ENDPOINTS_ENV = "TIERSERVE_GPU_ENDPOINTS"
ROW_BATCH_SIZE_ENV = "TIERSERVE_ROW_BATCH_SIZE"
MAX_INPUT_MB_ENV = "TIERSERVE_MAX_INPUT_MB"
MAX_ROWS_ENV = "TIERSERVE_MAX_ROWS"
MAX_JSONL_MB_ENV = "TIERSERVE_MAX_JSONL_MB"
WORKER_CONCURRENCY_ENV = "TIERSERVE_WORKER_CONCURRENCY"
JOBS_URL_EXPIRES_S_ENV = "TIERSERVE_JOBS_URL_EXPIRES_S"
COLD_RETRY_S_ENV = "TIERSERVE_COLD_RETRY_S"  # the S3 worker's first wait for a model with no copy
# The Kinesis stream worker (tierserve/streams, read by its StreamSettings).
OUTPUT_STREAM_ENV = "TIERSERVE_OUTPUT_STREAM"
STREAM_MODEL_ENV = "TIERSERVE_STREAM_MODEL"
# The GPU server (functions/gpu_server, read by tierserve.sagemaker_hosting.ServerSettings).
PORT_ENV = "SAGEMAKER_BIND_TO_PORT"
MODEL_DIR_ENV = "TIERSERVE_MODEL_DIR"
MAX_BATCH_SIZE_ENV = "TIERSERVE_MAX_BATCH_SIZE"
MAX_QUEUE_DELAY_MS_ENV = "TIERSERVE_MAX_QUEUE_DELAY_MS"
MAX_QUEUE_SIZE_ENV = "TIERSERVE_MAX_QUEUE_SIZE"
RUN_TIMEOUT_S_ENV = "TIERSERVE_RUN_TIMEOUT_S"
PROVIDERS_ENV = "TIERSERVE_PROVIDERS"
TRT_FP16_ENV = "TIERSERVE_TRT_FP16"
TRT_CACHE_DIR_ENV = "TIERSERVE_TRT_CACHE_DIR"
IO_BINDING_ENV = "TIERSERVE_IO_BINDING"
DRAIN_TIMEOUT_S_ENV = "TIERSERVE_DRAIN_TIMEOUT_S"

MB = 1024 * 1024
LAMBDA_MB_PER_VCPU = 1769
DEFAULT_FUNCTION_MEMORY_MB = 2048
DEFAULT_MODEL_PREFIX = "models"
DEFAULT_CACHE_DIR = "/tmp/tierserve"
DEFAULT_CACHE_MAX_MB = 1024
# Ranged GETs at once per artifact: chosen by bench.cold_start on a paced S3 (bench/README.md).
DEFAULT_FETCH_CONNECTIONS = 8
# The S3 client's connection pool (tierserve.aws POLICIES): more would wait for a connection.
MAX_FETCH_CONNECTIONS = 16
DEFAULT_MAX_REQUEST_MB = 6.0
# Lambda's synchronous response limit; API Gateway turns a larger one into a bare 502.
DEFAULT_MAX_RESPONSE_MB = 6.0
# How Lambda started this execution environment (its init phase's time limit depends on it).
INITIALIZATION_TYPES = ("on-demand", "provisioned-concurrency", "snap-start")
# What a function keeps for the runtime, numpy and request buffers, beyond the models.
RESERVED_MEMORY_MB = 384


class SettingsError(ValueError):
    """An environment variable this process cannot use; the message, one line, names the
    variable, its value and the fix."""


T = TypeVar("T")


@dataclass(frozen=True)
class Variable(Generic[T]):
    """One environment variable: ``parse`` turns its (stripped) text into a value or raises
    ValueError saying what is wrong ("is not a whole number"); ``accepted`` says what to set it
    to, ``unset`` what leaving it unset (or empty) means."""

    name: str
    parse: Callable[[str], T]
    accepted: str
    unset: str

    def read(self, env: Mapping[str, str], default: T) -> T:
        """The value in ``env``, or ``default`` when the variable is unset or empty.

        Raises:
            SettingsError: the value does not parse.
        """
        raw = env.get(self.name)
        if raw is None or not raw.strip():
            return default
        try:
            return self.parse(raw.strip())
        except ValueError as error:
            raise SettingsError(
                f"{self.name}={raw!r} {error}; set it to {self.accepted}, or unset it for {self.unset}"
            ) from None


def whole(name: str, *, unset: str, low: int = 1, high: int | None = None) -> Variable[int]:
    """A whole number from ``low`` (to ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError("is not a whole number") from None
        if value < low:
            raise ValueError(f"is under {low}")
        if high is not None and value > high:
            raise ValueError(f"is over {high}")
        return value

    accepted = f"{low} or more" if high is None else f"{low} to {high}"
    return Variable(name, parse, accepted, unset)


def number(name: str, *, unset: str, unit: str = "", zero: bool = False) -> Variable[float]:
    """A finite number over 0 (from 0 with ``zero``), e.g. a size in MB or a time in seconds."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("is not a number") from None
        if not math.isfinite(value):
            raise ValueError("is not a finite number")
        if value < 0 or (value == 0 and not zero):
            raise ValueError("is under 0" if value < 0 else "is 0")
        return value

    accepted = f"a number of {unit} " if unit else "a number "
    return Variable(name, parse, accepted + ("from 0" if zero else "over 0"), unset)


def flag(name: str, *, unset: str) -> Variable[bool]:
    """``true`` / ``false`` (also 1/0, yes/no, on/off)."""

    def parse(text: str) -> bool:
        if text.lower() in {"1", "true", "yes", "on"}:
            return True
        if text.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError("is not true or false")

    return Variable(name, parse, "true or false", unset)


def choice(name: str, choices: tuple[str, ...], *, unset: str) -> Variable[str]:
    """One of ``choices`` (any case)."""

    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"is not one of {', '.join(choices)}")
        return text.lower()

    return Variable(name, parse, ", ".join(choices[:-1]) + f" or {choices[-1]}", unset)


def path(name: str, *, unset: str) -> Variable[Path]:
    """An absolute folder path (a relative one would depend on the working directory)."""

    def parse(text: str) -> Path:
        if not text.startswith("/"):
            raise ValueError("is not an absolute path")
        return Path(text)

    return Variable(name, parse, "an absolute path such as /tmp/tierserve", unset)


# S3's rules for bucket names: 3-63 lowercase letters, digits, dots and dashes.
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _bucket_name(text: str) -> str:
    if not BUCKET_PATTERN.match(text):
        raise ValueError("is not an S3 bucket name (only the name: no s3://, no key)")
    return text


def bucket(name: str, *, unset: str) -> Variable[str]:
    """An S3 bucket name."""
    return Variable(name, _bucket_name, "the bucket's name, e.g. my-models", unset)


def _key_prefix(text: str) -> str:
    prefix = text.strip("/")  # "/" alone: the bucket's root
    if "://" in prefix or (prefix and any(part in ("", ".", "..") for part in prefix.split("/"))):
        raise ValueError("is not an S3 key prefix")
    return prefix


def _model_location(text: str) -> str:
    if text.startswith("s3://"):
        bucket_part, _, prefix = text.removeprefix("s3://").partition("/")
        if not BUCKET_PATTERN.match(bucket_part):
            raise ValueError(f"names {bucket_part!r}, which is no S3 bucket name")
        if prefix.strip("/"):
            _key_prefix(prefix)
        return text
    if text.startswith("file:///"):
        return text
    raise ValueError("is not a model location")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _model_refs(text: str) -> tuple[ModelRef, ...]:
    return tuple(ModelRef.parse(part) for part in _split(text))


def _model_names(text: str) -> tuple[str, ...]:
    names = tuple(_split(text))
    for name in names:
        if name != "*" and not NAME_PATTERN.match(name):
            raise ValueError(f"has {name!r}, which is no model name")
    return names


@contextmanager
def exit_on_bad_settings() -> Iterator[None]:
    """Stop the process with a bad variable's one line on stderr, and no traceback: Lambda
    logs that line during init (and reports ``Runtime.ExitError``), where a traceback would
    bury it."""
    try:
        yield
    except SettingsError as error:
        print(f"tierserve: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


@dataclass(frozen=True)
class ModelRef:
    """A model a process is configured to serve: ``name`` and its deployed ``version``."""

    name: str
    version: str

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``name@version``, e.g. ``ModelRef.parse("iris@3")``: the one parser of a model
        reference (``TIERSERVE_MODELS`` reads each of its parts with it).

        Raises:
            ValueError: not a catalog name, ``@`` and a version.
        """
        name, sep, version = text.strip().partition("@")
        if not sep or not NAME_PATTERN.match(name) or not VERSION_PATTERN.match(version):
            raise ValueError(f"has {text!r}, which is no name@version (e.g. iris@1)")
        return cls(name, version)

    @staticmethod
    def join(refs: Iterable[ModelRef]) -> str:
        """The ``TIERSERVE_MODELS`` value naming ``refs``: ``name@version,...``, which
        :meth:`Settings.from_env` reads back with :meth:`parse`, e.g. ``"iris@3,resnet@1"``."""
        return ",".join(str(ref) for ref in refs)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Settings:
    """What one process needs to serve models, read once from the environment."""

    model_bucket: str | None = None
    model_root: str | None = None
    model_prefix: str = DEFAULT_MODEL_PREFIX
    models: tuple[ModelRef, ...] = ()
    preload: tuple[str, ...] = ()
    function_memory_mb: int = DEFAULT_FUNCTION_MEMORY_MB
    memory_budget_mb: int = DEFAULT_FUNCTION_MEMORY_MB - RESERVED_MEMORY_MB
    threads: int = 1
    cache_dir: Path = field(default_factory=lambda: Path(DEFAULT_CACHE_DIR))
    cache_max_mb: int = DEFAULT_CACHE_MAX_MB
    fetch_connections: int = DEFAULT_FETCH_CONNECTIONS
    max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * MB)
    max_response_bytes: int = int(DEFAULT_MAX_RESPONSE_MB * MB)
    initialization_type: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); keyword overrides win.

        Raises:
            SettingsError: a variable of :data:`VARIABLES` holds a value it cannot have.
        """
        env = os.environ if environ is None else environ
        memory_mb = FUNCTION_MEMORY.read(env, DEFAULT_FUNCTION_MEMORY_MB)
        settings = cls(
            model_bucket=MODEL_BUCKET.read(env, None),
            model_root=MODEL_ROOT.read(env, None),
            model_prefix=MODEL_PREFIX.read(env, DEFAULT_MODEL_PREFIX),
            models=MODELS.read(env, ()),
            preload=PRELOAD.read(env, ()),
            function_memory_mb=memory_mb,
            memory_budget_mb=MEMORY_BUDGET.read(env, max(memory_mb - RESERVED_MEMORY_MB, 128)),
            threads=THREADS.read(env, threads_for_memory(memory_mb)),
            cache_dir=CACHE_DIR.read(env, Path(DEFAULT_CACHE_DIR)),
            cache_max_mb=CACHE_MAX_MB.read(env, DEFAULT_CACHE_MAX_MB),
            fetch_connections=FETCH_CONNECTIONS.read(env, DEFAULT_FETCH_CONNECTIONS),
            max_request_bytes=int(MAX_REQUEST_MB.read(env, DEFAULT_MAX_REQUEST_MB) * MB),
            max_response_bytes=int(MAX_RESPONSE_MB.read(env, DEFAULT_MAX_RESPONSE_MB) * MB),
            initialization_type=INITIALIZATION_TYPE.read(env, None),
        )
        return replace(settings, **overrides) if overrides else settings

    def model_ref(self, name: str) -> ModelRef | None:
        """The configured reference for ``name``, or None when this process does not serve it."""
        return next((ref for ref in self.models if ref.name == name), None)

    def should_preload(self, name: str) -> bool:
        return "*" in self.preload or name in self.preload


def threads_for_memory(memory_mb: int) -> int:
    """Lambda gives one vCPU per 1,769 MB; the host's core count says nothing about that."""
    return max(1, min(6, memory_mb // LAMBDA_MB_PER_VCPU))


# ---------------------------------------------------------------- the core's variables

MODEL_BUCKET = bucket(MODEL_BUCKET_ENV, unset=f"none (then {MODEL_ROOT_ENV} says where the models are)")
MODEL_PREFIX = Variable(
    MODEL_PREFIX_ENV, _key_prefix, "a key prefix such as models", f"the default, {DEFAULT_MODEL_PREFIX}"
)
MODEL_ROOT = Variable(
    MODEL_ROOT_ENV,
    _model_location,
    "s3://BUCKET/PREFIX or file:///FOLDER",
    f"{MODEL_BUCKET_ENV} and {MODEL_PREFIX_ENV}",
)
MODELS = Variable(MODELS_ENV, _model_refs, "name@version,... e.g. iris@1,mlp@2", "no models")
PRELOAD = Variable(
    PRELOAD_ENV, _model_names, "model names (iris,mlp) or *", "loading each model on first use"
)
FUNCTION_MEMORY = whole(
    LAMBDA_MEMORY_ENV,
    low=128,
    high=10240,
    unset=f"the default, {DEFAULT_FUNCTION_MEMORY_MB} (Lambda sets it)",
)
MEMORY_BUDGET = whole(
    MEMORY_BUDGET_ENV,
    unset=f"the memory less {RESERVED_MEMORY_MB} MB (Lambda) or less 1,024 MB (GPU server)",
)
THREADS = whole(
    THREADS_ENV,
    high=256,
    unset=f"one per {LAMBDA_MB_PER_VCPU:,} MB of memory (Lambda) or one per CPU (GPU server)",
)
CACHE_DIR = path(CACHE_DIR_ENV, unset=f"the default, {DEFAULT_CACHE_DIR}")
CACHE_MAX_MB = whole(
    CACHE_MAX_MB_ENV,
    low=0,
    unset=f"the default, {DEFAULT_CACHE_MAX_MB} (0: no disk cache, sessions hold the models)",
)
FETCH_CONNECTIONS = whole(
    FETCH_CONNECTIONS_ENV, high=MAX_FETCH_CONNECTIONS, unset=f"the default, {DEFAULT_FETCH_CONNECTIONS}"
)
MAX_REQUEST_MB = number(MAX_REQUEST_MB_ENV, unit="MB", unset=f"the default, {DEFAULT_MAX_REQUEST_MB:g}")
MAX_RESPONSE_MB = number(MAX_RESPONSE_MB_ENV, unit="MB", unset=f"the default, {DEFAULT_MAX_RESPONSE_MB:g}")


def _initialization_type(text: str) -> str:
    # A kind this version does not know (a new way to start) is kept, never refused: it must not
    # stop a function at init. Only what no kind could be is.
    if not re.fullmatch(r"[a-z0-9-]{1,64}", text.lower()):
        raise ValueError("is not a kind of start")
    return text.lower()


INITIALIZATION_TYPE = Variable(
    INITIALIZATION_TYPE_ENV,
    _initialization_type,
    ", ".join(INITIALIZATION_TYPES) + " (Lambda sets it)",
    "outside Lambda: a preload has no deadline",
)
VARIABLES: tuple[Variable, ...] = (
    MODEL_BUCKET,
    MODEL_PREFIX,
    MODEL_ROOT,
    MODELS,
    PRELOAD,
    FUNCTION_MEMORY,
    MEMORY_BUDGET,
    THREADS,
    CACHE_DIR,
    CACHE_MAX_MB,
    FETCH_CONNECTIONS,
    MAX_REQUEST_MB,
    MAX_RESPONSE_MB,
    INITIALIZATION_TYPE,
)


# ---------------------------------------------------------------- the GPU tier, seen from a caller

# SageMaker's names: an endpoint ^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}, an inference component
# ^[a-zA-Z0-9]([\-a-zA-Z0-9]*[a-zA-Z0-9])?, 63 characters at most.
SAGEMAKER_NAME_MAX = 63
ENDPOINT_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
COMPONENT_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?$")


@dataclass(frozen=True)
class GpuTarget:
    """Where a GPU-tier model answers: its SageMaker ``endpoint`` and, on an endpoint that hosts
    models as inference components, its ``component`` (every call names it); None for an
    endpoint that serves one model without components."""

    endpoint: str
    component: str | None = None

    def __str__(self) -> str:
        return self.endpoint if self.component is None else f"{self.endpoint}/{self.component}"

    @staticmethod
    def join(targets: Mapping[str, GpuTarget]) -> str:
        """The ``TIERSERVE_GPU_ENDPOINTS`` value for ``targets`` (model name -> target), sorted by
        model: ``big=tierserve-g5-xlarge/tierserve-big-g5-xlarge,...``, which
        :func:`parse_gpu_targets` reads back."""
        return ",".join(f"{name}={targets[name]}" for name in sorted(targets))


def parse_gpu_targets(text: str) -> dict[str, GpuTarget]:
    """``"big=ep/big-ic,huge=ep2"`` -> ``{"big": GpuTarget("ep", "big-ic"), "huge": GpuTarget("ep2")}``.

    Raises:
        ValueError: an entry that is not ``model=endpoint-name[/component-name]`` with names
            SageMaker accepts, or a model given twice.
    """
    targets: dict[str, GpuTarget] = {}
    for part in _split(text):
        name, sep, where = (s.strip() for s in part.partition("="))
        endpoint, slash, component = (s.strip() for s in where.partition("/"))
        if (
            not sep
            or not NAME_PATTERN.match(name)
            or not ENDPOINT_NAME_PATTERN.match(endpoint)
            or (slash and not COMPONENT_NAME_PATTERN.match(component))
        ):
            raise ValueError(f"has {part!r}, which is no model=endpoint-name[/component-name]")
        if name in targets:
            raise ValueError(f"names model {name!r} twice")
        targets[name] = GpuTarget(endpoint, component if slash else None)
    return targets


# The S3 worker's (s3_pipeline/settings.py) and the local stack's map of GPU-tier models.
GPU_ENDPOINTS = Variable(
    GPU_ENDPOINTS_ENV,
    parse_gpu_targets,
    "model=endpoint-name[/component-name],... e.g. big=tierserve-g5-xlarge/tierserve-big-g5-xlarge",
    "serving every model in the worker",
)


# The S3 pipeline's key layout: inputs/{model}/{path} -> outputs/ or errors/ (never under inputs/).
INPUT_PREFIX = "inputs"
OUTPUT_PREFIX = "outputs"
ERROR_PREFIX = "errors"
# The input formats of the S3 pipeline (and of jobs), by extension (tierserve.s3_pipeline.formats).
INPUT_FORMATS = (".json", ".jsonl", ".npy", ".bin")
# Async jobs (tierserve.jobs.keys): one folder per job, expired by its own lifecycle rule:
# jobs/{model}/{caller}/{id}/job.json and {version}/input.{ext} -> {version}/output.json | error.json
JOBS_PREFIX = "jobs"
JOB_RECORD_NAME = "job.json"
JOB_INPUT_NAME = "input"
JOB_RESULT_NAMES: Mapping[str, str] = {OUTPUT_PREFIX: "output.json", ERROR_PREFIX: "error.json"}
# What ends every job input's key, and nothing else of a job's: the notification's filters.
JOB_INPUT_SUFFIXES = tuple(f"/{JOB_INPUT_NAME}{fmt}" for fmt in INPUT_FORMATS)
# Bulk inference (tierserve.batch): key lists it reads, S3 Inventory reports, and each run's summary.
MANIFEST_PREFIX = "manifests"
INVENTORY_PREFIX = "inventory"
SUMMARY_PREFIX = "batch-summaries"

# Dynamic batching defaults of the GPU server; cdk.json's gpu_max_* context starts from these.
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_DELAY_MS = 5.0
