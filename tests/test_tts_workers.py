"""TTS worker processes (WorkerEngine): real Piper and Coqui voices in processes of their own, a
worker's crash costing one sentence and never the daemon, no worker outliving its engine."""

from __future__ import annotations

import os
import shutil
import signal

import gevent
import psutil
import pytest
import soundfile
from structlog.testing import capture_logs

from harness import TurnLog, broadcasts, running_daemon, settings_for, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.config import ConfigError, load_settings
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts import TtsModelUnavailable, TtsSynthesisFailed, start_voice
from ivr_daemon.tts.base import file_fingerprint
from ivr_daemon.tts.null import NullEngine
from ivr_daemon.tts.piper import default_voice_path
from ivr_daemon.tts.workers import WorkerEngine
from test_tts import tiny_vits  # noqa: F401  (the fixture: a tiny Coqui VITS on disk)

LONG_TEXT = ("This sentence is long enough that its worker is still busy with it when the test kills it, "
             "since Piper needs well over a second for all of these words on one core.")


def voice_settings(**environ: str):
    return load_settings(environ={"TTS_ENGINE": "piper", "LOG_FORMAT": "console", **environ})


def worker_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "ivr_daemon.tts.worker" in " ".join(p.cmdline())]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_telephony_wav(path) -> float:
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
    return info.duration


@pytest.fixture
def one_worker():
    engine = WorkerEngine(voice_settings(), workers=1)
    yield engine
    engine.close()


@pytest.fixture
def voice_copy(tmp_path):
    """The joe voice copied, so a test can break the model file under a running engine."""
    source = default_voice_path()
    target = tmp_path / "voice" / source.name
    target.parent.mkdir()
    shutil.copyfile(source, target)
    shutil.copyfile(f"{source}.json", f"{target}.json")
    return target


def test_piper_workers_speak_the_in_process_voice_from_the_loop_and_from_threads(tmp_path):
    engine = start_voice(voice_settings())
    try:
        assert engine.workers == max(1, os.cpu_count() or 1)
        # The same voice id as the engine in this process would have: the cache keys do not change.
        voice = default_voice_path()
        assert engine.voice_id == f"piper:{voice.stem}:{file_fingerprint(voice)}"
        on_loop = engine.synthesize_to_wav("Hello from the loop.", tmp_path / "loop.wav")
        pool = gevent.get_hub().threadpool
        jobs = [pool.spawn(engine.synthesize_to_wav, f"Hello number {n} from a thread.", tmp_path / f"{n}.wav")
                for n in range(3)]
        paths = [job.get(timeout=120) for job in jobs]
        assert all(assert_telephony_wav(path) > 0.5 for path in [on_loop, *paths])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["0.wav", "1.wav", "2.wav", "loop.wav"]
    finally:
        engine.close()


def test_a_piper_worker_warms_its_voice_up_before_it_says_ready(capfd):
    # The worker logs to the stderr it shares with this process: the line is there once the
    # engine is ready, so the first call's sentence is not the model's first run.
    engine = WorkerEngine(voice_settings(), workers=1)
    try:
        [pid] = engine.pids
        err = capfd.readouterr().err
        [line] = [line for line in err.splitlines() if "tts_warmed_up" in line]
        assert f"tts_worker_pid={pid}" in line and "engine=piper" in line and "warm_up_ms=" in line
    finally:
        engine.close()


def test_workers_are_children_at_a_lower_cpu_priority(one_worker):
    [pid] = one_worker.pids
    assert psutil.Process(pid).ppid() == os.getpid()
    # TTS_WORKER_PRIORITY's default: the daemon's own work runs first when the cores are busy.
    assert os.sched_getscheduler(pid) == os.SCHED_OTHER
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)


def test_idle_workers_get_only_the_cpu_time_nothing_else_wants():
    # No synthesis here: on a box whose cores are all taken (tests run beside busy loops), an
    # idle worker gets none. The voice is loaded before the priority drops, so start-up finishes.
    engine = WorkerEngine(voice_settings(TTS_WORKER_PRIORITY="idle"), workers=1)
    try:
        [pid] = engine.pids
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    finally:
        engine.close()


def test_an_empty_text_is_refused_without_bothering_a_worker(one_worker, tmp_path):
    with pytest.raises(TtsSynthesisFailed, match="nothing to say"):
        one_worker.synthesize_to_wav("   ", tmp_path / "empty.wav")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])  # kill -9; a native crash
def test_a_worker_killed_mid_sentence_fails_that_sentence_and_a_fresh_worker_says_the_next(one_worker, tmp_path, how):
    [victim] = one_worker.pids
    with capture_logs() as logs:
        sentence = gevent.spawn(one_worker.synthesize_to_wav, LONG_TEXT, tmp_path / "long.wav")
        wait_until(lambda: one_worker.busy_pids == [victim], 30)
        os.kill(victim, how)
        with pytest.raises(TtsSynthesisFailed, match=f"TTS worker {victim} was killed by {how.name}"):
            sentence.get(timeout=60)
        assert not (tmp_path / "long.wav").exists()
        after = one_worker.synthesize_to_wav("Hello again.", tmp_path / "again.wav")
    assert assert_telephony_wav(after) > 0.3
    [fresh] = one_worker.pids
    assert fresh != victim and gone(victim)
    died = [line for line in logs if line["event"] == "tts_worker_died"]
    assert len(died) == 1 and died[0]["pid"] == victim


def test_a_worker_that_dies_idle_is_replaced_before_a_sentence_needs_it(one_worker, tmp_path):
    [victim] = one_worker.pids
    with capture_logs() as logs:
        os.kill(victim, signal.SIGKILL)  # the OOM killer, an operator
        wait_until(lambda: any(line["event"] == "tts_worker_started" for line in logs), 120)
    assert victim not in one_worker.pids and gone(victim)
    assert any(line["event"] == "tts_worker_died" and "while idle" in line["error"] for line in logs)
    assert assert_telephony_wav(one_worker.synthesize_to_wav("Still here.", tmp_path / "here.wav")) > 0.3


def test_a_voice_broken_on_disk_fails_sentences_not_the_engine_until_it_is_repaired(voice_copy, tmp_path):
    engine = WorkerEngine(voice_settings(PIPER_VOICE=str(voice_copy)), workers=1)
    try:
        good = voice_copy.read_bytes()
        voice_copy.write_bytes(good[: len(good) // 3])  # a truncated copy, a full disk
        [victim] = engine.pids
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in engine.pids, 30)  # seen dead; its replacement is loading
        # The replacement cannot load the voice, and each sentence tries again and says why.
        with capture_logs() as logs:
            for attempt in range(2):
                with pytest.raises(TtsSynthesisFailed, match="no TTS worker: .*could not be loaded"):
                    engine.synthesize_to_wav("Is anyone there?", tmp_path / f"{attempt}.wav")
        failed = [line for line in logs if line["event"] == "tts_worker_start_failed"]
        # One clear line per try (the replacement started at the death, then each sentence's own).
        assert len(failed) >= 2 and all(str(voice_copy) in line["error"] and "\n" not in line["error"] for line in failed)
        assert engine.pids == []
        voice_copy.write_bytes(good)
        assert assert_telephony_wav(engine.synthesize_to_wav("Back now.", tmp_path / "back.wav")) > 0.3
        assert len(engine.pids) == 1
    finally:
        engine.close()


def test_a_voice_that_cannot_load_at_start_is_unavailable_and_leaves_no_worker(voice_copy):
    voice_copy.write_bytes(b"not an onnx model")
    with pytest.raises(TtsModelUnavailable, match="could not be loaded .*PIPER_VOICE") as caught:
        WorkerEngine(voice_settings(PIPER_VOICE=str(voice_copy)), workers=2)
    assert "\n" not in str(caught.value)
    assert worker_children() == []


def test_close_ends_every_worker_and_fails_the_sentence_under_way(tmp_path):
    engine = WorkerEngine(voice_settings(), workers=2)
    pids = engine.pids
    sentence = gevent.spawn(engine.synthesize_to_wav, LONG_TEXT, tmp_path / "long.wav")
    wait_until(lambda: len(engine.busy_pids) == 1, 30)
    engine.close()
    with pytest.raises(TtsSynthesisFailed, match="stopped"):
        sentence.get(timeout=30)
    with pytest.raises(TtsSynthesisFailed, match="stopped"):
        engine.synthesize_to_wav("Too late.", tmp_path / "late.wav")
    assert engine.pids == [] and all(gone(pid) for pid in pids)
    assert worker_children() == []


def test_coqui_speaks_from_one_worker(tiny_vits, tmp_path):  # noqa: F811
    model_path, config_path = tiny_vits
    engine = start_voice(load_settings(environ={"TTS_ENGINE": "coqui", "COQUI_MODEL_PATH": str(model_path),
                                                "COQUI_CONFIG_PATH": str(config_path)}))
    try:
        # One forward pass already spreads over every core: one worker, as the lock did in-process.
        assert engine.workers == 1
        # Every thread of it, torch's too (started while the model loaded), yields to the daemon.
        [pid] = engine.pids
        base = os.getpriority(os.PRIO_PROCESS, 0)
        threads = [t.id for t in psutil.Process(pid).threads()]
        assert len(threads) > 1
        assert {os.getpriority(os.PRIO_PROCESS, tid) for tid in threads} == {min(19, base + 10)}
        assert engine.voice_id == f"coqui:model.pth:{file_fingerprint(model_path)}"
        assert assert_telephony_wav(engine.synthesize_to_wav("Hello there.", tmp_path / "c.wav")) > 0.1
    finally:
        engine.close()


def test_a_worker_crash_mid_turn_plays_the_fallback_and_the_next_turn_speaks(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("ollama", replies=[LONG_TEXT, "Short answer."]) as llm, FreeswitchSimulator(playback_speed=0.0) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_ENGINE="piper",
                                TTS_CACHE_MAX_MB="0", LLM_TIMEOUT="60")
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            [voice] = daemon.voices
            call = sim.new_call()
            sim.speak(call, "tell me a long story")
            wait_until(lambda: voice.busy_pids, 60)
            os.kill(voice.busy_pids[0], signal.SIGSEGV)
            [first] = turns.wait(1, call, timeout_s=60)
            assert first.used_fallback
            assert broadcasts(sim, call)[0].split()[3] == str(daemon.services.fallback_wav)
            sim.speak(call, "and now")
            second = turns.wait(2, call, timeout_s=120)[1]
            assert not second.used_fallback and second.sentences == 1
            assert daemon.esl.connected
        pids = voice.pids
    assert pids == [] and worker_children() == []


def test_a_daemon_whose_voice_breaks_keeps_answering_with_the_fallback(voice_copy, tmp_path):
    """The voice file is damaged under a running daemon and its workers die: every reply falls
    back to the pinned fallback phrase (made at start-up), the log says why, the daemon stays up."""
    turns = TurnLog()
    with FakeLlmServer("ollama", replies=["Our opening hours are nine to five.", "We are in the high street."]) as llm, \
            FreeswitchSimulator(playback_speed=0.0) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                TTS_ENGINE="piper", PIPER_VOICE=str(voice_copy), TTS_CACHE_MAX_MB="0", LLM_TIMEOUT="60")
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            [voice] = daemon.voices
            victims = voice.pids
            voice_copy.write_bytes(b"not an onnx model any more")
            with capture_logs() as logs:
                for victim in victims:
                    os.kill(victim, signal.SIGKILL)
                wait_until(lambda: not set(victims) & set(voice.pids), 30)
                call = sim.new_call()
                for number, words in enumerate(["when are you open", "where are you"], start=1):
                    sim.speak(call, words)
                    turn = turns.wait(number, call, timeout_s=120)[-1]
                    assert turn.used_fallback
                    assert broadcasts(sim, call)[-1].split()[3] == str(daemon.services.fallback_wav)
                assert daemon.esl.connected
            assert any(line["event"] == "tts_worker_start_failed" and str(voice_copy) in line["error"] for line in logs)
    assert worker_children() == []


def test_a_calls_own_wav_is_asked_of_the_worker_without_a_disk_flush(one_worker, tmp_path, monkeypatch):
    from ivr_daemon.tts import worker as worker_module
    from ivr_daemon.tts import workers as workers_module

    sent: list[dict] = []
    real_send = workers_module._Worker._send
    monkeypatch.setattr(workers_module._Worker, "_send", lambda self, message: (sent.append(message),
                                                                                real_send(self, message))[1])
    assert assert_telephony_wav(one_worker.synthesize_to_wav("Hello.", tmp_path / "own.wav", durable=False)) > 0.1
    assert assert_telephony_wav(one_worker.synthesize_to_wav("Hello.", tmp_path / "kept.wav")) > 0.1
    assert [message["durable"] for message in sent] == [False, True]

    # The worker's side: the request's wish reaches the engine (durable when it does not say).
    class Recording:
        name = "recording"

        def __init__(self):
            self.wishes: list[bool] = []

        def synthesize_to_wav(self, text, path, *, durable=True):
            self.wishes.append(durable)

    engine = Recording()
    replies = [worker_module.serve(engine, request, log=None) for request in (
        {"text": "a", "path": "/x.wav", "durable": False}, {"text": "a", "path": "/y.wav"})]
    assert replies == [{"ok": True}, {"ok": True}] and engine.wishes == [False, True]


def test_tts_workers_sets_how_many_workers_a_voice_gets():
    engine = start_voice(voice_settings(TTS_WORKERS="1"))
    try:
        assert isinstance(engine, WorkerEngine) and engine.workers == 1 and len(engine.pids) == 1
    finally:
        engine.close()
    assert load_settings(environ={"TTS_WORKERS": "auto"}).tts_workers == 0
    assert load_settings(environ={"TTS_WORKERS": "0"}).tts_workers == 0  # auto, as settings write it back
    assert load_settings(environ={"TTS_WORKERS": " 3 "}).tts_workers == 3
    for bad in ("-1", "65", "two", ""):
        with pytest.raises(ConfigError, match="TTS_WORKERS"):
            load_settings(environ={"TTS_WORKERS": bad})


def test_the_null_voice_runs_in_the_daemon_unless_tts_workers_says_otherwise(tmp_path):
    assert isinstance(start_voice(load_settings(environ={"TTS_ENGINE": "null"})), NullEngine)
    engine = start_voice(load_settings(environ={"TTS_ENGINE": "null", "TTS_WORKERS": "2", "LOG_FORMAT": "console"}))
    try:
        assert isinstance(engine, WorkerEngine) and engine.workers == 2 and engine.voice_id == NullEngine.voice_id
        [pid_a, pid_b] = engine.pids
        assert os.getpid() not in (pid_a, pid_b)
        # Written by a worker, as Piper's and Coqui's are: silence as long as the text would take.
        duration_s = assert_telephony_wav(engine.synthesize_to_wav("We open at nine.", tmp_path / "n.wav"))
        assert duration_s == pytest.approx(NullEngine().synthesize("We open at nine.")[0].size / 8000)
    finally:
        engine.close()
    assert worker_children() == []


def test_a_daemon_with_the_null_voice_in_workers_answers_as_with_piper(tmp_path):
    """The benchmarks' daemon (latency.null_voice_workers): every sentence a worker's WAV."""
    turns = TurnLog()
    reply = "We open at nine. We close at five."
    with FakeLlmServer("ollama", replies=reply) as llm, FreeswitchSimulator(playback_speed=0.0) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_WORKERS="1",
                                TTS_CACHE_MAX_MB="0")
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            [voice] = daemon.voices
            assert isinstance(voice, WorkerEngine) and voice.name == "null" and len(voice.pids) == 1
            call = sim.new_call()
            sim.speak(call, "when do you open")
            [turn] = turns.wait(1, call)
            wavs = [line.split()[3] for line in broadcasts(sim, call)]
        pids = voice.pids
    assert turn.reply == reply and not turn.used_fallback and turn.sentences == 2
    assert len(wavs) == 2 and all(w.endswith(".wav") for w in wavs)
    assert pids == [] and worker_children() == []
