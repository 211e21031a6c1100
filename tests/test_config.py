"""Settings: defaults, .env, validation with one clear line per bad value."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values

from ivr_daemon.config import VARIABLES, ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_with_an_empty_environment():
    settings = load_settings(environ={})
    assert settings.freeswitch_host == "127.0.0.1"
    assert settings.freeswitch_port == 8021
    assert settings.freeswitch_password == "ClueCon" and settings.uses_default_esl_password
    assert settings.llm_provider == "ollama"
    assert settings.llm_api_url == "http://localhost:11434/api/chat"
    assert settings.llm_timeout_s == 30.0
    assert settings.max_conversation_history == 10
    assert settings.fallback_phrase == "Sorry, I'm having trouble right now. Could you say that again?"
    assert settings.tts_engine == "coqui" and settings.coqui_model == "tts_models/en/ljspeech/vits"
    assert settings.tts_output_dir.name == "tts" and not str(settings.tts_output_dir).startswith("/tmp")
    assert (settings.llm_max_tokens, settings.max_reply_sentences, settings.log_transcripts) == (200, 6, False)
    assert (settings.log_level, settings.log_format) == ("INFO", "json")


def test_env_example_lists_every_variable_with_its_default():
    example = dotenv_values(ROOT / ".env.example")
    assert set(example) == {name for name, *_ in VARIABLES}
    for name, _field, default, _meaning in VARIABLES:
        assert example[name] == default, name


def test_dotenv_file_is_read_and_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("FREESWITCH_PORT=9000\nLLM_PROVIDER=openai\n")
    settings = load_settings(environ={"LLM_PROVIDER": "llama3"}, dotenv_path=env_file)
    assert settings.freeswitch_port == 9000
    assert settings.llm_provider == "llama3"


@pytest.mark.parametrize(
    "variable, value, words",
    [
        ("FREESWITCH_PORT", "abc", "whole number"),
        ("FREESWITCH_PORT", "70000", "between"),
        ("LLM_PROVIDER", "gpt", "ollama | openai | llama3"),
        ("LLM_TIMEOUT", "soon", "number of seconds"),
        ("LLM_API_URL", "localhost:11434", "http(s) URL"),
        ("MAX_CONVERSATION_HISTORY", "-1", "between"),
        ("TTS_ENGINE", "espeak", "coqui | piper | null"),
        ("COQUI_MODEL_PATH", "/nonexistent/model.pth", "file not found"),
        ("PIPER_VOICE", "/nonexistent/voice.onnx", "file not found"),
        ("TTS_OUTPUT_DIR", "/tmp/my tts", "without spaces"),
        ("FREESWITCH_PASSWORD", "two words", "no whitespace"),
        ("LOG_FORMAT", "xml", "json | console"),
        ("FALLBACK_PHRASE", "line one\nline two", "single line"),
        ("TTS_WORKER_PRIORITY", "20", "niceness from 0 to 19, or idle"),
        ("TTS_WORKER_PRIORITY", "-5", "niceness from 0 to 19, or idle"),
        ("TTS_WORKER_PRIORITY", "lowest", "niceness from 0 to 19, or idle"),
        ("ASR_ENGINE", "whisper", "vosk | pocketsphinx"),
        ("VOSK_MODEL_PATH", "/nonexistent/vosk-model", "not a directory: /nonexistent/vosk-model"),
        ("ASR_SAMPLE_RATE", "4000", "between 8000 and 48000"),
        ("ASR_PORT", "70000", "between"),
        ("LLM_STREAM_BATCH_MS", "-1", "between"),
        ("LLM_STREAM_BATCH_MS", "5000", "between"),
        ("ASR_HOST", "two words", "not a host"),
    ],
)
def test_bad_values_name_the_variable(variable, value, words):
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={variable: value})
    assert caught.value.variable == variable
    assert words in str(caught.value)


@pytest.mark.parametrize("value, parsed", [("idle", "idle"), (" IDLE ", "idle"), ("0", "0"), ("07", "7"), ("19", "19")])
def test_tts_worker_priority_is_idle_or_a_niceness(value, parsed):
    assert load_settings(environ={"TTS_WORKER_PRIORITY": value}).tts_worker_priority == parsed


def test_the_asr_engine_follows_vosk_model_path_unless_named(tmp_path):
    assert load_settings(environ={}).asr_engine == "pocketsphinx"
    with_model = load_settings(environ={"VOSK_MODEL_PATH": str(tmp_path)})
    assert (with_model.asr_engine, with_model.vosk_model_path) == ("vosk", str(tmp_path))
    assert load_settings(environ={"VOSK_MODEL_PATH": str(tmp_path), "ASR_ENGINE": "pocketsphinx"}).asr_engine == "pocketsphinx"
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"ASR_ENGINE": "vosk"})
    assert caught.value.variable == "VOSK_MODEL_PATH" and "alphacephei.com/vosk/models" in str(caught.value)
    defaults = load_settings(environ={})
    assert (defaults.asr_host, defaults.asr_port, defaults.asr_sample_rate_hz) == ("127.0.0.1", 2700, 8000)


def test_coqui_paths_go_together(tmp_path):
    model = tmp_path / "model.pth"
    model.write_bytes(b"x")
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"COQUI_MODEL_PATH": str(model)})
    assert caught.value.variable == "COQUI_CONFIG_PATH"


def test_cli_exits_2_with_one_line_naming_the_variable(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ivr_daemon", "--env-file", str(tmp_path / "none.env"), "run"],
        env={"FREESWITCH_PORT": "abc", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "FREESWITCH_PORT" in lines[0] and "abc" in lines[0]


def test_tts_output_dir_is_made_absolute_for_freeswitch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={"TTS_OUTPUT_DIR": "relative/tts"})
    assert settings.tts_output_dir == tmp_path / "relative" / "tts"


def test_readme_configuration_table_has_three_cells_per_row():
    """A bare '|' in a default or meaning (e.g. "ollama | openai") used to split its row."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| variable | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.strip().splitlines()[1:]]
    assert len(rows) == len(VARIABLES)
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row.strip())[1:-1]
        assert len(cells) == 3, row


def test_default_tts_output_dir_is_private_state_not_tmp(tmp_path, monkeypatch):
    import ivr_daemon.config as config

    monkeypatch.setattr(config, "SYSTEM_STATE_DIR", tmp_path / "readonly" / "ivr-daemon")
    (tmp_path / "readonly").mkdir(mode=0o555)
    if os.access(tmp_path / "readonly", os.W_OK):  # root writes anywhere: the system dir wins
        assert config.default_tts_output_dir({}) == tmp_path / "readonly" / "ivr-daemon" / "tts"
    else:
        assert config.default_tts_output_dir({"XDG_STATE_HOME": str(tmp_path / "state")}) == \
            tmp_path / "state" / "ivr-daemon" / "tts"
    monkeypatch.setattr(config, "SYSTEM_STATE_DIR", tmp_path / "missing-parent" / "x" / "ivr-daemon")
    assert config.default_tts_output_dir({"XDG_STATE_HOME": str(tmp_path / "state")}) == \
        tmp_path / "state" / "ivr-daemon" / "tts"
    assert config.default_tts_output_dir({"HOME": str(tmp_path / "home")}) == \
        tmp_path / "home" / ".local" / "state" / "ivr-daemon" / "tts"


def test_run_refuses_an_output_dir_others_can_write_with_exit_2(tmp_path):
    unsafe = tmp_path / "tts"
    unsafe.mkdir()
    unsafe.chmod(0o777)  # anyone could plant a WAV under a name anyone can compute
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "HTTP_"))}
    env.update({"TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(unsafe), "HTTP_PORT": "0"})
    result = subprocess.run([sys.executable, "-m", "ivr_daemon", "--env-file", str(tmp_path / "none.env"), "run"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "TTS_OUTPUT_DIR" in result.stderr and str(unsafe) in result.stderr
    assert not (unsafe / "phrases").exists()  # nothing was written there


def test_freeswitch_hosts_lists_switches_each_with_its_password_or_the_shared_one():
    settings = load_settings(environ={"FREESWITCH_HOSTS": " fs1.example:8021, s%2Cecr%25t@fs2.example ,[::1]:9021",
                                      "FREESWITCH_PASSWORD": "shared", "FREESWITCH_PORT": "8022",
                                      "FREESWITCH_HOST": "ignored.example"})
    assert [(s.host, s.port, s.password, s.name) for s in settings.switches] == [
        ("fs1.example", 8021, "shared", "fs1.example:8021"),
        ("fs2.example", 8022, "s,ecr%t", "fs2.example:8022"),  # percent-decoded; FREESWITCH_PORT by default
        ("::1", 9021, "shared", "[::1]:9021"),
    ]
    assert "secr" not in repr(settings.switches)  # a switch's repr never shows its password
    assert not settings.uses_default_esl_password
    # The settings survive a round trip through the environment (replay, bench children).
    assert load_settings(environ=settings.as_environment()).switches == settings.switches
    # Unset: the one switch of FREESWITCH_HOST, as always.
    single = load_settings(environ={"FREESWITCH_HOST": "fs.example", "FREESWITCH_PORT": "8030"})
    assert [(s.host, s.port, s.password) for s in single.switches] == [("fs.example", 8030, "ClueCon")]
    assert load_settings(environ={"FREESWITCH_HOSTS": "a:8021,p@b:8021"}).uses_default_esl_password  # a: ClueCon


@pytest.mark.parametrize("value, words", [
    ("a:8021,,b:8021", "entry 2 is empty"),
    ("a:8021,A:8021", "listed twice"),
    ("a:0", "entry 1: port must be between 1 and 65535"),
    ("a:http", "entry 1: port must be a whole number"),
    ("a b:8021", "not host:port"),
    ("::1:8021", "not host:port"),  # an IPv6 address needs its brackets
    ("@a:8021", "password must be non-empty"),
    ("two%20words@a:8021", "no whitespace"),
])
def test_bad_freeswitch_hosts_name_the_variable_and_never_the_password(value, words):
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"FREESWITCH_HOSTS": value})
    assert caught.value.variable == "FREESWITCH_HOSTS" and words in str(caught.value)
    assert "words" not in str(caught.value)
