"""``ivr-daemon fetch-model``: Coqui's own ModelManager downloads and unpacks a model archive.

There is no network here. The success path is the real download code pointed (with
``--models-file``, a models.json of our own, as for a mirror) at a local HTTP server that serves
a zip of a tiny, untrained VITS made on the spot, in the layout Coqui's releases have; the paths
printed then load in the daemon's CoquiEngine. The failure paths use the list Coqui ships, with
every connection sent to a closed local port.
"""

from __future__ import annotations

import json
import socket
import zipfile
from pathlib import Path

import pytest
from gevent.pywsgi import WSGIServer

from ivr_daemon import cli
from tiny_coqui import build_tiny_vits

NAME = "tts_models/en/tiny/vits"
ARCHIVE = "tts_models--en--tiny--vits.zip"


def closed_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(autouse=True)
def suite_logging_restored():
    """cli.main() configures logging for its command (quieter); later tests need conftest's DEBUG."""
    yield
    from ivr_daemon.logs import configure_logging

    configure_logging("DEBUG", "console")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Every download fails fast, here and on a machine that has a network."""
    proxy = f"http://127.0.0.1:{closed_local_port()}"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


@pytest.fixture(scope="module")
def model_archive(tmp_path_factory) -> bytes:
    """A release-style zip: a folder holding model_file.pth and config.json (as Coqui's GitHub releases)."""
    model_path, config_path = build_tiny_vits(tmp_path_factory.mktemp("tiny_vits"))
    archive = tmp_path_factory.mktemp("archive") / ARCHIVE
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(model_path, "tts_models--en--tiny--vits/model_file.pth")
        zipped.write(config_path, "tts_models--en--tiny--vits/config.json")
    return archive.read_bytes()


@pytest.fixture
def model_server(model_archive):
    requested: list[str] = []

    def app(environ, start_response):
        requested.append(environ["PATH_INFO"])
        if environ["PATH_INFO"] == f"/{ARCHIVE}":
            start_response("200 OK", [("Content-Type", "application/zip"), ("Content-Length", str(len(model_archive)))])
            return [model_archive]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]

    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    server.requested = requested
    yield server
    server.stop()


def models_file(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"tts_models": {"en": {"tiny": {"vits": {
        "description": "a tiny untrained VITS for the tests", "github_rls_url": url,
        "default_vocoder": None, "license": "apache 2.0"}}}}}))
    return path


def test_fetches_through_coquis_manager_and_prints_settings_that_load(model_server, tmp_path, capsys):
    from ivr_daemon.tts.coqui import CoquiEngine

    listing = models_file(tmp_path, f"http://127.0.0.1:{model_server.server_port}/{ARCHIVE}")
    code = cli.main(["fetch-model", NAME, "--dir", str(tmp_path / "models"), "--models-file", str(listing)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert model_server.requested == [f"/{ARCHIVE}"]
    folder = tmp_path / "models" / "tts" / "tts_models--en--tiny--vits"
    assert out.splitlines() == ["TTS_ENGINE=coqui", f"COQUI_MODEL_PATH={folder / 'model_file.pth'}",
                                f"COQUI_CONFIG_PATH={folder / 'config.json'}"]
    assert not list(folder.glob("*.zip"))  # unpacked, the archive removed
    # What the lines name loads and speaks in the daemon's own engine.
    engine = CoquiEngine.from_files(folder / "model_file.pth", folder / "config.json")
    samples, rate_hz = engine.synthesize("hello there")
    assert rate_hz == 22050 and len(samples) > 0
    # Fetched already: a second run downloads nothing and prints the same lines.
    assert cli.main(["fetch-model", NAME, "--dir", str(tmp_path / "models"), "--models-file", str(listing)]) == 0
    assert capsys.readouterr().out == out
    assert model_server.requested == [f"/{ARCHIVE}"]


def test_no_network_is_a_clear_error_and_leaves_nothing_behind(offline, tmp_path, capsys):
    code = cli.main(["fetch-model", "tts_models/en/ljspeech/vits", "--dir", str(tmp_path / "models")])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith("ivr-daemon: fetch-model: cannot download tts_models/en/ljspeech/vits from https://")
    assert "no network here?" in err
    assert not (tmp_path / "models" / "tts" / "tts_models--en--ljspeech--vits").exists()


def test_a_server_that_answers_with_no_archive(model_server, tmp_path, capsys):
    listing = models_file(tmp_path, f"http://127.0.0.1:{model_server.server_port}/missing.zip")
    code = cli.main(["fetch-model", NAME, "--dir", str(tmp_path / "models"), "--models-file", str(listing)])
    last_line = capsys.readouterr().err.splitlines()[-1]  # after Coqui's progress bar
    assert code == 1
    assert last_line == (f"ivr-daemon: fetch-model: cannot download {NAME} from http://127.0.0.1:{model_server.server_port}"
                         "/missing.zip: the answer was not a zip archive (an error page? check the URL, or the models file)")
    # Coqui would take a leftover directory for a downloaded model on the next run.
    assert not (tmp_path / "models" / "tts" / "tts_models--en--tiny--vits").exists()


def test_unknown_and_malformed_names(offline, tmp_path, capsys):
    assert cli.main(["fetch-model", "tts_models/en/ljspeech/vitz", "--dir", str(tmp_path)]) == 2
    assert "did you mean tts_models/en/ljspeech/vits" in capsys.readouterr().err
    assert cli.main(["fetch-model", "ljspeech", "--dir", str(tmp_path)]) == 2
    assert "is not a Coqui model name" in capsys.readouterr().err
