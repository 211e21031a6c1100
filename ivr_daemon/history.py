"""What the caller said: mod_vosk's transcripts, and the per-call history the LLM is asked with.

Pure: no socket, no LLM, no greenlet; the turn (conversation.py) and the HTTP test turns use it.
"""

from __future__ import annotations

import json
from collections import deque

from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.llm.base import Message

FINAL_SPEECH = "detected-speech"
PARTIAL_SPEECH = "detected-partial-speech"
BEGIN_SPEAKING = "begin-speaking"  # other ASR modules send it; mod_vosk never does


class ConversationHistory:
    """The system prompt plus the last ``max_messages`` user/assistant messages."""

    def __init__(self, system_prompt: str, max_messages: int):
        self.system_prompt = system_prompt
        self._messages: deque[Message] = deque(maxlen=max_messages if max_messages > 0 else 0)

    def add(self, role: str, content: str) -> Message:
        message = {"role": role, "content": content}
        self._messages.append(message)
        return message

    def messages(self) -> list[Message]:
        return [{"role": "system", "content": self.system_prompt}, *(dict(m) for m in self._messages)]

    def ask(self, user_text: str) -> list[Message]:
        """Keep the caller's words; the messages for the LLM, which end with them even when no
        history is kept at all (``MAX_CONVERSATION_HISTORY=0``)."""
        self.add("user", user_text)
        messages = self.messages()
        if len(messages) == 1:
            messages.append({"role": "user", "content": user_text})
        return messages

    def __len__(self) -> int:
        return len(self._messages)


def speech_text(event: EslEvent) -> str:
    """The recognised words of a DETECTED_SPEECH body: plain text or vosk JSON."""
    text = (event.body or "").strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            text = str(parsed.get("text", parsed.get("partial", ""))).strip()
    return text


def transcript_of(event: EslEvent) -> str | None:
    """The final recognised text of a DETECTED_SPEECH event, or None if it starts no turn."""
    if event.name != "DETECTED_SPEECH" or event.get("Speech-Type") != FINAL_SPEECH:
        return None
    return speech_text(event) or None
