"""Cut streamed LLM text into sentences for TTS: feed text deltas in, get each sentence once it is surely complete.

Rules, in order of precedence:

* A newline ends a sentence (list items and paragraphs are spoken one by one).
* ``.``, ``!``, ``?``, ``…`` and runs of them (``?!``, ``...``), with any closing quotes or
  brackets after them (``He said "Hi." Then``), end a sentence when whitespace follows, except
  - after a title or a word that introduces what follows (Dr. Mr. Mrs. Ms. St. Jr. vs. e.g.
    i.e. and the like, see ``_ALWAYS_CONTINUE``), a dotted acronym (U.S., U.K.), a single
    capital initial (``J. R. R. Tolkien``; not ``I``), or a list number (``1.`` opening a
    sentence or after a colon);
  - when the next word starts with a lowercase letter: then the sentence goes on ("at 5 p.m.
    tomorrow", "approx. five", '"Why?" she asked', "I was… thinking").
  Numbers need no rule of their own: "3.5", "1,000.25" and "version 2.0" have no whitespace
  after the dot.
* A sentence that grows past ``soft_limit_chars`` without ending is cut anyway, so that TTS
  never waits for a run-on: at the last comma (``;``, ``:``, dash) in the second half of the
  limit, else at the last space, else at the limit.

A sentence is emitted only once the text that decides it has arrived (a delta ending in
"Dr." or "3." or "Hi. " waits for the next one), so feeding a text in any pieces gives the
same sentences as :func:`split_sentences` on the whole. Sentences are stripped; those without
a letter or digit (a lone "-" or "...") are dropped. Markdown is left as it is.
"""

from __future__ import annotations

import re

DEFAULT_SOFT_LIMIT_CHARS = 200
MIN_SOFT_LIMIT_CHARS = 20

_TERMINATORS = frozenset(".!?…")
_CLOSERS = frozenset("\"'”’»)]}*")
_OPENERS = "\"'“‘«([{*"
_SOFT_BREAKS = frozenset(",;:—–")
# Followed by a name or an example, never by the end of a sentence.
_ALWAYS_CONTINUE = frozenset({
    "dr", "mr", "mrs", "ms", "mx", "prof", "sr", "jr", "st", "mt", "vs", "e.g", "i.e", "cf", "approx", "fig",
})
# Dotted acronyms can end a sentence too, but "a.m."/"p.m." are the ones that often do:
# for them the lowercase rule alone decides.
_DOTTED_ACRONYM = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")
_TIMES_OF_DAY = frozenset({"a.m", "p.m"})


class SentenceSplitter:
    """One reply's sentences: ``feed`` each delta, ``flush`` at the end of the stream; pure, no I/O.

    ``flush`` leaves the splitter empty, ready for the next reply.
    """

    def __init__(self, soft_limit_chars: int = DEFAULT_SOFT_LIMIT_CHARS):
        if soft_limit_chars < MIN_SOFT_LIMIT_CHARS:
            raise ValueError(f"soft_limit_chars must be at least {MIN_SOFT_LIMIT_CHARS}, got {soft_limit_chars}")
        self.soft_limit_chars = soft_limit_chars
        self._pending = ""

    def feed(self, delta: str) -> list[str]:
        """The sentences that ``delta`` completed, oldest first (often none)."""
        self._pending += delta
        return self._take(final=False)

    def flush(self) -> list[str]:
        """The rest, at the end of the stream: text after the last full stop is a sentence too."""
        sentences = self._take(final=True)
        self._pending = ""
        return sentences

    def _take(self, final: bool) -> list[str]:
        sentences = []
        while True:
            self._pending = self._pending.lstrip()
            cut = self._first_cut(self._pending, final)
            if cut is None:
                return sentences
            sentence, self._pending = self._pending[:cut].strip(), self._pending[cut:]
            if any(char.isalnum() for char in sentence):
                sentences.append(sentence)

    def _first_cut(self, text: str, final: bool) -> int | None:
        """Where the first sentence of ``text`` ends; None when more text must decide it, or there is none.

        Every decision looks only at text that has arrived, or waits: that is what makes the
        result independent of how the text was cut into deltas.
        """
        limit = self.soft_limit_chars
        length = len(text)
        index = 0
        while index < length:
            if index >= limit:
                return _soft_cut(text, limit)
            char = text[index]
            if char == "\n":
                return index + 1
            if char not in _TERMINATORS:
                index += 1
                continue
            marks_end = index
            while marks_end < length and text[marks_end] in _TERMINATORS:
                marks_end += 1
            end = marks_end
            while end < length and text[end] in _CLOSERS:
                end += 1
            if end > limit:
                return _soft_cut(text, limit)
            if end == length:
                return length if final else None  # the run of marks or quotes may go on
            if text[end].isspace():
                verdict = _ends_sentence(text, index, marks_end, end, final)
                if verdict is None:
                    return None
                if verdict:
                    return end
            index = end
        return length if final and length else None


def split_sentences(text: str, soft_limit_chars: int = DEFAULT_SOFT_LIMIT_CHARS) -> list[str]:
    """The sentences of a whole text, by the same rules as :class:`SentenceSplitter`."""
    splitter = SentenceSplitter(soft_limit_chars)
    return splitter.feed(text) + splitter.flush()


def _ends_sentence(text: str, marks_start: int, marks_end: int, end: int, final: bool) -> bool | None:
    """Whether the marks at ``text[marks_start:marks_end]`` (closers up to ``end``, whitespace after) end a sentence.

    None: the next word has not arrived yet, and it decides.
    """
    if text[marks_start:marks_end] == ".":
        word = _word_before(text, marks_start)
        if _continues_after(word) or _is_list_number(text, marks_start, word):
            return False
    next_index = end
    while next_index < len(text) and text[next_index].isspace():
        if text[next_index] == "\n":
            return True
        next_index += 1
    if next_index == len(text):
        return True if final else None
    return not text[next_index].islower()


def _word_before(text: str, index: int) -> str:
    start = index
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:index].lstrip(_OPENERS)


def _is_list_number(text: str, marks_start: int, word: str) -> bool:
    """"1." opening a sentence, or after a colon ("Steps: 1. Open it."), numbers a list item."""
    if not word.isdigit():
        return False
    before = text[: marks_start - len(word)].rstrip()
    return before == "" or before.endswith(":")


def _continues_after(word: str) -> bool:
    """Whether ``word`` followed by "." is an abbreviation or initial that a sentence goes on after."""
    lowered = word.lower()
    if lowered in _ALWAYS_CONTINUE:
        return True
    if lowered in _TIMES_OF_DAY:
        return False
    if _DOTTED_ACRONYM.fullmatch(word):
        return True
    return len(word) == 1 and word.isupper() and word != "I"


def _soft_cut(text: str, limit: int) -> int:
    """Where to cut a sentence that runs past ``limit`` chars (``len(text) > limit``)."""
    for index in range(limit - 1, limit // 2 - 1, -1):
        if text[index] in _SOFT_BREAKS and text[index + 1].isspace():
            return index + 1
    for index in range(limit - 1, 0, -1):
        if text[index].isspace():
            return index
    return limit
