"""What a GPU instance offers and what one copy of a model needs there: the instance catalog
(GPUs, vCPUs, memory per type), which types have local NVMe storage (SageMaker refuses a KMS
volume key for them), a copy's compute requirements from its manifest, and the synth-time
check that a model's copies fit (used by :mod:`infra.sagemaker_inference` and the serving
stack's placement)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from infra.config import ConfigError
from tierserve.catalog import MB, Manifest

# A manifest may ask for more than one GPU per copy: "extra": {"gpu_accelerators": 2}.
ACCELERATORS_EXTRA = "gpu_accelerators"
MAX_ACCELERATORS = 8

# Instance families with local NVMe instance storage: SageMaker refuses a KmsKeyId for them.
# Families not listed here with a "d" after the generation (c5d, m6id, g4dn, p3dn, p4de,
# x2iedn) have instance storage too (_STORAGE_SUFFIX).
INSTANCE_STORE_FAMILIES = frozenset(
    {"g5", "g6", "g6e", "gr6", "p5", "p5e", "p5en", "p6", "trn1", "trn1n", "trn2"}
)
_STORAGE_SUFFIX = re.compile(r"^[a-z]+\d+[a-z]*d[a-z]*$")


@dataclass(frozen=True)
class InstanceSpec:
    """What one instance of a type offers the components placed on it."""

    gpus: int
    vcpus: int
    memory_gib: int

    @property
    def memory_mb(self) -> int:
        return self.memory_gib * 1024


def _sizes(family: str, sizes: Mapping[str, tuple[int, int, int]]) -> dict[str, InstanceSpec]:
    return {f"ml.{family}.{size}": InstanceSpec(*spec) for size, spec in sizes.items()}


# GPU hosting instance types (EC2's published figures: GPUs, vCPUs, memory GiB), so synth can
# say that a model's copy cannot fit before a deploy waits half an hour to fail. A type not
# listed is accepted with a synth warning that the fit was not checked.
_G5_G6 = {
    "xlarge": (1, 4, 16),
    "2xlarge": (1, 8, 32),
    "4xlarge": (1, 16, 64),
    "8xlarge": (1, 32, 128),
    "16xlarge": (1, 64, 256),
    "12xlarge": (4, 48, 192),
    "24xlarge": (4, 96, 384),
    "48xlarge": (8, 192, 768),
}
INSTANCE_SPECS: Mapping[str, InstanceSpec] = {
    **_sizes("g4dn", {k: v for k, v in _G5_G6.items() if k not in ("24xlarge", "48xlarge")}),
    **_sizes("g5", _G5_G6),
    **_sizes("g6", _G5_G6),
    **_sizes("g6e", {size: (gpus, vcpus, memory * 2) for size, (gpus, vcpus, memory) in _G5_G6.items()}),
    **_sizes("p3", {"2xlarge": (1, 8, 61), "8xlarge": (4, 32, 244), "16xlarge": (8, 64, 488)}),
    **_sizes("p4d", {"24xlarge": (8, 96, 1152)}),
    **_sizes("p5", {"48xlarge": (8, 192, 2048)}),
}


def has_instance_storage(instance_type: str) -> bool:
    """True for instance types with local NVMe storage (``ml.g5.xlarge``: yes, ``ml.p3.2xlarge``: no)."""
    family = instance_type.split(".")[1] if instance_type.count(".") >= 2 else instance_type
    return family in INSTANCE_STORE_FAMILIES or bool(_STORAGE_SUFFIX.match(family))


def needs_volume_key(instance_type: str) -> bool:
    """Whether an endpoint on ``instance_type`` gets the KMS volume key (EBS volume) or not
    (instance storage, encrypted in hardware; SageMaker refuses a key there)."""
    return not has_instance_storage(instance_type)


@dataclass(frozen=True)
class ComputeRequirements:
    """What SageMaker reserves on an instance for one copy of a model."""

    accelerators: int
    memory_mb: int
    cpu_cores: float

    @classmethod
    def of(
        cls, manifest: Manifest, *, memory_headroom: float, base_memory_mb: int, cpu_cores: float
    ) -> ComputeRequirements:
        """One copy of ``manifest``'s model: its manifest's ``extra.gpu_accelerators`` GPUs
        (default 1), ``base_memory_mb`` (the server, onnxruntime, CUDA's host side) plus
        ``memory_headroom`` times the decompressed model, and ``cpu_cores``.

        Raises:
            ConfigError: ``extra.gpu_accelerators`` is not a whole number from 1 to 8.
        """
        accelerators = manifest.extra.get(ACCELERATORS_EXTRA, 1)
        if (
            isinstance(accelerators, bool)
            or not isinstance(accelerators, int)
            or not 1 <= accelerators <= MAX_ACCELERATORS
        ):
            raise ConfigError(
                f"the manifest of model {manifest.name} has extra.{ACCELERATORS_EXTRA}={accelerators!r}; "
                f"it must be a whole number of GPUs per copy from 1 to {MAX_ACCELERATORS} (or left out "
                "for 1): fix the manifest and the catalog entry"
            )
        memory_mb = math.ceil(base_memory_mb + memory_headroom * manifest.model.bytes / MB)
        return cls(accelerators=accelerators, memory_mb=memory_mb, cpu_cores=cpu_cores)

    def misfits(self, spec: InstanceSpec) -> list[str]:
        """What about one copy an instance of ``spec`` cannot hold (empty: it fits)."""
        problems = []
        if self.accelerators > spec.gpus:
            problems.append(f"{self.accelerators} GPUs per copy (it has {spec.gpus})")
        if self.memory_mb > spec.memory_mb:
            problems.append(f"{self.memory_mb:,} MB of memory per copy (it has {spec.memory_mb:,} MB)")
        if self.cpu_cores > spec.vcpus:
            problems.append(f"{self.cpu_cores:g} CPU cores per copy (it has {spec.vcpus})")
        return problems


def check_fits(
    model: str, requirements: ComputeRequirements, instance_type: str, *, max_copies: int, max_instances: int
) -> bool:
    """Whether the fit of ``model`` on ``instance_type`` could be checked (False: an instance
    type :data:`INSTANCE_SPECS` does not list).

    Raises:
        ConfigError: one copy of the model cannot fit on one instance, or ``max_instances`` of
            them cannot hold ``max_copies`` copies of it alone; the message names the keys
            that decide it.
    """
    spec = INSTANCE_SPECS.get(instance_type)
    if spec is None:
        return False
    problems = requirements.misfits(spec)
    if problems:
        raise ConfigError(
            f"model {model} cannot run on {instance_type}: one copy needs {'; '.join(problems)}. "
            "Pick a larger type for it ('gpu_instance_types', e.g. -c gpu_instance_types="
            f"{model}=ml.g5.2xlarge, or 'gpu_instance_type' for every model), or ask for less "
            "('gpu_memory_headroom', 'gpu_base_memory_mb', 'gpu_cpu_cores_per_copy', or the manifest's "
            f"extra.{ACCELERATORS_EXTRA})"
        )
    if max_copies * requirements.accelerators > max_instances * spec.gpus:
        raise ConfigError(
            f"model {model} may scale to 'gpu_max_copies' ({max_copies}) copies of {requirements.accelerators} "
            f"GPU(s), but 'gpu_max_instances' ({max_instances}) {instance_type} instances have "
            f"{max_instances * spec.gpus} GPUs: raise gpu_max_instances or lower gpu_max_copies"
        )
    return True
