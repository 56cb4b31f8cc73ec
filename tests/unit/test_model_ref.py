"""ModelRef: the one encoder of TIERSERVE_MODELS and the one parser, each the other's inverse."""

from __future__ import annotations

import pytest

from tierserve.settings import MODELS_ENV, ModelRef, Settings

REFS = (ModelRef("iris", "3"), ModelRef("resnet-50", "1.2"), ModelRef("big-llm", "2024-01_a"))


def test_join_names_every_model_as_name_at_version():
    assert ModelRef.join(REFS) == "iris@3,resnet-50@1.2,big-llm@2024-01_a"
    assert ModelRef.join([REFS[0]]) == "iris@3"
    assert ModelRef.join([]) == ""


def test_settings_read_back_what_join_wrote():
    assert Settings.from_env({MODELS_ENV: ModelRef.join(REFS)}).models == REFS
    assert Settings.from_env({MODELS_ENV: ModelRef.join(iter(REFS[:1]))}).models == REFS[:1]


@pytest.mark.parametrize("text", ["iris", "@3", "iris@", ""])
def test_parse_refuses_what_join_never_writes(text):
    with pytest.raises(ValueError, match="name@version"):
        ModelRef.parse(text)
