"""Turn an ONNX model into what tierserve serves, and put it where the functions find it.

    report = package(Path("model.onnx"), out_dir, PackageOptions(name="iris", version="1", quantization="int8"))
    upload_package(report.packaged, client, "my-bucket", "models")   # artifact first, manifest last
    register(report.manifest, Path("catalog.json"))

``package_model`` is the plain step underneath (compress + manifest, no quantization or
measurement), used by the local API for its sample models. The command line
(``tierserve package | upload | catalog``) is in :mod:`tierserve.tools.packaging.commands`.
"""

from tierserve.tools.packaging._accuracy import Budget, Timing
from tierserve.tools.packaging._artifact import (
    DEFAULT_TARGET_MB_S,
    DEFAULT_ZSTD_LEVEL,
    CompressionChoice,
    LevelChoice,
    PackagedModel,
    choose_compression,
    choose_zstd_level,
    compress_file,
    package_model,
    read_package,
    sha256_file,
    signature_of,
)
from tierserve.tools.packaging._catalog import ProjectConfig, project_config, register, validate_catalog
from tierserve.tools.packaging._errors import (
    AccuracyOutOfBudget,
    BucketForbidden,
    BucketNotFound,
    BucketUnreachable,
    CatalogProblem,
    InvalidModel,
    PackagingError,
    QuantizationUnsupported,
    UploadFailed,
    VersionConflict,
)
from tierserve.tools.packaging._feeds import generate_inputs, load_calibration
from tierserve.tools.packaging._steps import PackageOptions, PackageReport, package
from tierserve.tools.packaging._upload import (
    Progress,
    S3Location,
    UploadResult,
    transfer_config,
    upload,
    upload_package,
)
from tierserve.tools.packaging._validate import check_model

__all__ = [
    "DEFAULT_TARGET_MB_S",
    "DEFAULT_ZSTD_LEVEL",
    "AccuracyOutOfBudget",
    "BucketForbidden",
    "BucketNotFound",
    "BucketUnreachable",
    "Budget",
    "CatalogProblem",
    "CompressionChoice",
    "InvalidModel",
    "LevelChoice",
    "PackageOptions",
    "PackageReport",
    "PackagedModel",
    "PackagingError",
    "Progress",
    "ProjectConfig",
    "QuantizationUnsupported",
    "S3Location",
    "Timing",
    "UploadFailed",
    "UploadResult",
    "VersionConflict",
    "check_model",
    "choose_compression",
    "choose_zstd_level",
    "compress_file",
    "generate_inputs",
    "load_calibration",
    "package",
    "package_model",
    "project_config",
    "read_package",
    "register",
    "sha256_file",
    "signature_of",
    "transfer_config",
    "upload",
    "upload_package",
    "validate_catalog",
]
