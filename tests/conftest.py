"""Test set-up: gevent first, then shared fixtures."""

from gevent import monkey

monkey.patch_all()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

CAPTURES_DIR = Path(__file__).parent / "captures"


@pytest.fixture
def captures_dir() -> Path:
    return CAPTURES_DIR
