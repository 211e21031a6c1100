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
