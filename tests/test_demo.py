"""The main job end to end, as `make demo` runs it: real LLM server, simulator, Piper, a greeting,
two questions and a transfer to the operator."""

import io

from ivr_daemon.demo import DEMO_ASK_FOR_A_PERSON, DEMO_OPERATOR, DEMO_UTTERANCES, run_demo


def test_the_demo_answers_each_of_the_three_utterances(tmp_path, smollm2_path):
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    (models / smollm2_path.name).symlink_to(smollm2_path)  # fetched once per session already
    out = io.StringIO()
    assert run_demo(cache_dir=tmp_path / "cache", out_dir=tmp_path / "demo", stream=out) == 0
    text = out.getvalue()
    assert [line for line in text.splitlines() if line.startswith("caller : ")] == \
        [f"caller : {u}" for u in (*DEMO_UTTERANCES, DEMO_ASK_FOR_A_PERSON)]
    daemon_lines = [line for line in text.splitlines() if line.startswith("daemon : ")]
    assert len(daemon_lines) == 4  # greeting, two answers, the transfer phrase
    assert daemon_lines[0] == "daemon : Hello, thanks for calling. How can I help you?"
    assert f"api uuid_transfer " in text and f" {DEMO_OPERATOR}'" in text
    assert "(fallback phrase)" not in text
    for turn in (1, 2):
        assert (tmp_path / "demo" / f"turn-{turn}.wav").stat().st_size > 1000


def test_the_demo_with_asr_hears_the_caller_through_piper_and_the_asr_server(tmp_path, smollm2_path):
    # The whole chain: each line said by Piper, streamed by the simulator (as mod_vosk, in real
    # time) to an asr-server running pocketsphinx, recognised, answered by llama.cpp, spoken by
    # Piper. "Hmm." is a line pocketsphinx makes nothing of: the demo says so and goes on.
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    (models / smollm2_path.name).symlink_to(smollm2_path)
    out = io.StringIO()
    lines = ("Hmm.", *DEMO_UTTERANCES)
    assert run_demo(cache_dir=tmp_path / "cache", out_dir=tmp_path / "demo", stream=out, utterances=lines,
                    asr=True, asr_environ={}) == 0
    text = out.getvalue()
    assert "asr-server (pocketsphinx:en-us) on ws://127.0.0.1:" in text
    assert [line for line in text.splitlines() if line.startswith("caller : ")] == \
        [f"caller : {u}" for u in (*lines, DEMO_ASK_FOR_A_PERSON)]
    heard = [line[len("asr    : "):] for line in text.splitlines() if line.startswith("asr    : ")]
    assert len(heard) == 4, heard
    assert heard[0].startswith("(nothing recognised")
    for recognised, key_words in zip(heard[1:], ({"opening", "hours"}, {"appointment", "tomorrow", "morning"},
                                                 {"real", "person"})):
        assert key_words <= set(recognised.split("   (final")[0].split()), recognised
    daemon_lines = [line for line in text.splitlines() if line.startswith("daemon : ")]
    assert len(daemon_lines) == 4  # greeting, two answers, the transfer phrase
    assert daemon_lines[3] == "daemon : Transferring you now."
    assert f" {DEMO_OPERATOR}': the operator has the call now" in text
    assert "The recogniser heard 3 of the caller's 4 lines (the others never reached the daemon)." in text
    assert "(fallback phrase)" not in text
    for turn in (2, 3):  # line 1, "Hmm.", reached nobody
        assert (tmp_path / "demo" / f"turn-{turn}.wav").stat().st_size > 1000
