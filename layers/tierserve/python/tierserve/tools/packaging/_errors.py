"""Why packaging or uploading a model failed, as one line that says what to do.

The command line prints ``error.message`` and exits with ``error.exit_code``; nothing
here carries a traceback to the user.

    PackagingError                  exit 1
    ├── InvalidModel                the input is not a valid, safe ONNX model
    ├── QuantizationUnsupported     the chosen quantization cannot handle the model
    ├── AccuracyOutOfBudget         the packaged model differs too much from the original
    ├── CatalogProblem              the catalog or cdk.json cannot be read or written
    └── UploadFailed                S3 refused or could not be reached
        ├── BucketNotFound          the bucket does not exist
        ├── BucketForbidden         the credentials may not read or write there
        ├── BucketUnreachable       no answer from S3 (network, endpoint, credentials)
        └── VersionConflict         the version already holds a different model
"""

from __future__ import annotations


class PackagingError(Exception):
    """Base class: a one-line message that names the problem and the fix."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidModel(PackagingError):
    pass


class QuantizationUnsupported(PackagingError):
    pass


class AccuracyOutOfBudget(PackagingError):
    pass


class CatalogProblem(PackagingError):
    pass


class UploadFailed(PackagingError):
    pass


class BucketNotFound(UploadFailed):
    pass


class BucketForbidden(UploadFailed):
    pass


class BucketUnreachable(UploadFailed):
    pass


class VersionConflict(UploadFailed):
    pass
