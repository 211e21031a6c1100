"""PocketsphinxEngine: the US-English model bundled in the pocketsphinx wheel, with its endpointer.

The engine used when no VOSK_MODEL_PATH is set, so speech recognition works on a fresh
machine with nothing downloaded. The model is for 16 kHz speech: telephone audio (8 kHz) is
resampled up, which loses nothing the call had.

A pocketsphinx Decoder holds its own copy of the language model and dictionary (~90 MB; made in
~0.3 s), so decoders are recycled: a stream takes an idle one and hands it back when it closes.

pocketsphinx 5.1.1's Python binding holds the GIL while it decodes (measured: two threads
decoding at once finish one after the other). Audio is therefore fed to it one endpointer
frame (30 ms, a few ms of CPU) at a time, so other threads, the gevent loop's included, get
the interpreter between frames.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ivr_daemon.asr.base import AsrEngine, AsrModelUnavailable, AsrResult, AsrStream, WordTiming, join_finals
from ivr_daemon.logs import get_logger
from ivr_daemon.tts.base import native_lock, one_line

log = get_logger(__name__)

# The endpointer ends an utterance once 90% of this window is non-speech: about 0.36 s of
# silence, near vosk's own rule (0.5 s of trailing silence). It sets most of the final result's
# latency: with 0.5 s the final came 0.69-0.87 s of audio after the last word (200 ms frames
# included), with 0.4 s 0.59-0.75 s. 0.3 s (its default) split "Yes, my order number is ..." at
# the comma into two finals, which the daemon would answer separately; 0.4 s split none of the
# sentences tried (commas and full stops included).
ENDPOINT_WINDOW_S = 0.4
# The endpointer's voice activity detector at its most aggressive (3 of 0-3). Less aggressive
# modes take a phone line's noise floor for speech: with white noise at -70 dBFS after a
# sentence (mode 0, its default) or -60 dBFS (mode 2) the utterance never ended, so no final
# ever came. Mode 3 ends it on noise up to -50 dBFS and hears clean speech as well (measured on
# five Piper sentences at 8 kHz).
VAD_MODE = 3
# An utterance that the endpointer never ends (louder noise, a caller who never pauses) is cut
# here: a final after at most this much audio, as vosk's own endpointing rules also do.
MAX_UTTERANCE_S = 20.0
# The cepstral mean pocketsphinx's live CMN starts each stream from. The model's own (40,3,-1,0...)
# is for wideband speech; 8 kHz telephone audio resampled to 16 kHz has no energy above 4 kHz,
# which puts its mean far from that (c1 ~ 25, c2 ~ -31 against 3 and -1), and live CMN moves
# from its start value only over seconds of speech: a caller's first sentences were heard through
# the wrong mean ("what are you open one hundred it" for "what time do you open on saturday"). This
# is where the mean settles on 8 kHz speech (Piper's joe voice, 7 sentences other than the tests',
# decoded three times over); the band limit, not the words, sets it. The caller's own audio then
# moves it as usual.
NARROWBAND_RATE_HZ = 8000
NARROWBAND_CMN = "44.1,24.6,-30.9,33.4,-19.4,1.5,10.0,-24.4,13.2,-5.2,3.5,8.0,-17.0"
# Decoders kept for reuse beyond those in use; more are freed when their stream closes.
MAX_IDLE_DECODERS = 8
# Fillers and markers of the decoder's segmentation that are not words; "(2)" marks an
# alternative pronunciation in the dictionary.
_NOT_WORDS = re.compile(r"^(<.*>|\[.*\]|\+\+.*\+\+)$")
_ALTERNATIVE = re.compile(r"\(\d+\)$")


class PocketsphinxEngine(AsrEngine):
    name = "pocketsphinx"

    def __init__(self):
        try:
            import pocketsphinx  # noqa: F401
        except ImportError as exc:
            raise AsrModelUnavailable(
                f"pocketsphinx is not installed ({one_line(exc)}): pip install 'ivr-daemon[asr]', or set VOSK_MODEL_PATH"
            ) from exc
        self._lock = native_lock()
        decoder = self._new_decoder()  # loads the model now: a broken install stops start-up
        self._idle = [decoder]
        # Live CMN adapts the cepstral mean to the audio as it decodes: each stream, on a new or a
        # recycled decoder, starts again from the mean for its rate, so none is recognised through
        # a previous caller's.
        self._wideband_cmn = decoder.get_cmn()
        self.rate_hz = int(decoder.config["samprate"])
        self.frames_per_s = int(decoder.config["frate"])
        self.model_id = f"pocketsphinx:{Path(decoder.config['hmm']).name}"
        log.info("asr_model_loaded", engine=self.name, model_id=self.model_id, model_rate_hz=self.rate_hz)

    def _new_decoder(self):
        from pocketsphinx import Decoder

        try:
            # The wheel's default configuration: its en-us acoustic model, dictionary and LM.
            return Decoder(loglevel="FATAL")
        except Exception as exc:
            raise AsrModelUnavailable(
                f"pocketsphinx's bundled model could not be loaded ({one_line(exc)}): reinstall pocketsphinx, "
                "or set VOSK_MODEL_PATH to a vosk model") from exc

    def open_stream(self, sample_rate_hz: int) -> "PocketsphinxStream":
        with self._lock:
            decoder = self._idle.pop() if self._idle else None
        if decoder is None:
            decoder = self._new_decoder()
        decoder.set_cmn(NARROWBAND_CMN if sample_rate_hz <= NARROWBAND_RATE_HZ else self._wideband_cmn)
        return PocketsphinxStream(self, decoder, sample_rate_hz)

    def _release(self, decoder) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE_DECODERS:
                self._idle.append(decoder)


class PocketsphinxStream(AsrStream):
    """A decoder behind pocketsphinx's Endpointer (voice activity over a 0.4 s window): an
    utterance starts when the endpointer hears speech and ends when it stops."""

    max_utterance_s = MAX_UTTERANCE_S

    def __init__(self, engine: PocketsphinxEngine, decoder, sample_rate_hz: int):
        super().__init__(sample_rate_hz, engine.rate_hz)
        self._engine = engine
        self._decoder = decoder
        self._in_utterance = False
        self._utterance_bytes = 0
        self._utterance_start_s = 0.0
        self._samples_seen = 0  # through the endpointer, at the engine's rate, since the stream opened
        self._pending = b""  # less than one endpointer frame
        self._new_endpointer()

    def _new_endpointer(self) -> None:
        from pocketsphinx import Endpointer

        self._endpointer = Endpointer(window=ENDPOINT_WINDOW_S, vad_mode=VAD_MODE, sample_rate=self.engine_rate_hz)
        # The endpointer counts time from its own creation.
        self._endpointer_origin_s = self._samples_seen / self.engine_rate_hz

    def _speech(self, speech: bytes | None, finals: list[AsrResult]) -> None:
        if speech is None:
            return
        if not self._in_utterance:
            self._decoder.start_utt()
            self._in_utterance = True
            self._utterance_bytes = 0
            self._utterance_start_s = self._endpointer_origin_s + self._endpointer.speech_start
        self._decoder.process_raw(speech)
        self._utterance_bytes += len(speech)
        if not self._endpointer.in_speech:
            finals.append(self._end_utterance())
        elif self._utterance_bytes >= self.max_utterance_s * self.engine_rate_hz * 2:
            finals.append(self._end_utterance())
            # The endpointer still hears speech; a new one decides afresh from the next frame on.
            self._new_endpointer()

    def _feed(self, samples: np.ndarray, finals: list[AsrResult]) -> None:
        data = self._pending + samples.tobytes()
        frame_bytes = self._endpointer.frame_bytes
        whole = len(data) - len(data) % frame_bytes
        self._pending = data[whole:]
        for start in range(0, whole, frame_bytes):
            speech = self._endpointer.process(data[start:start + frame_bytes])
            self._samples_seen += frame_bytes // 2
            self._speech(speech, finals)

    def _end_utterance(self) -> AsrResult:
        self._decoder.end_utt()
        self._in_utterance = False
        hypothesis = self._decoder.hyp()
        text = hypothesis.hypstr if hypothesis is not None else ""
        words = []
        # No confidence: segment.prob is a posterior only after a lattice pass, which live decoding skips.
        for segment in self._decoder.seg():
            if _NOT_WORDS.match(segment.word):
                continue
            words.append(WordTiming(
                _ALTERNATIVE.sub("", segment.word),
                round(self._utterance_start_s + segment.start_frame / self._engine.frames_per_s, 3),
                round(self._utterance_start_s + (segment.end_frame + 1) / self._engine.frames_per_s, 3),
            ))
        return AsrResult(text, True, tuple(words))

    def _accept(self, samples: np.ndarray) -> AsrResult:
        finals: list[AsrResult] = []
        self._feed(samples, finals)
        if finals:
            return join_finals(finals)
        hypothesis = self._decoder.hyp() if self._in_utterance else None
        return AsrResult(hypothesis.hypstr if hypothesis is not None else "", False)

    def _finish(self, samples: np.ndarray) -> AsrResult:
        finals: list[AsrResult] = []
        self._feed(samples, finals)
        if self._pending:  # end_stream takes the last, short frame; it refuses an empty one
            pending, self._pending = self._pending, b""
            speech = self._endpointer.end_stream(pending)
            self._samples_seen += len(pending) // 2
            self._speech(speech, finals)
        if self._in_utterance:
            finals.append(self._end_utterance())
        self._new_endpointer()
        return join_finals(finals)

    def _reset(self) -> None:
        if self._in_utterance:
            self._decoder.end_utt()
            self._in_utterance = False
        self._pending = b""
        self._new_endpointer()

    def close(self) -> None:
        if self._decoder is None:
            return
        if self._in_utterance:
            self._decoder.end_utt()
            self._in_utterance = False
        decoder, self._decoder = self._decoder, None
        self._engine._release(decoder)
