"""``tierserve local``: build sample models, package them, put them into an embedded S3,
and serve the Open Inference Protocol on 127.0.0.1 through the real Lambda handler.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tierserve.catalog import Catalog, Manifest, tier_for
from tierserve.settings import (
    CACHE_DIR_ENV,
    DATA_BUCKET_ENV,
    MODEL_BUCKET_ENV,
    MODEL_PREFIX_ENV,
    MODELS_ENV,
    OUTPUT_STREAM_ENV,
    PRELOAD_ENV,
    STREAM_MODEL_ENV,
    ModelRef,
)
from tierserve.tools.cdk_context import InfraConfig
from tierserve.tools.local import samples
from tierserve.tools.local.api_server import LocalApi
from tierserve.tools.local.embedded_s3 import EmbeddedS3, endpoint_env
from tierserve.tools.local.gpu_servers import GpuServerProcess, start_gpu_servers
from tierserve.tools.local.kinesis_stream import (
    LOCAL_STREAM_MODEL,
    RECORDS_STREAM,
    RESULTS_STREAM,
    StreamPoller,
    start_local_streams,
)
from tierserve.tools.local.s3_queue import DATA_BUCKET, LocalPipeline, start_local_pipeline
from tierserve.tools.packaging import PackagedModel, package_model, upload_package

REPO_ROOT = Path(__file__).resolve().parents[6]
CDK_JSON = REPO_ROOT / "cdk.json"
HANDLER_DIR = REPO_ROOT / "functions" / "inference"
LOCAL_BUCKET = "tierserve-models"
MODEL_PREFIX = "models"


@dataclass(frozen=True)
class Sample:
    name: str
    version: str
    build: Callable[[Path], Path]
    tier: str | None = None
    description: str = ""


SAMPLES: tuple[Sample, ...] = (
    Sample("iris", "1", samples.iris_classifier, description="scikit-learn logistic regression (skl2onnx)"),
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


def say(step: str) -> None:
    print(f"tierserve local: {step}", file=sys.stderr, flush=True)


def package_samples(work_dir: Path, chosen: Sequence[Sample] = SAMPLES) -> list[PackagedModel]:
    """Build and package each sample once; later runs reuse what is on disk."""
    packaged = []
    for index, sample in enumerate(chosen, 1):
        out_dir = work_dir / "packages" / sample.name / sample.version
        source = work_dir / "samples" / f"{sample.name}.onnx"
        say(f"[{index}/{len(chosen)}] {sample.name}: {sample.description}")
        if not source.exists():
            sample.build(source)
        packaged.append(
            package_model(source, name=sample.name, version=sample.version, out_dir=out_dir, tier=sample.tier)
        )
    return packaged


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


@dataclass
class LocalStack:
    """Everything ``tierserve local`` runs; ``stop()`` ends it all."""

    s3: EmbeddedS3
    api: LocalApi
    catalog: Catalog
    pipeline: LocalPipeline | None = None
    gpu_servers: list[GpuServerProcess] = field(default_factory=list)
    streams: StreamPoller | None = None

    def stop(self) -> None:
        if self.streams is not None:
            self.streams.stop()
        if self.pipeline is not None:
            self.pipeline.stop()
        self.api.stop()
        for server in self.gpu_servers:
            server.stop()
        self.s3.stop()


def start(
    work_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 3000,
    s3_port: int = 0,
    chosen: Sequence[Sample] = SAMPLES,
) -> LocalStack:
    """Package the samples, start the embedded S3, a GPU server process per gpu-tier model and
    the local API (which forwards those models to their server); returns once serving.

    Raises:
        ConfigError: a bad cdk.json, before anything is built.
    """
    lambda_max_model_mb()  # a bad cdk.json stops us before anything is built or started
    work_dir = work_dir.resolve()
    packaged = package_samples(work_dir, chosen)
    say("starting the embedded S3 on 127.0.0.1")
    s3 = EmbeddedS3(port=s3_port).start()
    s3.apply_env()
    client = s3.client()
    client.create_bucket(Bucket=LOCAL_BUCKET)
    catalog = Catalog(())
    for item in packaged:
        stored = upload_package(item, client, LOCAL_BUCKET, MODEL_PREFIX).manifest
        catalog = catalog.with_entry(stored)
    catalog.save(work_dir / "catalog.json")
    handler = load_handler({**lambda_env(work_dir, on_tier(catalog, "lambda")), PRELOAD_ENV: "*"})
    api = LocalApi(handler, host=host, port=port)  # binds now: a busy port fails before processes start
    gpu_models = [ModelRef(m.name, m.version) for m in on_tier(catalog, "gpu")]
    if gpu_models:
        say(f"starting a GPU server process per gpu-tier model: {', '.join(map(str, gpu_models))}")
    gpu_env = {
        MODEL_BUCKET_ENV: LOCAL_BUCKET,
        MODEL_PREFIX_ENV: MODEL_PREFIX,
        CACHE_DIR_ENV: str(work_dir / "cache-gpu"),
        "POWERTOOLS_METRICS_DISABLED": "true",
    }
    gpu_servers = start_gpu_servers(gpu_models, gpu_env, log_dir=work_dir / "logs")
    api.upstreams.update({server.ref.name: server.url for server in gpu_servers})
    api.start()
    say(f"S3-triggered inference: s3://{DATA_BUCKET}/inputs/ -> SQS -> the worker handler")
    pipeline = start_local_pipeline(s3, load_handler({}, module="worker"), state_dir=work_dir)
    streams = None
    if catalog.get(LOCAL_STREAM_MODEL) is not None:
        say(
            f"streams: Kinesis {RECORDS_STREAM} -> the stream handler ({LOCAL_STREAM_MODEL}) -> {RESULTS_STREAM}"
        )
        stream_env = {STREAM_MODEL_ENV: LOCAL_STREAM_MODEL, OUTPUT_STREAM_ENV: RESULTS_STREAM}
        streams = start_local_streams(s3, load_handler(stream_env, module="stream"), state_dir=work_dir)
    return LocalStack(s3, api, catalog, pipeline, gpu_servers, streams)


def on_tier(catalog: Catalog, tier: str) -> list[Manifest]:
    """The catalog's models on ``tier`` (``lambda`` or ``gpu``), by the one tier rule."""
    threshold = lambda_max_model_mb()
    return [e.manifest for e in catalog.entries if tier_for(e.manifest, threshold) == tier]


def lambda_env(work_dir: Path, models: Sequence[Manifest]) -> dict[str, str]:
    """The Lambda tier's variables for ``models`` in the local stack (the embedded S3's
    endpoint comes from the caller's environment)."""
    return {
        MODEL_BUCKET_ENV: LOCAL_BUCKET,
        MODEL_PREFIX_ENV: MODEL_PREFIX,
        MODELS_ENV: ModelRef.join(ModelRef(m.name, m.version) for m in models),
        DATA_BUCKET_ENV: DATA_BUCKET,
        OUTPUT_STREAM_ENV: RESULTS_STREAM,  # the stream worker's (local invoke --handler stream.handler)
        STREAM_MODEL_ENV: LOCAL_STREAM_MODEL,
        CACHE_DIR_ENV: str(work_dir.resolve() / "cache"),
        "POWERTOOLS_METRICS_DISABLED": "true",
    }


def local_function_env(work_dir: Path) -> dict[str, str]:
    """The Lambda tier's variables for the lambda-tier models of a running stack's catalog."""
    return lambda_env(work_dir, on_tier(Catalog.load(work_dir / "catalog.json"), "lambda"))


def invoke_in_emulator(work_dir: Path, event: dict[str, Any], handler: str) -> tuple[Any, Path]:
    """Run ``handler`` on ``event`` under the Lambda Runtime Interface Emulator, against the
    running local stack's S3 and the lambda-tier models of its catalog; the function's
    response and its log.

    Raises:
        LocalStackNotRunning: no ``tierserve local`` in ``work_dir``.
        RuntimeError: the emulator is missing, or the function failed (the message says which).
    """
    from tierserve.tools.local.emulator import LambdaEmulator
    from tierserve.tools.local.state import read_state

    state = read_state(work_dir)
    env = {**endpoint_env(state["s3_endpoint"]), **local_function_env(work_dir)}
    log_path = work_dir / "logs" / f"invoke-{handler.replace('.', '-')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with LambdaEmulator.start(handler, env, log_path=log_path) as function:
        return function.invoke(event), log_path


def describe(stack: LocalStack) -> str:
    url = stack.api.url
    lines = [f"serving the Open Inference Protocol on {url} (Ctrl-C stops)", "models:"]
    for entry in stack.catalog.entries:
        tier = tier_for(entry.manifest, lambda_max_model_mb())
        lines.append(
            f"  {entry.name}@{entry.version}  tier={tier}  {entry.manifest.model.bytes / 1e6:.1f} MB"
        )
    lines += [
        f"  {s.ref} is forwarded to its GPU server process at {s.url} (log: {s.log_path})"
        for s in stack.gpu_servers
    ]
    lines += [
        "try:",
        f"  curl -s {url}/v2/models/iris",
        f"  curl -s -X POST {url}/v2/models/iris/infer -H 'Content-Type: application/json' \\",
        '    -d \'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}\'',
    ]
    if stack.pipeline is not None:
        lines += [
            f"S3-triggered inference (s3://{stack.pipeline.bucket}: inputs/ -> outputs/ or errors/):",
            "  printf '[5.1,3.5,1.4,0.2]\\n[6.7,3.0,5.2,2.3]\\n' > rows.jsonl",
            "  tierserve local put rows.jsonl --model iris",
            f"bulk inference over a prefix: tierserve batch s3://{stack.pipeline.bucket}/inputs/iris/ --model iris --local",
        ]
    if stack.streams is not None:
        lines += [
            f"streams (Kinesis {RECORDS_STREAM} -> {RESULTS_STREAM}, model {LOCAL_STREAM_MODEL}):",
            "  printf '[5.1,3.5,1.4,0.2]\\n[6.7,3.0,5.2,2.3]\\n' | tierserve local stream -",
        ]
    return "\n".join(lines)
