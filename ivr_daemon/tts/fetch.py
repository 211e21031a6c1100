"""``ivr-daemon fetch-model NAME``: a released Coqui model downloaded to a local directory now,
for a box that goes offline later, with the COQUI_MODEL_PATH / COQUI_CONFIG_PATH to use.

The download, the unpacking and the config fix-ups are Coqui's own ``ModelManager`` (the code
``TTS(model_name=...)`` runs on first use); what is ours is where it goes, the clear errors, and
not leaving a half-downloaded model behind that Coqui would later take for a whole one.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ivr_daemon.tts.base import one_line


class FetchFailed(Exception):
    """The model could not be fetched; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class FetchedModel:
    name: str
    model_path: Path
    config_path: Path
    vocoder: str | None  # the model's default vocoder, which COQUI_MODEL_PATH alone does not bring

    def settings_lines(self) -> list[str]:
        return ["TTS_ENGINE=coqui", f"COQUI_MODEL_PATH={self.model_path}", f"COQUI_CONFIG_PATH={self.config_path}"]


def fetch_coqui_model(name: str, root: Path, models_file: Path | None = None) -> FetchedModel:
    """Download ``name`` (``tts_models/<lang>/<dataset>/<model>``) under ``root``/tts; raises FetchFailed.

    ``models_file``: a models.json of your own (a mirror) instead of the list Coqui ships.
    """
    try:
        from TTS.utils.manage import ModelManager
    except ImportError as exc:
        raise FetchFailed(f"Coqui TTS is not installed ({exc}): pip install 'ivr-daemon[coqui]'", 2) from None
    if models_file is not None and not models_file.is_file():
        raise FetchFailed(f"--models-file {models_file}: no such file", 2)
    manager = ModelManager(models_file=models_file, output_prefix=root, progress_bar=True)
    _check_name(name, manager.list_tts_models())
    _, language, dataset, model = name.split("/")
    model_item = manager.models_dict["tts_models"][language][dataset][model]
    target = Path(manager.output_prefix) / name.replace("/", "--")  # where ModelManager unpacks it
    existed = target.is_dir()
    try:
        with _coquis_error_lines_dropped():
            model_path, config_path, model_item = manager.download_model(name)
    except EOFError:  # Coqui asked on stdin to accept a licence, and there is no one to answer
        _remove_partial(target, existed)
        raise FetchFailed(f"{name} needs its licence accepted: read it, then run again with COQUI_TOS_AGREED=1", 2) \
            from None
    except zipfile.BadZipFile:
        _remove_partial(target, existed)
        raise FetchFailed(f"cannot download {name} from {_source(model_item)}: the answer was not a zip archive "
                          "(an error page? check the URL, or the models file)") from None
    except Exception as exc:
        _remove_partial(target, existed)
        url = _source(model_item)
        raise FetchFailed(f"cannot download {name} from {url}: {one_line(exc)} "
                          "(no network here? fetch it on a machine that has one and copy the directory over)") from None
    if config_path is None or not Path(model_path).is_file() or not Path(config_path).is_file():
        raise FetchFailed(f"{name}: downloaded to {target}, but it holds no single checkpoint and config.json "
                          "that COQUI_MODEL_PATH/COQUI_CONFIG_PATH could name", 2)
    return FetchedModel(name, Path(model_path), Path(config_path), model_item.get("default_vocoder"))


def _source(model_item: dict) -> str:
    return model_item.get("github_rls_url") or model_item.get("repo_id") or "its source"


@contextlib.contextmanager
def _coquis_error_lines_dropped():
    """Coqui logs a failed download with its whole traceback; the FetchFailed message says it once."""
    download_logger = logging.getLogger("TTS.utils.manage")
    drop = logging.Filter("nothing")  # passes only records of a logger named "nothing": none of Coqui's
    download_logger.addFilter(drop)
    try:
        yield
    finally:
        download_logger.removeFilter(drop)


def _check_name(name: str, known: list[str]) -> None:
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "tts_models" or not all(parts):
        raise FetchFailed(f"{name!r} is not a Coqui model name: tts_models/<language>/<dataset>/<model>, "
                          "e.g. tts_models/en/ljspeech/vits", 2)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise FetchFailed(f"no Coqui model {name} in the model list{hint}", 2)


def _remove_partial(target: Path, existed: bool) -> None:
    # Coqui takes an existing directory for a downloaded model: never leave a broken one.
    if not existed and target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
