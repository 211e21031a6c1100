"""The seed project's own llama3 JSON API: system prompt, history and new message as separate fields.

Wire format (``api_url`` is the full endpoint URL, used as given)::

    -> {"system_prompt": "<messages[0].content>",
        "conversation_history": [{"role": "user", "content": "..."}, {"role": "assistant", ...}],
        "user_message": "<messages[-1].content>"}
    <- {"response": "..."}

``conversation_history`` holds the turns between the system prompt and the new user message,
oldest first; neither of those two is repeated in it. The API does not stream: ``stream()``
yields the whole ``complete()`` reply as one delta (the base class's fallback).
"""

from __future__ import annotations

from ivr_daemon.llm.base import LlmClient, Message, check_messages


class Llama3Client(LlmClient):
    """A model behind the seed project's ``{"system_prompt", "conversation_history", "user_message"}`` API."""

    provider = "llama3"

    def complete(self, messages: list[Message]) -> str:
        # Two at least: the API has separate fields for the system prompt and the new message.
        clean = check_messages(messages, minimum=2)
        payload = {
            "system_prompt": clean[0]["content"],
            "conversation_history": clean[1:-1],
            "user_message": clean[-1]["content"],
        }
        return self.text_at(self.post_json(payload), "response")
