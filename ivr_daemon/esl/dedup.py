"""Drop the second copy of an event FreeSWITCH delivered twice.

While a channel is parked, every DETECTED_SPEECH arrives twice, byte-identical, with the same
Event-Sequence (once fired for ``fire_asr_events=true``, once from the session queue; see
tests/captures/README.md). Events are not always in Event-Sequence order on the socket, so
this remembers recent keys rather than a high-water mark. Memory is bounded by ``max_keys``
times a fixed-size digest: the key's header values themselves can be as long as an event.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from ivr_daemon.esl.protocol import EslEvent


class EventDeduplicator:
    def __init__(self, max_keys: int = 8192):
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._max_keys = max_keys
        self.dropped = 0

    def is_duplicate(self, event: EslEvent) -> bool:
        sequence = event.headers.get("Event-Sequence")
        if not sequence:
            return False  # nothing identifies a repeat; let it through
        key = _digest(event.headers.get("Core-UUID", ""), event.headers.get("Unique-ID", ""), sequence)
        if key in self._seen:
            self.dropped += 1
            return True
        self._seen[key] = None
        if len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._seen)


def _digest(*parts: str) -> bytes:
    # 16 bytes whatever the values hold (a hostile Unique-ID may be megabytes long).
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))  # length-prefixed: ("ab", "c") != ("a", "bc")
        digest.update(data)
    return digest.digest()
