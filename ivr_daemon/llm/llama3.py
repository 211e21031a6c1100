"""The seed project's own llama3 JSON API: system prompt, history and new message as separate fields.

Wire format (``api_url`` is the full endpoint URL, used as given)::

    -> {"system_prompt": "<messages[0].content>",
        "conversation_history": [{"role": "user", "content": "..."}, {"role": "assistant", ...}],
        "user_message": "<messages[-1].content>"}
    <- {"response": "..."}

``conversation_history`` holds the turns between the system prompt and the new user message,
oldest first; neither of those two is repeated in it. The API does not stream: ``stream()``
yields the whole ``complete()`` reply as one delta (the base class's fallback).

The API has no tools (``supports_tools`` is False): tools given to ``respond``/``stream`` are
ignored, with a debug line. A history holding a tool round is sent without it: tool results
are dropped, and an assistant turn keeps its spoken text without its calls (a turn that was
only calls goes), so the model sees the conversation as the caller heard it.
"""

from __future__ import annotations

from ivr_daemon.llm.base import LlmClient, Message, check_messages, plain_messages


class Llama3Client(LlmClient):
    """A model behind the seed project's ``{"system_prompt", "conversation_history", "user_message"}`` API."""

    provider = "llama3"

    def complete(self, messages: list[Message]) -> str:
        # Two at least: the API has separate fields for the system prompt and the new message.
        clean = plain_messages(check_messages(messages, minimum=2))
        if len(clean) < 2:
            raise ValueError("need a system prompt and a message after it once the tool messages are left out")
        payload = {
            "system_prompt": clean[0]["content"],
            "conversation_history": clean[1:-1],
            "user_message": clean[-1]["content"],
        }
        return self.text_at(self.post_json(payload), "response")
