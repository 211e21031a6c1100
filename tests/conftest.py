"""Test set-up: gevent first, then shared fixtures."""

from gevent import monkey

monkey.patch_all()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

CAPTURES_DIR = Path(__file__).parent / "captures"


@pytest.fixture
def captures_dir() -> Path:
    return CAPTURES_DIR


def pytest_configure(config):
    # structlog through the stdlib, so caplog sees every line with its bound call_uuid.
    from ivr_daemon.logs import configure_logging

    configure_logging("DEBUG", "console")
