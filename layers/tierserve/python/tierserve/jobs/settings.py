"""What the jobs function reads, once per process, through the one settings reader: the model
variables (which models and versions exist), the pipeline's data bucket and input limits (a job
is refused at the door by the limits the worker would refuse it by), and how long a presigned
URL lives."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from tierserve.s3_pipeline.settings import PipelineSettings
from tierserve.settings import DATA_BUCKET_ENV, JOBS_URL_EXPIRES_S_ENV, Settings, SettingsError, whole

DEFAULT_URL_EXPIRES_S = 900
MAX_URL_EXPIRES_S = 3600  # short-lived: an hour at most (and never past the role's credentials)
URL_EXPIRES_S = whole(
    JOBS_URL_EXPIRES_S_ENV, high=MAX_URL_EXPIRES_S, unset=f"the default, {DEFAULT_URL_EXPIRES_S} s"
)

VARIABLES = (URL_EXPIRES_S,)  # beyond Settings' and PipelineSettings' own


@dataclass(frozen=True)
class JobsSettings:
    """The jobs function's settings: :class:`Settings` (models, request and response limits),
    :class:`PipelineSettings` (data bucket, input limits) and the URL lifetime."""

    models: Settings
    pipeline: PipelineSettings
    url_expires_s: int = DEFAULT_URL_EXPIRES_S

    @property
    def data_bucket(self) -> str:
        assert self.pipeline.data_bucket is not None
        return self.pipeline.data_bucket

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobsSettings:
        """Read them (``TIERSERVE_DATA_BUCKET`` is required: jobs live there).

        Raises:
            SettingsError: a bad value, or no data bucket.
        """
        env = os.environ if environ is None else environ
        pipeline = PipelineSettings.from_env(env)
        if pipeline.data_bucket is None:
            raise SettingsError(
                f"{DATA_BUCKET_ENV} is not set; set it to the data bucket's name: the jobs function "
                "keeps every job there"
            )
        return cls(Settings.from_env(env), pipeline, URL_EXPIRES_S.read(env, DEFAULT_URL_EXPIRES_S))
