"""``tierserve local``: build sample models, package them, put them into an embedded S3,
and serve the Open Inference Protocol on 127.0.0.1 through the real Lambda handler, each model
in its own execution environment; the user's own packages (``--models``, ``--catalog``) too.

What it runs, and when it counts as ready (:func:`start` returns, and the state file the other
``tierserve local`` commands read is written, only once all of it answers):

    embedded S3 (moto's server)       the model bucket (every model uploaded) and the data bucket
    local API (uvicorn)               a Lambda execution environment per lambda-tier model, one for
                                      everything else; gpu-tier models forwarded to their process
    a GPU server process per          started and warmed (``/ping`` 200)
      gpu-tier model
    SageMaker runtime (loopback)      InvokeEndpoint in front of those processes, for the worker
    SQS queue, DLQ, notification      created; the poller's first poll went through the worker

``stop()`` removes the state file first, then stops everything, however the stack stops.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tierserve import capture
from tierserve.asgi import ServerThread
from tierserve.catalog import Catalog, Manifest, tier_for
from tierserve.drift.baseline import Baseline, build_baseline
from tierserve.settings import (
    CACHE_DIR_ENV,
    COLD_RETRY_S_ENV,
    DATA_BUCKET_ENV,
    GPU_ENDPOINTS_ENV,
    MODEL_BUCKET_ENV,
    MODEL_PREFIX_ENV,
    MODELS_ENV,
    OUTPUT_STREAM_ENV,
    PRELOAD_ENV,
    STREAM_MODEL_ENV,
    GpuTarget,
    ModelRef,
)
from tierserve.tools.cdk_context import InfraConfig
from tierserve.tools.local import samples
from tierserve.tools.local.api_server import LocalApi, model_in
from tierserve.tools.local.cold_gpu import ColdGpuServer, ScalingRuntime
from tierserve.tools.local.embedded_s3 import LOCAL_CREDENTIALS, EmbeddedS3, endpoint_env
from tierserve.tools.local.gpu_servers import GpuServerProcess, start_gpu_servers
from tierserve.tools.local.kinesis_stream import (
    LOCAL_STREAM_MODEL,
    RECORDS_STREAM,
    RESULTS_STREAM,
    StreamPoller,
    start_local_streams,
)
from tierserve.tools.local.packages import LocalModelsError, user_models
from tierserve.tools.local.s3_queue import DATA_BUCKET, LocalPipeline, start_local_pipeline
from tierserve.tools.local.sagemaker_runtime import SageMakerRuntime, container_at
from tierserve.tools.local.state import (
    LocalStackNotRunning,
    remove_state,
    running_stack,
    state_path,
    write_state,
)
from tierserve.tools.packaging import PackagedModel, package_model, signature_of, upload_package

REPO_ROOT = Path(__file__).resolve().parents[6]
CDK_JSON = REPO_ROOT / "cdk.json"
HANDLER_DIR = REPO_ROOT / "functions" / "inference"
LOCAL_BUCKET = "tierserve-models"
MODEL_PREFIX = "models"
# The one SageMaker endpoint of the local stack: each gpu-tier model is an inference component
# on it (named as the model), as every GPU-tier model is on its instance type's endpoint in AWS.
GPU_ENDPOINT = "tierserve-local-gpu"
SAGEMAKER_RUNTIME_ENV = "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"
METRICS_DISABLED_ENV = "POWERTOOLS_METRICS_DISABLED"
# The local worker's first wait for a cold model (TIERSERVE_COLD_RETRY_S): a local GPU server
# process starts in seconds, not SageMaker's minutes.
LOCAL_COLD_RETRY_S = "1"
# The execution environment that answers what no model claims (health, /v2, unknown models);
# model names start with a letter or digit, so it can never be one.
FRONT = "_api"
# Capture for drift: every request by default (a developer's traffic is small), flushed often.
DEFAULT_CAPTURE_RATE = 1.0
LOCAL_CAPTURE_BATCH = 50
LOCAL_CAPTURE_FLUSH_S = 2.0
LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]


@dataclass(frozen=True)
class Sample:
    name: str
    version: str
    build: Callable[[Path], Path]
    tier: str | None = None
    description: str = ""
    # Real rows of the model's one input: its drift baseline (tierserve drift NAME --local).
    baseline_rows: Callable[[], Any] | None = None


SAMPLES: tuple[Sample, ...] = (
    Sample(
        "iris",
        "1",
        samples.iris_classifier,
        description="scikit-learn logistic regression (skl2onnx)",
        baseline_rows=samples.iris_rows,
    ),
    Sample("mlp", "1", samples.mlp, description="4-layer perceptron, about 10 MB"),
    Sample("convnet", "1", samples.convnet, description="convolutional image classifier, 1x3x224x224 input"),
    Sample(
        "convnet-xl",
        "1",
        partial(samples.convnet, channels=64),
        tier="gpu",
        description="wider convnet on the GPU tier (a local GPU server process here, CPU provider)",
    ),
)


class LocalStackRunning(RuntimeError):
    """A ``tierserve local`` already runs for this work folder; the message names it."""


def say(step: str) -> None:
    print(f"tierserve local: {step}", file=sys.stderr, flush=True)


def package_samples(work_dir: Path, chosen: Sequence[Sample] = SAMPLES) -> list[PackagedModel]:
    """Build and package each sample once; later runs reuse what is on disk. The packages go
    under ``samples/`` of the work folder, apart from what ``tierserve package`` writes."""
    packaged = []
    for index, sample in enumerate(chosen, 1):
        out_dir = work_dir / "samples" / "packages" / sample.name / sample.version
        source = work_dir / "samples" / f"{sample.name}.onnx"
        say(f"[{index}/{len(chosen)}] {sample.name}: {sample.description}")
        if not source.exists():
            sample.build(source)
        packaged.append(
            package_model(
                source,
                name=sample.name,
                version=sample.version,
                out_dir=out_dir,
                tier=sample.tier,
                baseline=sample_baseline(sample, source),
            )
        )
    return packaged


def sample_baseline(sample: Sample, source: Path) -> Baseline | None:
    """The sample's drift baseline, from the data it was trained on (None: it has none)."""
    if sample.baseline_rows is None:
        return None
    inputs, _ = signature_of(source)
    rows = {inputs[0].name: sample.baseline_rows()}
    return build_baseline(
        sample.name, sample.version, inputs, rows, source=f"the {sample.name} training data"
    )


def lambda_max_model_mb(cdk_json: Path | None = None) -> int:
    """The tier threshold from cdk.json's context, read and validated by the CDK app's own
    reader: the local API and ``cdk synth`` read one value, and refuse a bad one alike.

    Raises:
        ConfigError: cdk.json is not JSON, or a context key is bad (``cdk synth``'s message).
    """
    return InfraConfig.from_cdk_json(cdk_json or CDK_JSON).lambda_max_model_mb


def load_handler(
    environ: dict[str, str], module: str = "api"
) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """Import (or re-import) a Lambda handler of functions/inference (``api``, or the S3
    ``worker``) with ``environ`` applied, as Lambda's init would."""
    os.environ.update(environ)
    if str(HANDLER_DIR) not in sys.path:
        sys.path.insert(0, str(HANDLER_DIR))
    loaded = (
        importlib.reload(sys.modules[module]) if module in sys.modules else importlib.import_module(module)
    )
    return loaded.handler


def new_execution_environment(environ: Mapping[str, str], *, name: str, module: str = "api") -> LambdaHandler:
    """A Lambda handler of functions/inference (``api``, or the S3 ``worker``) in an execution
    environment of its own: the module imported afresh, its init reading ``environ`` over this
    process's environment (which is left as it was), as Lambda's init reads its function's."""
    spec = importlib.util.spec_from_file_location(
        f"tierserve_local_{module}_{name}", HANDLER_DIR / f"{module}.py"
    )
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded
    if str(HANDLER_DIR) not in sys.path:
        sys.path.insert(0, str(HANDLER_DIR))
    with applied(environ):
        spec.loader.exec_module(loaded)
    return loaded.handler


@contextlib.contextmanager
def applied(environ: Mapping[str, str]) -> Iterator[None]:
    """``environ`` in ``os.environ`` for the duration, then the environment as it was."""
    saved = {name: os.environ.get(name) for name in environ}
    os.environ.update(environ)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class LocalStack:
    """Everything ``tierserve local`` runs; ``stop()`` ends it all (what started so far, when a
    start fails) and removes the state file."""

    work_dir: Path
    catalog: Catalog = field(default_factory=lambda: Catalog(()))
    s3: EmbeddedS3 | None = None
    api: LocalApi | None = None
    pipeline: LocalPipeline | None = None
    gpu_servers: list[GpuServerProcess] = field(default_factory=list)
    cold_gpu_servers: list[ColdGpuServer] = field(default_factory=list)  # --gpu-idle-s
    sagemaker: ServerThread | None = None
    sagemaker_runtime: SageMakerRuntime | None = None
    streams: StreamPoller | None = None
    state: dict[str, Any] = field(default_factory=dict)
    captured: list[str] = field(default_factory=list)  # models whose requests are captured (drift)

    def stop(self) -> None:
        remove_state(self.work_dir, os.getpid())  # first: the other commands see it stopping
        steps: list[Callable[[], object]] = []
        if self.streams is not None:
            steps.append(self.streams.stop)
        if self.pipeline is not None:
            steps.append(self.pipeline.stop)
        if self.api is not None:
            steps.append(self.api.stop)
        steps.append(capture.close_all)  # what the API captured, written while S3 still runs
        if self.sagemaker is not None:
            steps.append(self.sagemaker.stop)
        steps += [server.stop for server in self.gpu_servers]
        steps += [server.stop for server in self.cold_gpu_servers]
        if self.s3 is not None:
            steps.append(self.s3.stop)
        for step in steps:
            try:
                step()
            except Exception as error:  # one part that fails to stop must not keep the others running
                say(f"stopping: {error}")

    def wait(self) -> None:
        """Until the local API stops serving (or a signal interrupts)."""
        if self.api is not None:
            self.api.wait()


def start(
    work_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 3000,
    s3_port: int = 0,
    chosen: Sequence[Sample] = SAMPLES,
    model_dirs: Sequence[Path] = (),
    catalog_path: Path | None = None,
    gpu_idle_s: float | None = None,
    capture_rate: float = DEFAULT_CAPTURE_RATE,
) -> LocalStack:
    """Package the samples (``chosen``; none: ``()``) and take the user's packages
    (``model_dirs``, chosen by ``catalog_path`` when given), start the embedded S3, the local
    API, a GPU server process per gpu-tier model, the SageMaker runtime in front of them and
    the S3 pipeline; returns once all of it answers, with the state file written. Each
    model captures ``capture_rate`` of its requests for ``tierserve drift`` (0: none).
    With ``gpu_idle_s``, gpu-tier models run cold instead: no process until a request comes (it
    gets 503 + Retry-After while the process starts), stopped after that many idle seconds
    (:mod:`tierserve.tools.local.cold_gpu`).

    Raises:
        ConfigError: a bad cdk.json, before anything is built.
        LocalModelsError: a bad ``--models`` folder or ``--catalog``, before anything is built.
        LocalStackRunning: a stack already runs for ``work_dir``.
        OSError: the port is busy (nothing is left running).
        RuntimeError: a GPU server process did not start (nothing is left running).
    """
    threshold = lambda_max_model_mb()  # a bad cdk.json stops us before anything is built or started
    yours = user_models(model_dirs, catalog_path)
    if not chosen and not yours:
        raise LocalModelsError(
            "nothing to serve: pass --models DIR (packages from `tierserve package`), or drop --no-samples"
        )
    work_dir = work_dir.resolve()
    claim(work_dir)
    stack = LocalStack(work_dir)
    try:
        _start(
            stack,
            threshold,
            [*package_samples(work_dir, chosen), *yours],
            host=host,
            port=port,
            s3_port=s3_port,
            gpu_idle_s=gpu_idle_s,
            capture_rate=capture_rate,
        )
    except BaseException:
        stack.stop()
        raise
    return stack


def claim(work_dir: Path) -> None:
    """Make ``work_dir`` this stack's: refuse while another stack runs for it, forget the state
    file of one that died.

    Raises:
        LocalStackRunning: a stack that answers is recorded there.
    """
    if not state_path(work_dir).exists():
        return
    try:
        other = running_stack(work_dir)
    except LocalStackNotRunning:
        remove_state(work_dir)  # a dead or silent stack's: it no longer serves anything
        return
    raise LocalStackRunning(
        f"a `tierserve local` already runs for {work_dir} (pid {other['pid']}, {other.get('api_url')}): "
        "stop it first, or pass another --work-dir"
    )


def _start(
    stack: LocalStack,
    threshold: int,
    packaged: Sequence[PackagedModel],
    *,
    host: str,
    port: int,
    s3_port: int,
    gpu_idle_s: float | None = None,
    capture_rate: float = 0.0,
) -> None:
    work_dir = stack.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    packaged = _one_per_name(packaged)
    say("starting the embedded S3 on 127.0.0.1")
    stack.s3 = s3 = EmbeddedS3(port=s3_port).start()
    s3.apply_env()
    os.environ[METRICS_DISABLED_ENV] = "true"  # powertools reads it when it flushes: no EMF lines here
    client = s3.client()
    client.create_bucket(Bucket=LOCAL_BUCKET)
    for item in packaged:
        stack.catalog = stack.catalog.with_entry(
            upload_package(item, client, LOCAL_BUCKET, MODEL_PREFIX).manifest
        )
    stack.catalog.save(work_dir / "catalog.json")
    lambda_models = on_tier(stack.catalog, "lambda", threshold)
    gpu_models = on_tier(stack.catalog, "gpu", threshold)
    functions = {
        m.name: new_execution_environment(
            {**api_env(work_dir, [m], cache=m.name, preload=True), **capture_env([m], capture_rate)},
            name=m.name,
        )
        for m in lambda_models
    }
    stack.captured = [m.name for m in (*lambda_models, *gpu_models)] if capture_rate > 0 else []
    every = [e.manifest for e in stack.catalog.entries]  # so an unknown model's 404 names them all
    front = new_execution_environment(api_env(work_dir, every, preload=False, cache=FRONT), name=FRONT)
    jobs = new_execution_environment(jobs_env(work_dir, stack.catalog), name="jobs", module="jobs")
    served = [ModelRef(m.name, m.version) for m in lambda_models]
    stack.api = LocalApi(
        front, functions=functions, jobs=jobs, host=host, port=port, served=served
    )  # binds: a busy port fails here
    runtime = _start_gpu_tier(stack, gpu_models, gpu_idle_s, capture_rate)
    stack.api.start()
    sagemaker_url = None
    if runtime is not None:
        stack.sagemaker_runtime = runtime
        stack.sagemaker = runtime.serve("127.0.0.1", 0)
        sagemaker_url = f"http://127.0.0.1:{stack.sagemaker.address[1]}"
        os.environ[SAGEMAKER_RUNTIME_ENV] = sagemaker_url  # the worker's client is made on first use
    say(f"S3-triggered inference: s3://{DATA_BUCKET}/inputs/ -> SQS -> the worker handler")
    worker = new_execution_environment(
        worker_env(work_dir, stack.catalog, threshold), name="worker", module="worker"
    )
    stack.pipeline = start_local_pipeline(s3, worker)
    stream_state: dict[str, str] = {}
    if stack.catalog.get(LOCAL_STREAM_MODEL) is not None:
        say(
            f"streams: Kinesis {RECORDS_STREAM} -> the stream handler ({LOCAL_STREAM_MODEL}) -> {RESULTS_STREAM}"
        )
        stream = new_execution_environment(
            stream_env(work_dir, stack.catalog, threshold), name="stream", module="stream"
        )
        stack.streams = start_local_streams(s3, stream)
        stream_state = stack.streams.state()
    state = {
        "pid": os.getpid(),
        "api_url": reachable(stack.api.url),
        "s3_endpoint": s3.endpoint,
        "model_bucket": LOCAL_BUCKET,
        "model_prefix": MODEL_PREFIX,
        **stack.pipeline.state(),
        **stream_state,
        **({"sagemaker_endpoint": sagemaker_url} if sagemaker_url else {}),
    }
    write_state(work_dir, state)  # last: whoever reads it finds everything answering
    stack.state = state


def _start_gpu_tier(
    stack: LocalStack, gpu_models: Sequence[Manifest], gpu_idle_s: float | None, capture_rate: float
) -> SageMakerRuntime | None:
    """A GPU server process per gpu-tier model, started and warmed (or, with ``gpu_idle_s``,
    cold: started by the first request), routed from the local API, capturing ``capture_rate``
    of its requests; the SageMaker runtime in front of them for the worker (None without
    gpu-tier models)."""
    if not gpu_models:
        return None
    env = {**gpu_env(stack.work_dir), **capture_env(gpu_models, capture_rate), DATA_BUCKET_ENV: DATA_BUCKET}
    refs = [ModelRef(m.name, m.version) for m in gpu_models]
    names = ", ".join(m.name for m in gpu_models)
    assert stack.api is not None
    logs = stack.work_dir / "logs"
    if gpu_idle_s is not None:
        say(f"gpu-tier models cold (start on the first request, stop after {gpu_idle_s:g} s idle): {names}")
        stack.cold_gpu_servers = [ColdGpuServer(ref, env, log_dir=logs, idle_s=gpu_idle_s) for ref in refs]
        stack.api.upstreams.update({server.ref.name: server.forward for server in stack.cold_gpu_servers})
        return ScalingRuntime({s.ref.name: s for s in stack.cold_gpu_servers}, endpoint=GPU_ENDPOINT)
    say(f"starting a GPU server process per gpu-tier model: {names}")
    stack.gpu_servers = start_gpu_servers(refs, env, log_dir=logs)
    stack.api.upstreams.update({server.ref.name: server.url for server in stack.gpu_servers})
    return SageMakerRuntime(
        {s.ref.name: container_at(s.url) for s in stack.gpu_servers},
        components={s.ref.name: GPU_ENDPOINT for s in stack.gpu_servers},
    )


def _one_per_name(packaged: Sequence[PackagedModel]) -> list[PackagedModel]:
    """The user's package wins over a sample of the same name (they come after the samples)."""
    by_name: dict[str, PackagedModel] = {}
    for item in packaged:
        if item.manifest.name in by_name:
            say(f"{item.manifest.name}: serving {item.directory} in place of the sample")
        by_name[item.manifest.name] = item
    return list(by_name.values())


def reachable(url: str) -> str:
    """``url`` as another process on this machine reaches it (a server bound to every interface
    answers on 127.0.0.1)."""
    for anywhere in ("//0.0.0.0:", "//[::]:"):
        url = url.replace(anywhere, "//127.0.0.1:")
    return url


def on_tier(catalog: Catalog, tier: str, threshold: int | None = None) -> list[Manifest]:
    """The catalog's models on ``tier`` (``lambda`` or ``gpu``), by the one tier rule."""
    threshold = lambda_max_model_mb() if threshold is None else threshold
    return [e.manifest for e in catalog.entries if tier_for(e.manifest, threshold) == tier]


def _model_env(work_dir: Path, models: Sequence[Manifest], cache: str) -> dict[str, str]:
    return {
        MODEL_BUCKET_ENV: LOCAL_BUCKET,
        MODEL_PREFIX_ENV: MODEL_PREFIX,
        MODELS_ENV: ModelRef.join(ModelRef(m.name, m.version) for m in models),
        CACHE_DIR_ENV: str(work_dir.resolve() / "cache" / cache),
        METRICS_DISABLED_ENV: "true",
    }


def api_env(
    work_dir: Path, models: Sequence[Manifest], *, cache: str, preload: bool = False
) -> dict[str, str]:
    """The API function's variables for ``models`` in the local stack (the embedded S3's
    endpoint comes from the caller's environment). Each execution environment has a cache
    folder of its own (``cache/{cache}``), as each function has its own /tmp."""
    return {
        **_model_env(work_dir, models, cache),
        DATA_BUCKET_ENV: DATA_BUCKET,
        PRELOAD_ENV: "*" if preload else "",
    }


def jobs_env(work_dir: Path, catalog: Catalog) -> dict[str, str]:
    """The jobs function's variables: every model of ``catalog`` (both tiers: it only names
    them), the data bucket its jobs live in."""
    return {
        **_model_env(work_dir, [e.manifest for e in catalog.entries], "_jobs"),
        DATA_BUCKET_ENV: DATA_BUCKET,
        PRELOAD_ENV: "",
    }


def capture_env(models: Sequence[Manifest], rate: float) -> dict[str, str]:
    """Capture ``rate`` of the requests of ``models`` (into the data bucket), written in small
    batches every few seconds so that ``tierserve drift --local`` soon sees them; 0: no capture."""
    if rate <= 0:
        return {capture.CAPTURE_ENV: ""}
    rules = {m.name: capture.CaptureRule(rate) for m in models}
    return {
        capture.CAPTURE_ENV: capture.join_rules(rules),
        capture.CAPTURE_BATCH_ENV: str(LOCAL_CAPTURE_BATCH),
        capture.CAPTURE_FLUSH_S_ENV: str(LOCAL_CAPTURE_FLUSH_S),
    }


def worker_env(
    work_dir: Path, catalog: Catalog, threshold: int | None = None, *, cache: str = "_worker"
) -> dict[str, str]:
    """The S3 worker's variables (and the batch function's): every model of ``catalog``, the
    gpu-tier ones at their inference component of the local SageMaker endpoint
    (``TIERSERVE_GPU_ENDPOINTS``, as the pipeline stack sets it in AWS); models load on first use."""
    gpu = {m.name: GpuTarget(GPU_ENDPOINT, m.name) for m in on_tier(catalog, "gpu", threshold)}
    return {
        **_model_env(work_dir, [e.manifest for e in catalog.entries], cache),
        DATA_BUCKET_ENV: DATA_BUCKET,
        GPU_ENDPOINTS_ENV: GpuTarget.join(gpu),
        PRELOAD_ENV: "",
        COLD_RETRY_S_ENV: LOCAL_COLD_RETRY_S,
    }


def stream_env(work_dir: Path, catalog: Catalog, threshold: int | None = None) -> dict[str, str]:
    """The stream worker's variables: the worker's, with the model it serves and the results stream."""
    return {
        **worker_env(work_dir, catalog, threshold, cache="_stream"),
        STREAM_MODEL_ENV: LOCAL_STREAM_MODEL,
        OUTPUT_STREAM_ENV: RESULTS_STREAM,
    }


def gpu_env(work_dir: Path) -> dict[str, str]:
    """What every GPU server process reads beyond its model (its S3 endpoint is the caller's)."""
    return {
        MODEL_BUCKET_ENV: LOCAL_BUCKET,
        MODEL_PREFIX_ENV: MODEL_PREFIX,
        CACHE_DIR_ENV: str(work_dir / "cache-gpu"),
        METRICS_DISABLED_ENV: "true",
    }


def local_function_env(work_dir: Path) -> dict[str, str]:
    """What a function serving the data bucket reads in a running stack (``tierserve batch
    --local``): the worker's variables for its catalog, with a cache folder of its own."""
    return worker_env(work_dir, Catalog.load(work_dir / "catalog.json"), cache="_batch")


def invoke_in_emulator(work_dir: Path, event: dict[str, Any], handler: str) -> tuple[Any, Path]:
    """Run ``handler`` on ``event`` under the Lambda Runtime Interface Emulator, against the
    running local stack's S3: ``api.handler`` as the function of the model the event's path
    names (every lambda-tier model when it names none of them), ``worker.handler`` as the S3
    worker (gpu-tier models through the stack's SageMaker runtime). Returns the function's
    response and its log.

    Raises:
        LocalStackNotRunning: no ``tierserve local`` runs for ``work_dir``, or it does not answer.
        RuntimeError: the emulator is missing, or the function failed (the message says which).
    """
    from tierserve.tools.local.emulator import LambdaEmulator

    state = running_stack(work_dir)
    catalog = Catalog.load(work_dir / "catalog.json")
    if handler.startswith(("worker.", "batch.")):
        env = worker_env(work_dir, catalog)
    elif handler.startswith("stream."):
        env = stream_env(work_dir, catalog)
    elif handler.startswith("jobs."):
        env = jobs_env(work_dir, catalog)
    else:
        models = on_tier(catalog, "lambda")
        named = [m for m in models if m.name == model_in(str(event.get("path") or ""))]
        env = api_env(work_dir, named or models, cache="_invoke")
    env = {**endpoint_env(state["s3_endpoint"], state.get("sagemaker_endpoint")), **env}
    log_path = work_dir / "logs" / f"invoke-{handler.replace('.', '-')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with LambdaEmulator.start(handler, env, log_path=log_path) as function:
        return function.invoke(event), log_path


# A row each model of the samples can take, for the banner's examples (others get a row of 0.5s).
EXAMPLE_ROWS = {"iris": ((5.1, 3.5, 1.4, 0.2), (6.7, 3.0, 5.2, 2.3))}
MAX_EXAMPLE_VALUES = 16
NUMBERS = ("FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


def example_rows(manifest: Manifest) -> tuple[tuple[float, ...], ...] | None:
    """Two rows the model takes, when it has one input of a few numbers per row (``[-1, n]``)."""
    if manifest.name in EXAMPLE_ROWS:
        return EXAMPLE_ROWS[manifest.name]
    if len(manifest.inputs) != 1:
        return None
    spec = manifest.inputs[0]
    if spec.datatype not in NUMBERS or len(spec.shape) != 2 or not 0 < spec.shape[1] <= MAX_EXAMPLE_VALUES:
        return None
    value = 0.5 if spec.datatype.startswith("FP") else 1
    return ((value,) * spec.shape[1],) * 2


def describe(stack: LocalStack) -> str:
    """The banner: where everything is, and commands to try."""
    url = reachable(stack.api.url) if stack.api else ""
    threshold = lambda_max_model_mb()
    forwarded = {s.ref.name: s for s in stack.gpu_servers}
    cold = {s.ref.name: s for s in stack.cold_gpu_servers}
    lines = [f"serving the Open Inference Protocol on {url} (Ctrl-C stops)", "models:"]
    for entry in stack.catalog.entries:
        tier = tier_for(entry.manifest, threshold)
        where = forwarded.get(entry.name)
        detail = (
            f"forwarded to its GPU server process at {where.url} (log: {where.log_path})"
            if where
            else "its own Lambda execution environment"
        )
        if entry.name in cold:
            server = cold[entry.name]
            detail = (
                f"cold: its GPU server process starts on the first request (503 + Retry-After meanwhile) "
                f"and stops after {server.idle_s:g} s idle (log: {server.log_path})"
            )
        lines.append(
            f"  {entry.name}@{entry.version}  tier={tier}  {entry.manifest.model.bytes / 1e6:.1f} MB  {detail}"
        )
    if stack.s3 is not None:
        credentials = " ".join(f"{k}={v}" for k, v in LOCAL_CREDENTIALS.items())
        lines += [
            f"embedded S3 on {stack.s3.endpoint} (in memory: gone when this stops):",
            f"  models s3://{LOCAL_BUCKET}/{MODEL_PREFIX}/   data s3://{DATA_BUCKET}/ (inputs/ -> outputs/ or errors/)",
            "  tierserve upload, boto3 and the aws CLI reach it with, in another terminal:",
            f"  export AWS_ENDPOINT_URL_S3={stack.s3.endpoint} {credentials}",
        ]
    lines += _examples(stack, url)
    return "\n".join(lines)


def _examples(stack: LocalStack, url: str) -> list[str]:
    manifests = [e.manifest for e in stack.catalog.entries]
    if not manifests:
        return ["no models: pass --models DIR (packages from `tierserve package`), or drop --no-samples"]
    shown = next((m for m in manifests if example_rows(m)), manifests[0])
    lines = ["try:", f"  curl -s {url}/v2/models/{shown.name}"]
    rows = example_rows(shown)
    if rows is None:
        return lines
    spec = shown.inputs[0]
    request = {
        "inputs": [
            {"name": spec.name, "shape": [1, len(rows[0])], "datatype": spec.datatype, "data": list(rows[0])}
        ]
    }
    lines += [
        f"  curl -s -X POST {url}/v2/models/{shown.name}/infer -H 'Content-Type: application/json' \\",
        f"    -d '{json.dumps(request, separators=(',', ':'))}'",
    ]
    if stack.pipeline is not None:
        text = "\\n".join(json.dumps(list(row), separators=(",", ":")) for row in rows)
        lines += [
            f"S3-triggered inference (s3://{stack.pipeline.bucket}: inputs/ -> outputs/ or errors/):",
            f"  printf '{text}\\n' > rows.jsonl",
            f"  tierserve local put rows.jsonl --model {shown.name}",
            f"bulk inference over a prefix: tierserve batch s3://{stack.pipeline.bucket}/inputs/{shown.name}/ "
            f"--model {shown.name} --local",
            "async jobs (any size; presigned URLs on the embedded S3):",
            f"  tierserve infer {shown.name} rows.jsonl --async --url {url}",
            f"  curl -s -X POST {url}/v2/models/{shown.name}/jobs   # an upload URL: curl -T FILE '<url>'",
        ]
    captured = stack.captured
    if captured:
        baselined = [m.name for m in manifests if m.name in captured and "baseline" in m.extra]
        lines += [
            f"drift: requests of {', '.join(captured)} are captured to s3://{DATA_BUCKET}/capture/; after some,",
            f"  tierserve drift {(baselined or captured)[0]} --local",
        ]
    if stack.streams is not None:
        lines += [
            f"streams (Kinesis {RECORDS_STREAM} -> {RESULTS_STREAM}, model {LOCAL_STREAM_MODEL}):",
            "  printf '[5.1,3.5,1.4,0.2]\\n[6.7,3.0,5.2,2.3]\\n' | tierserve local stream -",
        ]
    return lines
