"""Tests for ivr_daemon.audio: any synthesizer output becomes an 8 kHz mono PCM_16 WAV, atomically."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest
import soundfile

from ivr_daemon import audio
from ivr_daemon.audio import duration_s, silence, write_telephony_wav


def sine(frequency_hz: float, duration_s: float, sample_rate_hz: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(duration_s * sample_rate_hz)) / sample_rate_hz
    return (amplitude * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32)


def peak_frequency_hz(samples: np.ndarray, sample_rate_hz: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / sample_rate_hz)[np.argmax(spectrum)])


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


def assert_telephony_wav(path, expected_duration_s: float) -> None:
    info = soundfile.info(str(path))
    assert info.samplerate == 8000
    assert info.channels == 1
    assert info.subtype == "PCM_16"
    assert info.format == "WAV"
    assert info.duration == pytest.approx(expected_duration_s, rel=0.01)


@pytest.mark.parametrize("sample_rate_hz", [22050, 16000, 44100, 8000])
@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_any_rate_and_dtype_becomes_8khz_mono_pcm16(tmp_path, sample_rate_hz, dtype):
    samples = sine(440, 1.7, sample_rate_hz)
    if dtype == "int16":
        samples = (samples * 32767).astype(np.int16)
    path = write_telephony_wav(samples, sample_rate_hz, tmp_path / "out.wav")

    assert path == tmp_path / "out.wav"
    assert_telephony_wav(path, 1.7)
    written, _ = soundfile.read(str(path), dtype="float32")
    # Level survives the int16 scaling and the resampler: a 0.5-amplitude sine has RMS 0.354.
    assert rms(written) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_stereo_is_downmixed_to_mono(tmp_path):
    left = sine(440, 1.0, 22050, amplitude=0.8)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)  # (frames, channels), as soundfile reads
    path = write_telephony_wav(stereo, 22050, tmp_path / "stereo.wav")

    assert_telephony_wav(path, 1.0)
    written, _ = soundfile.read(str(path), dtype="float32")
    assert rms(written) == pytest.approx(0.4 / np.sqrt(2), rel=0.02)
    assert peak_frequency_hz(written, 8000) == pytest.approx(440, abs=3)


def test_one_khz_sine_stays_one_khz(tmp_path):
    path = write_telephony_wav(sine(1000, 2.0, 22050), 22050, tmp_path / "tone.wav")
    written, rate_hz = soundfile.read(str(path), dtype="float32")

    assert rate_hz == 8000
    assert peak_frequency_hz(written, rate_hz) == pytest.approx(1000, abs=2)
    # All the energy stays in the tone: a sample-dropping resampler smears it into other bins.
    spectrum = np.abs(np.fft.rfft(written * np.hanning(len(written)))) ** 2
    freqs = np.fft.rfftfreq(len(written), 1 / rate_hz)
    near_tone = spectrum[np.abs(freqs - 1000) < 20].sum()
    assert near_tone / spectrum.sum() > 0.999


def test_tones_above_new_nyquist_are_filtered_not_aliased(tmp_path):
    # Dropping samples would fold 6 kHz down to 2 kHz at full level; a real resampler removes it.
    path = write_telephony_wav(sine(6000, 1.0, 22050), 22050, tmp_path / "high.wav")
    written, _ = soundfile.read(str(path), dtype="float32")

    assert rms(written) < 0.5 / np.sqrt(2) / 100  # at least 40 dB down


def test_loud_input_is_clipped_not_wrapped(tmp_path):
    loud = sine(300, 0.5, 16000, amplitude=1.5)
    path = write_telephony_wav(loud, 16000, tmp_path / "loud.wav")
    written, _ = soundfile.read(str(path), dtype="int16")

    assert written.max() >= 32000 and written.min() <= -32000
    # Wrapping would flip the sign of the peaks; clipping keeps them in step with the input.
    reference = soundfile.read(str(write_telephony_wav(loud / 3, 16000, tmp_path / "ref.wav")), dtype="int16")[0]
    assert np.all(np.sign(written[np.abs(reference) > 8000]) == np.sign(reference[np.abs(reference) > 8000]))


def test_nan_samples_become_silence(tmp_path):
    samples = sine(300, 0.5, 8000)
    samples[100:200] = np.nan
    written, _ = soundfile.read(str(write_telephony_wav(samples, 8000, tmp_path / "nan.wav")), dtype="int16")

    assert np.all(written[100:200] == 0)


def test_write_leaves_only_the_final_file_readable_by_the_group_not_others(tmp_path):
    for name in ("a.wav", "b.wav", "a.wav"):
        write_telephony_wav(sine(440, 0.3, 16000), 16000, tmp_path / name)

    assert sorted(os.listdir(tmp_path)) == ["a.wav", "b.wav"]
    # FreeSWITCH runs as another user in the WAVs' group (mkstemp alone would leave 0600);
    # other local users must not read callers' replies.
    for name in ("a.wav", "b.wav"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640


def test_the_mode_does_not_depend_on_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        path = write_telephony_wav(sine(440, 0.3, 16000), 16000, tmp_path / "a.wav")
    finally:
        os.umask(previous)

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_missing_output_directory_is_created(tmp_path):
    path = write_telephony_wav(sine(440, 0.3, 16000), 16000, tmp_path / "new" / "dir" / "x.wav")
    assert_telephony_wav(path, 0.3)


def test_file_appears_under_final_name_only_when_complete(tmp_path, monkeypatch):
    final = tmp_path / "reply.wav"
    seen_during_write: list[bool] = []
    real_write = soundfile.write

    def observing_write(file, data, samplerate, **kwargs):
        real_write(file, data, samplerate, **kwargs)
        seen_during_write.append(final.exists())

    monkeypatch.setattr(audio.soundfile, "write", observing_write)
    write_telephony_wav(sine(440, 1.0, 22050), 22050, final)

    assert seen_during_write == [False]
    assert_telephony_wav(final, 1.0)


def test_failed_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audio.os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_telephony_wav(sine(440, 1.0, 22050), 22050, tmp_path / "reply.wav")

    assert os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    final = write_telephony_wav(sine(440, 1.0, 22050), 22050, tmp_path / "reply.wav")
    before = final.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audio.os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_telephony_wav(sine(880, 3.0, 22050), 22050, final)

    assert final.read_bytes() == before
    assert os.listdir(tmp_path) == ["reply.wav"]


@pytest.mark.parametrize(
    "samples, sample_rate_hz",
    [
        (np.zeros(0, dtype=np.float32), 22050),
        (np.zeros((2, 3, 4), dtype=np.float32), 22050),
        (np.zeros(100, dtype=np.int64), 22050),
        (np.zeros(100, dtype=np.float32), 0),
    ],
    ids=["empty", "3-d", "int64", "zero-rate"],
)
def test_unusable_input_is_rejected_without_a_file(tmp_path, samples, sample_rate_hz):
    with pytest.raises(ValueError):
        write_telephony_wav(samples, sample_rate_hz, tmp_path / "bad.wav")
    assert os.listdir(tmp_path) == []


def test_duration_and_silence(tmp_path):
    quiet = silence(1.25, 16000)
    assert quiet.dtype == np.float32 and len(quiet) == 20000 and not quiet.any()
    assert len(silence(0.5)) == 4000

    path = write_telephony_wav(quiet, 16000, tmp_path / "quiet.wav")
    assert duration_s(path) == pytest.approx(1.25, rel=0.01)


# --- write_silent_wav: the null engine's WAV -----------------------------------------------


def test_silent_wav_is_what_write_telephony_wav_makes_of_zeros(tmp_path):
    fast = audio.write_silent_wav(4000 * 3, tmp_path / "fast.wav")
    usual = write_telephony_wav(silence(1.5), 8000, tmp_path / "usual.wav")

    assert fast == tmp_path / "fast.wav"
    assert_telephony_wav(fast, 1.5)
    assert np.array_equal(soundfile.read(str(fast), dtype="int16")[0], soundfile.read(str(usual), dtype="int16")[0])
    assert stat.S_IMODE(os.stat(fast).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["fast.wav", "usual.wav"]  # no temp file left


def test_silent_wav_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    final = audio.write_silent_wav(800, tmp_path / "reply.wav")
    before = final.read_bytes()

    def replace_fails(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audio.os, "replace", replace_fails)
    with pytest.raises(OSError):
        audio.write_silent_wav(8000, final)

    assert final.read_bytes() == before
    assert os.listdir(tmp_path) == ["reply.wav"]
    with pytest.raises(ValueError):
        audio.write_silent_wav(0, tmp_path / "empty.wav")


def test_a_wav_that_need_not_be_durable_is_written_whole_without_a_disk_flush(tmp_path, monkeypatch):
    flushed: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(audio.os, "fsync", lambda fd: (flushed.append(fd), real_fsync(fd)))

    kept = write_telephony_wav(sine(440, 1.0, 22050), 22050, tmp_path / "cached.wav")
    assert len(flushed) == 1  # the default: on disk before it appears under its name

    own = write_telephony_wav(sine(440, 1.0, 22050), 22050, tmp_path / "call.wav", durable=False)
    assert len(flushed) == 1  # a call's own WAV: no flush
    assert own.read_bytes() == kept.read_bytes()  # the same whole file, under its final name only
    assert sorted(os.listdir(tmp_path)) == ["cached.wav", "call.wav"]
