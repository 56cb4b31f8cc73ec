"""Limits a Lambda-tier model must fit, checked at synth from the catalog alone.

Each check returns :class:`Limit` findings that name the model, the figure, the limit and the
fix. An error stops synth (deploying would give a function that cannot serve its model); a
warning is printed and synth goes on (it deploys, and works, at a cost the message names).

    memory        the function memory the model needs vs Lambda's 10,240 MB (error) and the
                  3,008 MB new accounts are held to until the quota is raised (warning)
    /tmp          the model's file (and a compressed artifact's spool) vs the function's /tmp:
                  SnapStart's 512 MB, else lambda_ephemeral_storage_mb (error: the download
                  has nowhere to go); none with lambda_disk_cache off (sessions hold the model)
    cold fetch    the artifact at fetch_connections x s3_mb_per_s_per_connection, plus opening
                  the session, vs the time the first load has: SnapStart and provisioned
                  concurrency load at init (130 s, or the timeout if longer), otherwise a
                  preload has Lambda's 10 s init (warning: the first request loads it) and the
                  first request its invocation, at most API Gateway's 29 s (error)
    image         the inference image's estimated size vs Lambda's 10 GB for images (error)
    keys          SnapStart and provisioned concurrency for one model (Lambda allows one);
                  model names in those keys that are not Lambda-tier models (errors)
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.config import API_GATEWAY_TIMEOUT_SECONDS, InfraConfig
from tierserve.aws import INIT_MARGIN_S, INIT_SECONDS, RESPONSE_MARGIN_S
from tierserve.catalog import MB, Manifest, ManifestError, lambda_memory_mb

SNAPSTART_EPHEMERAL_MB = 512  # SnapStart's limit on /tmp
# What /tmp keeps beside a model: the runtime's and the libraries' own temporary files.
TMP_HEADROOM_MB = 64
NEW_ACCOUNT_MEMORY_MB = 3008
LAMBDA_IMAGE_LIMIT_MB = 10 * 1024
# public.ecr.aws/lambda/python:3.13, uncompressed (its OS, runtime and runtime client).
BASE_IMAGE_MB = 600
# Opening a session and the first run, per MB of model (onnxruntime maps the weights; the
# prepacking of MatMul weights is the rest): measured about 2 ms/MB (bench/README.md), doubled.
SESSION_MS_PER_MB = 4.0
REQUIREMENTS = Path(__file__).resolve().parents[1] / "functions" / "inference" / "requirements.txt"


@dataclass(frozen=True)
class Limit:
    """One finding: an ``error`` stops synth, a warning is printed; ``code`` is its id."""

    error: bool
    code: str
    message: str


def lambda_model_limits(manifest: Manifest, config: InfraConfig) -> list[Limit]:
    """Every limit the function of Lambda-tier ``manifest`` must fit, with ``config``."""
    return [*_memory(manifest), *_tmp(manifest, config), *_cold_fetch(manifest, config)]


def _ref(manifest: Manifest) -> str:
    return f"model {manifest.name}@{manifest.version}"


def _memory(manifest: Manifest) -> list[Limit]:
    try:
        memory_mb = lambda_memory_mb(manifest)
    except ManifestError as error:
        return [Limit(True, "memory", str(error))]
    if memory_mb <= NEW_ACCOUNT_MEMORY_MB:
        return []
    return [
        Limit(
            False,
            "memoryOverNewAccountQuota",
            f"{_ref(manifest)} ({manifest.model.bytes / MB:,.0f} MB) gets {memory_mb:,} MB of function memory, "
            f"over the {NEW_ACCOUNT_MEMORY_MB:,} MB new accounts are held to: deploying fails there until the "
            "Lambda quota is raised (Service Quotas), or quantize the model",
        )
    ]


def tmp_mb(config: InfraConfig, model: str) -> int:
    """The /tmp of ``model``'s function: SnapStart's 512 MB, else lambda_ephemeral_storage_mb."""
    return SNAPSTART_EPHEMERAL_MB if config.snapstart_for(model) else config.lambda_ephemeral_storage_mb


def cache_mb(config: InfraConfig, model: str) -> int:
    """The disk cache of ``model``'s function (``TIERSERVE_CACHE_MAX_MB``); 0 without one."""
    return max(0, tmp_mb(config, model) - TMP_HEADROOM_MB) if config.lambda_disk_cache else 0


def _tmp(manifest: Manifest, config: InfraConfig) -> list[Limit]:
    if not config.lambda_disk_cache:
        return []  # downloads go to memory, the session holds the model
    spool = manifest.stored.bytes if manifest.compression != "none" else 0
    needed_mb = (manifest.model.bytes + spool) / MB
    available = cache_mb(config, manifest.name)
    if needed_mb <= available:
        return []
    if config.snapstart_for(manifest.name):
        where = f"the {SNAPSTART_EPHEMERAL_MB} MB of /tmp SnapStart allows"
        fixes = (
            f"take {manifest.name} out of 'snapstart' (its /tmp is then 'lambda_ephemeral_storage_mb'), "
            "or set 'lambda_disk_cache' to false (the session then holds it in memory, nothing in /tmp)"
        )
    else:
        where = f"the {config.lambda_ephemeral_storage_mb:,} MB of /tmp 'lambda_ephemeral_storage_mb' gives"
        fixes = (
            f"raise 'lambda_ephemeral_storage_mb' to at least {int(needed_mb) + TMP_HEADROOM_MB + 1:,}, "
            "or set 'lambda_disk_cache' to false (the session then holds it in memory)"
        )
    return [
        Limit(
            True,
            "modelLargerThanTmp",
            f"{_ref(manifest)} needs {needed_mb:,.0f} MB of /tmp to load (its file"
            + (" and its compressed artifact" if spool else "")
            + f"), more than {available:,} MB of {where} (less {TMP_HEADROOM_MB} MB): {fixes}",
        )
    ]


def cold_load_seconds(manifest: Manifest, config: InfraConfig) -> float:
    """The estimated time of a cold load: the stored bytes at the configured bandwidth, then
    opening the session."""
    fetch_s = manifest.stored.bytes / (config.cold_start_mb_per_s * 1e6)
    return fetch_s + manifest.model.bytes / MB * SESSION_MS_PER_MB / 1000


def _cold_fetch(manifest: Manifest, config: InfraConfig) -> list[Limit]:
    seconds = cold_load_seconds(manifest, config)
    figure = (
        f"{_ref(manifest)}: a cold load of {manifest.stored.bytes / 1e6:,.0f} MB takes about {seconds:,.1f} s at "
        f"{config.cold_start_mb_per_s:g} MB/s ('fetch_connections' {config.fetch_connections} x "
        f"'s3_mb_per_s_per_connection' {config.s3_mb_per_s_per_connection:g})"
    )
    faster = "raise 'fetch_connections', or quantize the model (tierserve package --quantization int8)"
    if config.snapstart_for(manifest.name) or config.provisioned_concurrency_for(manifest.name):
        init_s = max(INIT_SECONDS["snap-start"], config.lambda_timeout_seconds) - INIT_MARGIN_S
        if seconds <= init_s:
            return []
        return [
            Limit(
                True,
                "coldLoadOverInit",
                f"{figure}, over the {init_s:.0f} s an init has with SnapStart or provisioned concurrency: "
                f"publishing the version would fail; {faster}",
            )
        ]
    findings = []
    answer_s = min(config.lambda_timeout_seconds, API_GATEWAY_TIMEOUT_SECONDS) - RESPONSE_MARGIN_S
    if seconds > answer_s:
        findings.append(
            Limit(
                True,
                "coldLoadOverApiTimeout",
                f"{figure}, over the {answer_s:.0f} s a request has (API Gateway's {API_GATEWAY_TIMEOUT_SECONDS} s, "
                f"less {RESPONSE_MARGIN_S:g} s to answer): every cold start would answer 504; turn on 'snapstart' "
                f"for it (the load then happens once, when the version is published), give it "
                f"'provisioned_concurrency', or {faster}",
            )
        )
    elif config.preload and seconds > INIT_SECONDS["on-demand"] - INIT_MARGIN_S:
        findings.append(
            Limit(
                False,
                "coldLoadOverInit",
                f"{figure}, over the {INIT_SECONDS['on-demand'] - INIT_MARGIN_S:.0f} s a preload has in Lambda's "
                "10 s init: the preload gives up and the first request loads it (in time); turn on 'snapstart' "
                "to load it once per version",
            )
        )
    return findings


def model_key_limits(config: InfraConfig, lambda_models: Sequence[str]) -> list[Limit]:
    """The per-model keys name Lambda-tier models, and no model has both SnapStart and
    provisioned concurrency (Lambda refuses the combination)."""
    findings = []
    served = set(lambda_models)
    named = {
        "snapstart": [] if isinstance(config.snapstart, bool) else list(config.snapstart),
        "provisioned_concurrency": [name for name, _ in config.provisioned_concurrency],
    }
    for key, names in named.items():
        unknown = sorted(set(names) - served)
        if unknown:
            findings.append(
                Limit(
                    True,
                    "unknownModel",
                    f"cdk.json context '{key}' names {', '.join(unknown)}, not a Lambda-tier model of the catalog "
                    f"({', '.join(sorted(served)) or 'none'}): fix the names",
                )
            )
    for name in sorted(served):
        count = config.provisioned_concurrency_for(name)
        if count and config.snapstart_for(name):
            findings.append(
                Limit(
                    True,
                    "snapStartWithProvisionedConcurrency",
                    f"model {name} has both SnapStart (context 'snapstart') and provisioned concurrency "
                    f"({count}, context 'provisioned_concurrency'), which Lambda does not allow together: "
                    f"set 'snapstart' to false or to the list of models that use it, without {name}, or "
                    f"remove {name} from 'provisioned_concurrency'",
                )
            )
    return findings


def estimated_image_mb(requirements: Path = REQUIREMENTS) -> float:
    """The inference image's uncompressed size: the base image and the installed size of each
    pinned package (as the development environment, kept equal to the image's pins, has it)."""
    total = 0
    for name in _pinned(requirements.read_text().splitlines()):
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        total += sum(f.size or 0 for f in files)
    return BASE_IMAGE_MB + total / MB


def image_limits(requirements: Path = REQUIREMENTS) -> list[Limit]:
    size = estimated_image_mb(requirements)
    if size <= LAMBDA_IMAGE_LIMIT_MB:
        return []
    return [
        Limit(
            True,
            "imageTooLarge",
            f"the inference image would be about {size:,.0f} MB uncompressed, over Lambda's "
            f"{LAMBDA_IMAGE_LIMIT_MB:,} MB for container images: remove packages from "
            "functions/inference/requirements.txt",
        )
    ]


def _pinned(lines: Iterable[str]) -> list[str]:
    return [m.group(1) for line in lines if (m := re.match(r"^\s*([A-Za-z0-9_.-]+)==", line))]
