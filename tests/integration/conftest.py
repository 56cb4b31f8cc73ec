"""Integration fixtures: the real Lambda API handler, configured through its environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.common import Invoke, make_invoke


@pytest.fixture
def invoke(s3: object, uploaded_iris: object, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    return make_invoke(monkeypatch, cache_dir)
