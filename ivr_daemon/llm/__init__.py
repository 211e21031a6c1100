"""LLM clients, one module per provider behind :class:`LlmClient`; ``make_llm_client`` picks one from Settings."""

from __future__ import annotations

from types import MappingProxyType

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


def make_llm_client(settings) -> LlmClient:
    """The client for ``settings.llm_provider`` ("ollama" | "openai" | "llama3").

    ``settings.llm_api_url`` may list several comma-separated URLs, replicas of one model: a
    :class:`ReplicaSet` of one client per URL then (see ivr_daemon.llm.replicas).
    """
    try:
        client_class = CLIENT_CLASSES[settings.llm_provider]
    except KeyError:
        raise ValueError(
            f"unknown LLM provider {settings.llm_provider!r}: expected one of {' | '.join(CLIENT_CLASSES)}"
        ) from None
    clients = [
        client_class(
            api_url=url,
            model=settings.llm_model,
            timeout_s=settings.llm_timeout_s,
            api_key=settings.llm_api_key,
            max_tokens=settings.llm_max_tokens,
        )
        for url in split_urls(settings.llm_api_url)
    ]
    return clients[0] if len(clients) == 1 else ReplicaSet(clients)
