"""LLM clients, one module per provider behind :class:`LlmClient`; ``make_llm_client`` picks one from Settings."""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import TYPE_CHECKING

from ivr_daemon.llm.base import (
    LlmBadReply,
    LlmClient,
    LlmError,
    LlmTimeout,
    LlmUnavailable,
    Message,
    ToolCall,
    ToolSpec,
)
from ivr_daemon.llm.llama3 import Llama3Client
from ivr_daemon.llm.ollama import OllamaClient
from ivr_daemon.llm.openai import OpenAiClient
from ivr_daemon.llm.replicas import ReplicaSet, split_urls
from ivr_daemon.sentences import FIRST_CLAUSE_MIN_WORDS

if TYPE_CHECKING:
    from ivr_daemon.llm.remote import LlmProcess

CLIENT_CLASSES: MappingProxyType[str, type[LlmClient]] = MappingProxyType({
    OllamaClient.provider: OllamaClient,
    OpenAiClient.provider: OpenAiClient,
    Llama3Client.provider: Llama3Client,
})

__all__ = [
    "CLIENT_CLASSES",
    "Llama3Client",
    "LlmBadReply",
    "LlmClient",
    "LlmError",
    "LlmTimeout",
    "LlmUnavailable",
    "Message",
    "OllamaClient",
    "OpenAiClient",
    "ReplicaSet",
    "ToolCall",
    "ToolSpec",
    "make_llm_client",
]


def make_llm_client(settings, process: "LlmProcess | None" = None) -> LlmClient:
    """The client for ``settings.llm_provider`` ("ollama" | "openai" | "llama3").

    ``settings.llm_api_url`` may list several comma-separated URLs, replicas of one model: a
    :class:`ReplicaSet` of one client per URL then (see ivr_daemon.llm.replicas). ``process``:
    each URL's requests are served by that LLM process (ivr_daemon.llm.remote).
    """
    try:
        client_class = CLIENT_CLASSES[settings.llm_provider]
    except KeyError:
        raise ValueError(
            f"unknown LLM provider {settings.llm_provider!r}: expected one of {' | '.join(CLIENT_CLASSES)}"
        ) from None
    if process is None:
        make = client_class
    else:
        # The conversation's splitter setting (FIRST_CHUNK) and read batching (LLM_STREAM_BATCH_MS),
        # applied in the LLM process.
        first_clause_min_words = FIRST_CLAUSE_MIN_WORDS if getattr(settings, "first_chunk", "clause") == "clause" else 0
        batch_s = getattr(settings, "llm_stream_batch_ms", 200) / 1000
        make = functools.partial(process.client, client_class, sentence_chunks=(first_clause_min_words, batch_s))
    clients = [
        make(
            api_url=url,
            model=settings.llm_model,
            timeout_s=settings.llm_timeout_s,
            api_key=settings.llm_api_key,
            max_tokens=settings.llm_max_tokens,
        )
        for url in split_urls(settings.llm_api_url)
    ]
    return clients[0] if len(clients) == 1 else ReplicaSet(clients)
