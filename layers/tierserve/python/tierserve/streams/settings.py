"""What the stream worker reads beyond the model and pipeline settings, once per process,
through the one settings reader (:mod:`tierserve.settings`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from tierserve.catalog import NAME_PATTERN
from tierserve.settings import OUTPUT_STREAM_ENV, STREAM_MODEL_ENV, Variable

# Kinesis: 1 to 128 letters, digits, underscores, hyphens and periods.
STREAM_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def _stream_name(text: str) -> str:
    if not STREAM_NAME_PATTERN.match(text):
        raise ValueError("is not a Kinesis stream name (the name alone: letters, digits, _ . -, 128 at most)")
    return text


def _model_name(text: str) -> str:
    if not NAME_PATTERN.match(text):
        raise ValueError("is not a model name")
    return text


OUTPUT_STREAM = Variable(
    OUTPUT_STREAM_ENV,
    _stream_name,
    "the results stream's name, e.g. tierserve-results",
    "no results stream, which the stream worker refuses",
)
STREAM_MODEL = Variable(
    STREAM_MODEL_ENV,
    _model_name,
    "a model of TIERSERVE_MODELS, e.g. iris",
    "the one model TIERSERVE_MODELS names",
)
VARIABLES: tuple[Variable, ...] = (OUTPUT_STREAM, STREAM_MODEL)


@dataclass(frozen=True)
class StreamSettings:
    """Where results go and which model serves the records."""

    output_stream: str
    model: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StreamSettings:
        """Read ``TIERSERVE_OUTPUT_STREAM`` and ``TIERSERVE_STREAM_MODEL``.

        Raises:
            SettingsError: a bad value, or no output stream at all.
        """
        from tierserve.settings import SettingsError

        env = os.environ if environ is None else environ
        model = STREAM_MODEL.read(env, None)
        output = OUTPUT_STREAM.read(env, "")
        if not output:
            raise SettingsError(
                f"{OUTPUT_STREAM_ENV} is unset; set it to {OUTPUT_STREAM.accepted} (the stack sets it)"
            )
        return cls(output_stream=output, model=model)
