"""Audio conversions: any synthesizer output to the 8 kHz mono 16-bit WAV FreeSWITCH plays."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import wave
from pathlib import Path

import numpy as np
import soundfile
import soxr

TELEPHONY_RATE_HZ = 8000
# FreeSWITCH runs as another user than the daemon, in the group the WAVs get (the daemon's
# group, or the directory's with a set-group-ID directory): group-readable, nothing for others.
WAV_FILE_MODE = 0o640


def to_mono_float32(samples) -> np.ndarray:
    """Mono float32 in [-1, 1] from int16 or float samples; 2-D input is (frames, channels)."""
    audio = np.asarray(samples)
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32768.0
    elif not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"samples must be int16 or float, got {audio.dtype}")
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    elif audio.ndim != 1:
        raise ValueError(f"samples must be 1-D or (frames, channels), got shape {audio.shape}")
    # A NaN from a misbehaving model would become a full-scale click after int16 conversion.
    return np.nan_to_num(audio.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=-1.0)


def to_telephony(samples, sample_rate_hz: int) -> np.ndarray:
    """Mono float32 at 8000 Hz, clipped to [-1, 1], resampled with soxr's HQ filter."""
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    audio = to_mono_float32(samples)
    if audio.size == 0:
        raise ValueError("no samples to write")
    if sample_rate_hz != TELEPHONY_RATE_HZ:
        audio = soxr.resample(audio, sample_rate_hz, TELEPHONY_RATE_HZ, quality="HQ")
    # The anti-alias filter can overshoot on loud input; PCM_16 would wrap instead of saturating.
    return np.clip(audio, -1.0, 1.0)


def write_telephony_wav(samples, sample_rate_hz: int, path: str | os.PathLike, *, durable: bool = True) -> Path:
    """Write ``samples`` as an 8 kHz mono PCM_16 WAV at ``path``, atomically; returns the path.

    The file appears under its final name only when complete (temp file in the same
    directory, os.replace), since FreeSWITCH may play the path as soon as it exists.
    ``durable`` (the default) also fsyncs it first, so a power cut leaves the whole file or
    none: for files read again after a restart (the phrase cache, pinned phrases). A call's
    own WAV is played from the page cache within the second and deleted at its hangup: it
    need not wait for the disk (~3 ms of a Piper sentence's wall time at the median, 8 at p90).
    """
    audio = to_telephony(samples, sample_rate_hz)
    with _atomic_file(path, durable=durable) as temp_file:
        soundfile.write(temp_file, audio, TELEPHONY_RATE_HZ, subtype="PCM_16", format="WAV")
    return Path(path)


def write_silent_wav(frames: int, path: str | os.PathLike) -> Path:
    """``frames`` samples of silence as an 8 kHz mono PCM_16 WAV at ``path``, atomically but not
    fsynced; returns the path.

    The null engine's WAV: what write_telephony_wav makes of zeros, without its float
    conversion, libsndfile's Python I/O callbacks and the disk flush (about 2 ms of CPU a
    sentence, a third of it in the kernel). The engines that speak write in their own worker
    processes; the null engine stands in for them in tests and benchmarks, where the daemon
    must not be charged for work it never does with a real voice. Silence lost to a power cut
    is nothing to keep.
    """
    if frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    with _atomic_file(path, durable=False) as temp_file:
        with wave.open(temp_file, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(TELEPHONY_RATE_HZ)
            out.writeframes(bytes(2 * frames))
    return Path(path)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike, durable: bool):
    """A binary file written under a temporary name in ``path``'s directory, then renamed to
    ``path`` (0640) when the block ends without an error; removed if it raises. ``durable``:
    fsync before the rename, so a crash leaves the whole file or none."""
    final_path = Path(path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=final_path.parent, prefix=f".{final_path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as temp_file:
            yield temp_file
            temp_file.flush()
            if durable:
                os.fsync(temp_file.fileno())
        os.chmod(temp_name, WAV_FILE_MODE)  # mkstemp made it 0600
        os.replace(temp_name, final_path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise


def duration_s(path: str | os.PathLike) -> float:
    """Length of an audio file in seconds."""
    return soundfile.info(str(path)).duration


def silence(duration_s: float, sample_rate_hz: int = TELEPHONY_RATE_HZ) -> np.ndarray:
    """Float32 zeros lasting ``duration_s`` at ``sample_rate_hz``."""
    return np.zeros(max(0, round(duration_s * sample_rate_hz)), dtype=np.float32)


def join_telephony_wavs(paths) -> tuple[bytes, int]:
    """The WAVs at ``paths``, one after another, as one 8 kHz mono PCM_16 WAV in memory, and its
    frame count. Each must already be 8 kHz mono (every WAV the daemon writes is); no resampling."""
    parts = []
    for path in paths:
        samples, rate_hz = soundfile.read(str(path), dtype="int16", always_2d=True)
        if rate_hz != TELEPHONY_RATE_HZ or samples.shape[1] != 1:
            raise ValueError(f"{path}: {rate_hz} Hz, {samples.shape[1]} channels; expected 8000 Hz mono")
        parts.append(samples[:, 0])
    audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
    out = io.BytesIO()
    soundfile.write(out, audio, TELEPHONY_RATE_HZ, subtype="PCM_16", format="WAV")
    return out.getvalue(), int(audio.size)
