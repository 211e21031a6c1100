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

The first chunk of a reply may be a clause (``first_clause_min_words`` > 0), so that TTS can
start on a few words while the LLM (or TTS) is still on the rest of the first sentence: the
first sentence is cut after its first clause boundary (``,`` ``;`` ``:`` or a dash, followed by
whitespace and more words on the same line) that has at least ``first_clause_min_words`` words
before it and is no later than word ``first_chunk_max_words``; with no such boundary, a first
sentence of at least ``first_chunk_max_words + first_clause_min_words`` words is cut after word
``first_chunk_max_words`` (the rest is never a word or two said alone). Numbers are safe:
"1,000" and "3:30" have no whitespace after the mark. Later chunks are whole sentences.

A sentence is emitted only once the text that decides it has arrived (a delta ending in
"Dr." or "3." or "Hi. " waits for the next one), so feeding a text in any pieces gives the
same sentences as :func:`split_sentences` on the whole. Sentences are stripped; those without
a letter or digit (a lone "-" or "...") are dropped. Markdown is left as it is.
"""

from __future__ import annotations

import re

DEFAULT_SOFT_LIMIT_CHARS = 200
MIN_SOFT_LIMIT_CHARS = 20
# The first chunk: a clause of at least this many words, or at most FIRST_CHUNK_MAX_WORDS words.
# Four words is about 0.3 s of speech: short enough to come out fast, long enough to sound
# like a phrase rather than a stray word.
FIRST_CLAUSE_MIN_WORDS = 4
FIRST_CHUNK_MAX_WORDS = 12

_TERMINATORS = frozenset(".!?…")
_CLOSERS = frozenset("\"'”’»)]}*")
_OPENERS = "\"'“‘«([{*"
_SOFT_BREAKS = frozenset(",;:—–")
# A lone hyphen between spaces ("yes - but") is a dash too.
_DASH_WORDS = frozenset({"-", "--", "—", "–"})
# Followed by a name or an example, never by the end of a sentence.
_ALWAYS_CONTINUE = frozenset({
    "dr", "mr", "mrs", "ms", "mx", "prof", "sr", "jr", "st", "mt", "vs", "e.g", "i.e", "cf", "approx", "fig",
})
# Dotted acronyms can end a sentence too, but "a.m."/"p.m." are the ones that often do:
# for them the lowercase rule alone decides.
_DOTTED_ACRONYM = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")
_TIMES_OF_DAY = frozenset({"a.m", "p.m"})
_WORD = re.compile(r"\S+")
_HAS_ALNUM = re.compile(r"[^\W_]")  # a character str.isalnum() says yes to


class SentenceSplitter:
    """One reply's sentences: ``feed`` each delta, ``flush`` at the end of the stream; pure, no I/O.

    ``flush`` leaves the splitter empty, ready for the next reply. ``first_clause_min_words``
    0 (the default) keeps every chunk a whole sentence; > 0 lets the first chunk be a clause
    (see the module's doc); ``first_chunk_is_clause`` then says whether it was.
    """

    def __init__(self, soft_limit_chars: int = DEFAULT_SOFT_LIMIT_CHARS, first_clause_min_words: int = 0,
                 first_chunk_max_words: int = FIRST_CHUNK_MAX_WORDS):
        if soft_limit_chars < MIN_SOFT_LIMIT_CHARS:
            raise ValueError(f"soft_limit_chars must be at least {MIN_SOFT_LIMIT_CHARS}, got {soft_limit_chars}")
        if first_clause_min_words < 0 or (first_clause_min_words and first_chunk_max_words < first_clause_min_words):
            raise ValueError(f"need 0 <= first_clause_min_words <= first_chunk_max_words, got "
                             f"{first_clause_min_words} and {first_chunk_max_words}")
        self.soft_limit_chars = soft_limit_chars
        self.first_clause_min_words = first_clause_min_words
        self.first_chunk_max_words = first_chunk_max_words
        self._pending = ""
        # Where _first_cut resumes: everything of _pending before it is decided not to end a
        # sentence, whatever text comes after. A reply comes in dozens of deltas; rescanning
        # its pending text from the start for each one made feeding quadratic.
        self._scanned = 0
        self._emitted = False  # a chunk of this reply has been given out: no more clause cuts
        self._clause_scan = _ClauseScan()
        self.first_chunk_is_clause = False  # the first chunk ended inside its sentence

    def feed(self, delta: str) -> list[str]:
        """The sentences that ``delta`` completed, oldest first (often none)."""
        self._pending += delta
        return self._take(final=False)

    def flush(self) -> list[str]:
        """The rest, at the end of the stream: text after the last full stop is a sentence too."""
        sentences = self._take(final=True)
        self._pending = ""
        self._scanned = 0
        self._emitted = False
        self._clause_scan = _ClauseScan()
        return sentences

    def _take(self, final: bool) -> list[str]:
        sentences = []
        while True:
            stripped = self._pending.lstrip()
            if len(stripped) < len(self._pending):
                self._scanned = max(0, self._scanned - (len(self._pending) - len(stripped)))
                self._clause_scan = _ClauseScan()
            self._pending = stripped
            cut = self._first_cut(self._pending, final)
            clause = False
            if not self._emitted and self.first_clause_min_words:
                clause_cut = self._clause_scan.cut(self._pending, cut, self.first_clause_min_words,
                                                   self.first_chunk_max_words)
                if clause_cut is not None:
                    cut, clause = clause_cut, True
            if cut is None:
                return sentences
            sentence, self._pending = self._pending[:cut].strip(), self._pending[cut:]
            self._scanned = 0
            self._clause_scan = _ClauseScan()
            if any(char.isalnum() for char in sentence):
                if not self._emitted:
                    self.first_chunk_is_clause = clause
                self._emitted = True
                sentences.append(sentence)

    def _first_cut(self, text: str, final: bool) -> int | None:
        """Where the first sentence of ``text`` ends; None when more text must decide it, or there is none.

        Every decision looks only at text that has arrived, or waits: that is what makes the
        result independent of how the text was cut into deltas. A position decided not to end a
        sentence stays so as text is appended (``_scanned``); the scan resumes after it.
        """
        limit = self.soft_limit_chars
        length = len(text)
        index = self._scanned
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
                self._scanned = index  # the run of marks or quotes may go on
                return length if final else None
            if text[end].isspace():
                verdict = _ends_sentence(text, index, marks_end, end, final)
                if verdict is None:
                    self._scanned = index  # the next word decides
                    return None
                if verdict:
                    return end
            index = end
        self._scanned = length
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


class _ClauseScan:
    """Where to cut the first sentence early (the first chunk), found again for each delta
    until the first chunk is out: the words already seen are not read again.

    What it keeps (``start``: the end of the last word settled, ``words`` with a letter or
    digit up to there, ``limit_end``: where word ``max_words`` ends) stands as text is appended.
    A word is settled once it is followed by whitespace and is no clause end waiting to see
    whether a word follows it on the line. Rescanning the whole pending text for every delta
    cost ~0.2 ms of the loop for a first sentence of 16 words or more.
    """

    __slots__ = ("start", "words", "limit_end")

    def __init__(self):
        self.start, self.words, self.limit_end = 0, 0, None

    def cut(self, text: str, sentence_cut: int | None, min_words: int, max_words: int) -> int | None:
        """Where to cut the first sentence of ``text`` early, or None: not (yet).

        ``text``: what was given last time with more appended (else :meth:`__init__` anew).
        ``sentence_cut``: where the first sentence ends (None: it has not ended yet, and all
        of ``text`` belongs to it, except maybe a last word that a next delta may still
        extend). Only words followed by whitespace count: a word still arriving may be "1,000"
        or "Mr.".
        """
        region = text if sentence_cut is None else text[:sentence_cut]
        length = len(region)
        start, words, limit_end = self.start, self.words, self.limit_end
        if start > length:  # a soft cut inside what was settled (a run-on): from the start
            start, words, limit_end = 0, 0, None
        # Once the sentence has ended, this is the last look: nothing to keep.
        settled = sentence_cut is None
        for match in _WORD.finditer(region, start):
            index = match.end()
            if index == length and sentence_cut is None:
                break  # a word that may go on in the next delta
            word = match.group()
            if _HAS_ALNUM.search(word):
                words += 1
            if min_words <= words <= max_words and _ends_clause(word):
                if _more_on_line(region, index):
                    return index
                settled = False  # the next delta may put a word after it: looked at again
            if words == max_words and limit_end is None:
                limit_end = index
            if words >= max_words + min_words:
                return limit_end
            if settled:
                self.start, self.words, self.limit_end = index, words, limit_end
        return None


def _ends_clause(word: str) -> bool:
    """A word that closes a clause: ends in a comma, semicolon, colon or dash (before closing quotes), or is a dash."""
    if word in _DASH_WORDS:
        return True
    stripped = word.rstrip("".join(_CLOSERS))
    return bool(stripped) and stripped[-1] in _SOFT_BREAKS and len(stripped) > 1


def _more_on_line(text: str, index: int) -> bool:
    """Whether a word follows ``text[index]`` on the same line (what comes after a clause mark)."""
    while index < len(text) and text[index].isspace():
        if text[index] == "\n":
            return False
        index += 1
    return index < len(text) and any(char.isalnum() for char in text[index:index + 40].split(None, 1)[0])


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
