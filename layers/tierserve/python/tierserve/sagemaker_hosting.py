"""The SageMaker hosting contract over the data plane: what the GPU server answers.

    GET  /ping          200 once every served model is loaded and warmed, and while each
                        loaded model stays ready (a dead or stuck batcher is not), else 503
    POST /invocations   an OIP infer request for the endpoint's model (JSON or binary)
    the OIP routes      /v2, /v2/health/*, /v2/models/...: :data:`tierserve.routes.ROUTES`

:data:`SAGEMAKER_ROUTES` and the OIP routes make one :class:`~tierserve.routes.Router`;
``functions/gpu_server`` serves :meth:`ModelHost.respond` over HTTP (:mod:`tierserve.asgi`).

SageMaker hands a caller's headers to the container only through
``X-Amzn-SageMaker-Custom-Attributes``, so the binary extension's
``Inference-Header-Content-Length`` also arrives as the custom attribute
``inference-header-content-length=N`` (or, as Triton's SageMaker clients send it, as
``json-header-size=N`` in the Content-Type). A binary response carries the same attribute
in its ``X-Amzn-SageMaker-Custom-Attributes`` header, which SageMaker returns to the caller
as ``CustomAttributes``.

Where the model comes from, first match wins:

1. ``TIERSERVE_MODEL_BUCKET`` (or ``TIERSERVE_MODEL_ROOT``) with ``TIERSERVE_MODELS``: the
   same S3 layout and manifests as the Lambda tier;
2. the SageMaker model data directory (``TIERSERVE_MODEL_DIR``, default ``/opt/ml/model``)
   holding ``manifest.json`` and the artifact it names (a packaged model folder, as
   ``tierserve package`` writes it, tarred as the SageMaker ``ModelDataUrl``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np

from tierserve.audit import request_id_from
from tierserve.batching import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_DELAY_MS,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_RUN_TIMEOUT_S,
    BatchingConfig,
    BatchingModel,
    batchable,
    batching_factory,
)
from tierserve.capture import Capture
from tierserve.catalog import MANIFEST_NAME, Manifest, ManifestError
from tierserve.dataplane import DataPlane
from tierserve.errors import ArtifactRejected, BadRequest, ModelNotFound, ModelUnavailable, TierserveError
from tierserve.execution_providers import (
    DEFAULT_TRT_CACHE_DIR,
    IO_BINDING_MODES,
    ProviderConfig,
    choose_providers,
    missing_providers,
    onnx_model_factory,
    provider_names,
    runs_on_gpu,
)
from tierserve.model import Model
from tierserve.protocol import DATATYPES, HEADER_LENGTH, header
from tierserve.registry import ModelRegistry
from tierserve.routes import ROUTE_HELP, ROUTES, HttpRequest, HttpResponse, Route, Router, encode_result
from tierserve.sagemaker_model import MODEL_ATTRIBUTE, parse_custom_attributes
from tierserve.settings import (
    DRAIN_TIMEOUT_S_ENV,
    IO_BINDING_ENV,
    MAX_BATCH_SIZE_ENV,
    MAX_QUEUE_DELAY_MS_ENV,
    MAX_QUEUE_SIZE_ENV,
    MB,
    MEMORY_BUDGET_ENV,
    MODEL_BUCKET_ENV,
    MODEL_DIR_ENV,
    MODEL_ROOT_ENV,
    MODELS_ENV,
    PORT_ENV,
    PROVIDERS_ENV,
    RUN_TIMEOUT_S_ENV,
    THREADS_ENV,
    TRT_CACHE_DIR_ENV,
    TRT_FP16_ENV,
    ModelRef,
    Settings,
    Variable,
    choice,
    flag,
    number,
    path,
    whole,
)
from tierserve.stats import STATS_ROUTES, StatisticsEndpoint
from tierserve.store import ArtifactStore, FileSource
from tierserve.telemetry import flush_metrics, logger, stopwatch

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
JSON_HEADER_SIZE = "json-header-size"  # Triton's Content-Type parameter for the same length
DEFAULT_PORT = 8080
DEFAULT_MODEL_DIR = "/opt/ml/model"
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# What the server keeps for Python, numpy and request buffers when it sizes the model budget.
RESERVED_HOST_MB = 1024
LOAD_RETRY_S = (1.0, 30.0)  # first and longest wait between load attempts
METRICS_FLUSH_S = 60.0


def _providers(text: str) -> tuple[str, ...] | None:
    try:
        return ProviderConfig.parse_requested(text)
    except ValueError:
        raise ValueError("names an execution provider this server does not know") from None


PORT = whole(PORT_ENV, high=65535, unset=f"the default, {DEFAULT_PORT} (SageMaker's)")
MODEL_DIR = path(MODEL_DIR_ENV, unset=f"the default, {DEFAULT_MODEL_DIR}")
MAX_BATCH_SIZE = whole(MAX_BATCH_SIZE_ENV, high=4096, unset=f"the default, {DEFAULT_MAX_BATCH_SIZE}")
MAX_QUEUE_DELAY_MS = number(
    MAX_QUEUE_DELAY_MS_ENV,
    unit="milliseconds",
    zero=True,
    unset=f"the default, {DEFAULT_MAX_QUEUE_DELAY_MS:g}",
)
MAX_QUEUE_SIZE = whole(MAX_QUEUE_SIZE_ENV, unset=f"the default, {DEFAULT_MAX_QUEUE_SIZE}")
RUN_TIMEOUT_S = number(RUN_TIMEOUT_S_ENV, unit="seconds", unset=f"the default, {DEFAULT_RUN_TIMEOUT_S:g}")
PROVIDERS = Variable(
    PROVIDERS_ENV,
    _providers,
    "auto, or a list such as cuda,cpu (tensorrt, cuda, cpu or full onnxruntime names)",
    "auto (TensorRT, CUDA, CPU as available)",
)
TRT_FP16 = flag(TRT_FP16_ENV, unset="true")
TRT_CACHE_DIR = path(TRT_CACHE_DIR_ENV, unset=f"the default, {DEFAULT_TRT_CACHE_DIR}")
IO_BINDING = choice(IO_BINDING_ENV, IO_BINDING_MODES, unset="auto (on when a GPU provider leads)")
DRAIN_TIMEOUT_S = number(
    DRAIN_TIMEOUT_S_ENV, unit="seconds", zero=True, unset=f"the default, {DEFAULT_DRAIN_TIMEOUT_S:g}"
)
VARIABLES: tuple[Variable, ...] = (
    PORT,
    MODEL_DIR,
    MAX_BATCH_SIZE,
    MAX_QUEUE_DELAY_MS,
    MAX_QUEUE_SIZE,
    RUN_TIMEOUT_S,
    PROVIDERS,
    TRT_FP16,
    TRT_CACHE_DIR,
    IO_BINDING,
    DRAIN_TIMEOUT_S,
)


@dataclass(frozen=True)
class ServerSettings:
    """The GPU server's own settings (the models' are :class:`~tierserve.settings.Settings`)."""

    port: int = DEFAULT_PORT
    model_dir: Path = field(default_factory=lambda: Path(DEFAULT_MODEL_DIR))
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    providers: ProviderConfig = field(default_factory=ProviderConfig)
    io_binding: str = "auto"
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        """Read the environment (default ``os.environ``); keyword overrides win.

        Raises:
            SettingsError: a variable of :data:`VARIABLES` holds a value it cannot have; the
                message names the variable, the value and the fix.
        """
        env = os.environ if environ is None else environ
        settings = cls(
            port=PORT.read(env, DEFAULT_PORT),
            model_dir=MODEL_DIR.read(env, Path(DEFAULT_MODEL_DIR)),
            batching=BatchingConfig(
                max_batch_size=MAX_BATCH_SIZE.read(env, DEFAULT_MAX_BATCH_SIZE),
                max_queue_delay_ms=MAX_QUEUE_DELAY_MS.read(env, DEFAULT_MAX_QUEUE_DELAY_MS),
                max_queue_size=MAX_QUEUE_SIZE.read(env, DEFAULT_MAX_QUEUE_SIZE),
                run_timeout_s=RUN_TIMEOUT_S.read(env, DEFAULT_RUN_TIMEOUT_S),
            ),
            providers=ProviderConfig(
                requested=PROVIDERS.read(env, None),
                trt_fp16=TRT_FP16.read(env, True),
                trt_cache_dir=TRT_CACHE_DIR.read(env, Path(DEFAULT_TRT_CACHE_DIR)),
            ),
            io_binding=IO_BINDING.read(env, "auto"),
            drain_timeout_s=DRAIN_TIMEOUT_S.read(env, DEFAULT_DRAIN_TIMEOUT_S),
        )
        return replace(settings, **overrides) if overrides else settings


# ---------------------------------------------------------------- where the model comes from


class ModelDirSource:
    """The SageMaker model data directory seen as a store: ``{name}/{version}/x`` -> ``x``."""

    def __init__(self, root: Path, ref: ModelRef) -> None:
        self._files = FileSource(root)
        self._prefix = f"{ref.name}/{ref.version}/"

    def _key(self, key: str) -> str:
        if not key.startswith(self._prefix):
            raise ModelUnavailable(f"the model directory holds {self._prefix.rstrip('/')}, not {key!r}")
        return key[len(self._prefix) :]

    def describe(self, key: str) -> str:
        return self._files.describe(self._key(key))

    def open(self, key: str) -> IO[bytes]:
        return self._files.open(self._key(key))


def model_dir_ref(model_dir: Path) -> ModelRef:
    """The model a SageMaker model directory holds, from its ``manifest.json``.

    Raises:
        ModelUnavailable / ArtifactRejected: no manifest there, or not a valid one.
    """
    path = model_dir / MANIFEST_NAME
    try:
        manifest = Manifest.from_json(path.read_bytes())
    except FileNotFoundError:
        raise ModelUnavailable(
            f"no model configured: set {MODEL_BUCKET_ENV} and {MODELS_ENV}, or put a packaged model "
            f"(manifest.json and its artifact) in {model_dir} ({MODEL_DIR_ENV})"
        ) from None
    except (ValueError, ManifestError) as error:
        raise ArtifactRejected(f"{path} is not a valid manifest: {error}") from None
    return ModelRef(manifest.name, manifest.version)


def server_model_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """:class:`Settings` for a long-running server: the memory budget from the host's memory and
    onnxruntime threads from its cores, unless the environment sets them (the Lambda defaults
    derive both from the function's memory size, which a SageMaker instance does not have)."""
    env = os.environ if environ is None else environ
    overrides: dict[str, Any] = {}
    if not (env.get(MEMORY_BUDGET_ENV) or "").strip():
        overrides["memory_budget_mb"] = max(host_memory_mb() - RESERVED_HOST_MB, 512)
    if not (env.get(THREADS_ENV) or "").strip():
        overrides["threads"] = len(os.sched_getaffinity(0))
    return Settings.from_env(env, **overrides)


def host_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MB


def build_registry(
    server: ServerSettings,
    environ: Mapping[str, str] | None = None,
    *,
    available: Sequence[str] | None = None,
) -> ModelRegistry:
    """The registry the server loads its models into: their source (S3 or the model directory),
    execution providers, IO binding and dynamic batching, all from the settings.

    Raises:
        ModelUnavailable / ArtifactRejected: no model is configured, or its manifest is invalid.
    """
    env = os.environ if environ is None else environ
    settings = server_model_settings(env)
    store_factory: Callable[[], ArtifactStore] | None = None
    if env.get(MODEL_BUCKET_ENV) or env.get(MODEL_ROOT_ENV):
        if not settings.models:
            raise ModelUnavailable(f"{MODELS_ENV} must name the model(s) to serve, e.g. resnet@1")
    else:
        ref = model_dir_ref(server.model_dir)
        settings = replace(settings, models=(ref,))
        store_factory = partial(
            ArtifactStore,
            ModelDirSource(server.model_dir, ref),
            settings.cache_dir,
            settings.cache_max_mb * MB,
        )
    for name in missing_providers(server.providers, available):
        logger.warning(
            "execution provider asked for is not in this onnxruntime build", extra={"provider": name}
        )
    providers = choose_providers(server.providers, available)
    factory = batching_factory(
        onnx_model_factory(server.io_binding, server.providers.device_id), server.batching
    )
    logger.info(
        "GPU server configured",
        extra={
            "models": [str(r) for r in settings.models],
            "providers": provider_names(providers),
            "max_batch_size": server.batching.max_batch_size,
            "max_queue_delay_ms": server.batching.max_queue_delay_ms,
            "threads": settings.threads,
        },
    )
    return ModelRegistry(settings, store_factory, providers=providers, model_factory=factory)


# ---------------------------------------------------------------- warm-up


def example_inputs(manifest: Manifest, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Zeros shaped by the signature: a dynamic first dimension becomes ``batch_size``, any
    other dynamic dimension 1 (BYTES inputs get empty strings)."""
    inputs = {}
    for spec in manifest.inputs:
        shape = tuple(
            size if size >= 0 else (batch_size if index == 0 else 1) for index, size in enumerate(spec.shape)
        )
        dtype = DATATYPES[spec.datatype]
        inputs[spec.name] = np.full(shape, "", dtype=object) if dtype.kind == "O" else np.zeros(shape, dtype)
    return inputs


def warm_up(model: Model, batch_sizes: Sequence[int] = (1,)) -> list[float]:
    """Run the model on :func:`example_inputs` once per batch size; returns the milliseconds.

    The first run allocates the device arenas, picks cuDNN algorithms and, under TensorRT,
    builds the engine; running the largest batch too makes TensorRT's shape profile cover
    every batch the server will form, so no request pays for a rebuild. A batching model is
    warmed through the model it wraps: an engine build may take minutes, longer than a
    request may wait in the batcher's queue.

    Raises:
        Whatever the model raises, except :class:`BadRequest` (the model refuses synthetic
        input but runs: a warning, not a failure).
    """
    target = model.inner if isinstance(model, BatchingModel) else model
    timings = []
    for batch_size in batch_sizes:
        with stopwatch() as elapsed:
            try:
                target.predict(example_inputs(model.manifest, batch_size))
            except BadRequest as error:
                logger.warning(
                    "the model refused the warm-up input; it is loaded, its first request warms it up",
                    extra={"model": model.manifest.name, "error": error.message},
                )
        timings.append(round(elapsed[0], 1))
    return timings


def warm_up_batch_sizes(model: Model, batching: BatchingConfig) -> tuple[int, ...]:
    on_gpu = runs_on_gpu(getattr(model, "providers", ()))
    if on_gpu and batching.enabled and batchable(model.manifest):
        return (1, batching.max_batch_size)
    return (1,)


# ---------------------------------------------------------------- the host


class ModelHost:
    """Loads and warms the served models in the background and answers every route.

    ``/ping`` (and ``/v2/health/ready``) say 503 until each model is loaded and warmed; a
    failed load is retried with backoff (the store may be briefly unavailable), and its
    reason is in the 503 body and the logs. Once ready, they ask each loaded model again on
    every call: a model that stops being ready (its batcher died or a run is stuck) turns
    them to 503, so SageMaker replaces the instance.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        server: ServerSettings,
        *,
        retry_s: tuple[float, float] = LOAD_RETRY_S,
        capture: Capture | None = None,
    ) -> None:
        self.registry = registry
        self.server = server
        self.capture = capture  # drift: a sample of requests to S3 (tierserve.capture), never in the way
        self.dataplane = DataPlane(registry, readiness=self._not_ready_reason, capture=capture)
        self.statistics = StatisticsEndpoint(registry.resolve, lambda: registry.settings.models)
        self.router = Router(
            (SAGEMAKER_ROUTES, self),
            (STATS_ROUTES, self.statistics),
            (ROUTES, self.dataplane),
            max_response_bytes=registry.settings.max_response_bytes,
            help=SAGEMAKER_HELP,
            tier="gpu",
        )
        self._retry_s = retry_s
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._status = "loading"
        self._loader: threading.Thread | None = None
        self._flusher: threading.Thread | None = None

    @property
    def models(self) -> tuple[ModelRef, ...]:
        return self.registry.settings.models

    @property
    def ready(self) -> bool:
        return self._not_ready_reason() is None

    def _not_ready_reason(self) -> str | None:
        """Why the host cannot serve now, or None. A model evicted from the registry is not a
        reason: the next request for it loads it again."""
        if not self._ready.is_set():
            return self._status
        for ref in self.models:
            model = self.registry.loaded(ref)
            if model is not None and not model.ready():
                return f"{ref} stopped serving (its batcher died or a run is stuck)"
        return None

    def start(self) -> ModelHost:
        """Start loading in the background (the server answers /ping with 503 meanwhile)."""
        self._loader = threading.Thread(target=self._load_all, name="tierserve-loader", daemon=True)
        self._loader.start()
        self._flusher = threading.Thread(target=self._flush_metrics, name="tierserve-metrics", daemon=True)
        self._flusher.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _load_all(self) -> None:
        delay = self._retry_s[0]
        while not self._stopping.is_set():
            try:
                for ref in self.models:
                    self._status = f"loading {ref}"
                    model = self.registry.get(ref)
                    self._status = f"warming up {ref}"
                    sizes = warm_up_batch_sizes(model, self.server.batching)
                    logger.info(
                        "model ready",
                        extra={
                            "model": str(ref),
                            "warm_up_ms": warm_up(model, sizes),
                            "warm_up_batch_sizes": list(sizes),
                            "execution_providers": list(getattr(model, "providers", ())),
                        },
                    )
            except Exception as error:
                message = error.message if isinstance(error, TierserveError) else type(error).__name__
                self._status = f"{self._status} failed: {message}; retrying in {delay:.0f} s"
                logger.exception("model load failed; retrying", extra={"retry_in_s": delay})
                self._stopping.wait(delay)
                delay = min(delay * 2, self._retry_s[1])
                continue
            self._status = "ready"
            self._ready.set()
            return

    def _flush_metrics(self) -> None:
        while not self._stopping.wait(METRICS_FLUSH_S):
            flush_metrics()

    def close(self) -> None:
        """Stop loading, let queued batches finish, publish the last metrics."""
        self._stopping.set()
        for ref in self.models:
            model = self.registry.loaded(ref)
            if isinstance(model, BatchingModel):
                model.close()
                logger.info(
                    "dynamic batching since load", extra={"model": str(ref), **model.stats_snapshot()}
                )
        if self.capture is not None:
            self.capture.close()  # what it still holds is written before the process goes
        flush_metrics()

    # ------------------------------------------------------------ routes

    def respond(self, request: HttpRequest) -> HttpResponse:
        """Answer one HTTP request: the SageMaker routes, Triton's statistics, then every OIP
        route. SageMaker hands the container no caller: the audit names ``sagemaker`` for
        ``/invocations`` and ``direct`` for the OIP routes (reached only from the host)."""
        caller = request.caller or ("sagemaker" if request.path.rstrip("/") == "/invocations" else "direct")
        return self.router.serve(
            replace(request, caller=caller, request_id=request.request_id or request_id_from(request.headers))
        )

    def ping(self) -> dict[str, Any]:
        """``GET /ping``: the served models, once all are loaded, warmed and still ready.

        Raises:
            ModelUnavailable: not ready yet, or no longer (503, the reason in the message).
        """
        reason = self._not_ready_reason()
        if reason is not None:
            raise ModelUnavailable(f"not ready: {reason}")
        return {"status": "ready", "models": [str(r) for r in self.models]}

    def invoke(self, body: bytes, headers: Mapping[str, str]) -> HttpResponse:
        """``POST /invocations``: an OIP infer request for the endpoint's model, answered with
        the binary extension's header length also in the custom attributes (SageMaker returns
        only those to the caller)."""
        attributes = parse_custom_attributes(header(headers, CUSTOM_ATTRIBUTES))
        ref = self._target(header(attributes, MODEL_ATTRIBUTE))
        result = self.dataplane.infer(ref.name, body, invocation_headers(headers, attributes))
        response = encode_result(result, self.router.max_response_bytes, self.router.measure)
        length = header(response.headers, HEADER_LENGTH)
        if length is None:
            return response
        # Answer in the caller's form: API Gateway maps a bare number back into the header.
        bare = (header(headers, CUSTOM_ATTRIBUTES) or "").strip().isdigit()
        attribute = length if bare else f"{HEADER_LENGTH}={length}"
        return HttpResponse(
            response.status, response.body, {**response.headers, CUSTOM_ATTRIBUTES: attribute}
        )

    def _target(self, name: str | None) -> ModelRef:
        if name:
            return self.registry.resolve(name)
        if len(self.models) == 1:
            return self.models[0]
        served = ", ".join(str(r) for r in self.models)
        raise ModelNotFound(
            f"this endpoint serves {served}: name one with the custom attribute {MODEL_ATTRIBUTE}=NAME"
        )


SAGEMAKER_ROUTES: tuple[Route, ...] = (
    Route("GET", "/ping", ModelHost.ping),
    Route("POST", "/invocations", ModelHost.invoke, takes_body=True, audited=True),
)
SAGEMAKER_HELP = (
    "SageMaker: GET /ping, POST /invocations; statistics: GET /v2/models[/{model}[/versions/{v}]]/stats; OIP "
    + ROUTE_HELP
)


def invocation_headers(headers: Mapping[str, str], attributes: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with ``Inference-Header-Content-Length`` filled in from where a SageMaker
    caller can put it: the custom attribute, or ``json-header-size`` in the Content-Type."""
    merged = dict(headers)
    if header(merged, HEADER_LENGTH) is not None:
        return merged
    length = header(attributes, HEADER_LENGTH)
    if length is None:
        for parameter in (header(merged, "Content-Type") or "").split(";")[1:]:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == JSON_HEADER_SIZE:
                length = value.strip()
    if length is not None:
        merged[HEADER_LENGTH] = length
    return merged


def build_host(environ: Mapping[str, str] | None = None, **overrides: Any) -> ModelHost:
    """Settings from the environment, the registry, and the host (not yet loading)."""
    server = ServerSettings.from_env(environ, **overrides)
    return ModelHost(build_registry(server, environ), server, capture=Capture.from_env(environ))
