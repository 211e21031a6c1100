"""The talk page in a real headless Chromium (Debian's chromium and chromium-driver, through
selenium): Chromium's fake microphone plays a Piper-spoken question, the page's AudioWorklet
resamples it to 16 kHz PCM16 and streams it to /ws/transcribe, pocketsphinx hears it, the
phone call's turn answers, and the page shows the transcript and the reply and plays its audio.

``make test`` installs chromium and chromium-driver with apt-get when /usr/bin/chromedriver is
missing; without them this test fails (it is not skipped). IVR_TALK_SCREENSHOT=<path> also saves
the page after the turn there (docs/screenshot-talk-page.png was made so).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from asr_clients import load_voice, spoken, words_of
from harness import http_server, running_daemon, settings_for
from llm_fakes import FakeLlmServer
from ivr_daemon.asr.pocketsphinx import PocketsphinxEngine
from ivr_daemon.http.talk import TalkSessions
from ivr_daemon.http.transcription import TurnSlots
from ivr_daemon.replay.simulator import FreeswitchSimulator

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
QUESTION = "can you tell me the opening hours"
QUESTION_WORDS = {"tell", "opening", "hours"}
REPLY = "We are open from nine to five, Monday to Saturday."
CAPTURE_RATE_HZ = 48000  # a microphone's usual rate: the page's worklet resamples it to 16 kHz
# Chromium's fake microphone plays the file in a loop: the question, then this much silence, so
# the test is over long before the question comes round again.
TAIL_SILENCE_S = 30.0
TURN_TIMEOUT_S = 120.0


def question_wav(path: Path) -> Path:
    pcm = spoken(load_voice(), QUESTION, CAPTURE_RATE_HZ, lead_s=1.0, tail_s=TAIL_SILENCE_S)
    soundfile.write(path, np.frombuffer(pcm, dtype="<i2"), CAPTURE_RATE_HZ, subtype="PCM_16")
    return path


def chromium(fake_audio: Path) -> webdriver.Chrome:
    for binary in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(binary), f"{binary} is missing: `make test` installs chromium and chromium-driver (apt-get)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,1000",
                     "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                     f"--use-file-for-fake-audio-capture={fake_audio}"):
        options.add_argument(argument)
    # The driver given: selenium-manager would try to download one.
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def state(driver, expression: str):
    return driver.execute_script(f"return {expression};")


def test_the_page_hears_a_spoken_question_shows_the_reply_and_plays_it(tmp_path):
    fake_audio = question_wav(tmp_path / "question.wav")
    with FreeswitchSimulator() as sim, FakeLlmServer("ollama", replies=REPLY) as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_ENGINE="piper")
        sessions = TalkSessions(settings, TurnSlots(), asr_engine=PocketsphinxEngine())
        with running_daemon(sim, settings) as daemon, http_server(daemon, talk_sessions=sessions) as http:
            driver = chromium(fake_audio)
            try:
                driver.get(f"{http.url}/")
                driver.find_element(By.ID, "talk").click()
                wait = WebDriverWait(driver, TURN_TIMEOUT_S, poll_frequency=0.1)
                wait.until(lambda d: state(d, "window.talkState.connected"))
                wait.until(lambda d: state(d, "window.talkState.replies.length") >= 1)
                # The reply's WAV came right after its text: the audio element plays it.
                wait.until(lambda d: state(d, "window.talkState.playing") >= 1)
                wait.until(lambda d: state(d, "document.getElementById('reply-audio').currentTime") > 0)
                finals = state(driver, "window.talkState.finals")
                replies = state(driver, "window.talkState.replies")
                shown = {name: driver.find_element(By.ID, name).text for name in ("final", "reply")}
                audio = state(driver, "(a => ({paused: a.paused, duration: a.duration, error: a.error}))"
                                      "(document.getElementById('reply-audio'))")
                errors = state(driver, "window.talkState.errors")
                origins = state(driver, "performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
                screenshot = tmp_path / "talk-page.png"
                assert driver.save_screenshot(str(screenshot))
                driver.find_element(By.ID, "talk").click()  # Stop: the microphone is let go
                wait.until(lambda d: d.find_element(By.ID, "talk").text == "Talk")
            finally:
                driver.quit()
            (summary,) = sessions.wait_closed(1)  # the page went: its socket closed

    assert QUESTION_WORDS <= words_of(finals[0]), finals
    assert replies[0] == {"text": REPLY, "user_message": finals[0]}
    assert QUESTION_WORDS <= words_of(shown["final"]) and shown["reply"] == REPLY
    assert audio["error"] is None and audio["duration"] > 1.0 and not audio["paused"]
    assert errors == []
    assert set(origins) <= {http.url}, origins  # nothing fetched from anywhere else
    assert summary.turns >= 1 and summary.audio_s > 1.0
    assert [request["messages"][-1]["content"] for request in llm.requests][:1] == [finals[0]]
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("IVR_TALK_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["IVR_TALK_SCREENSHOT"])
