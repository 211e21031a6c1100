"""The main job end to end, as `make demo` runs it: real LLM server, simulator, Piper, 3 utterances."""

import io

from ivr_daemon.demo import DEMO_UTTERANCES, run_demo


def test_the_demo_answers_each_of_the_three_utterances(tmp_path, smollm2_path):
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    (models / smollm2_path.name).symlink_to(smollm2_path)  # fetched once per session already
    out = io.StringIO()
    assert run_demo(cache_dir=tmp_path / "cache", out_dir=tmp_path / "demo", stream=out) == 0
    text = out.getvalue()
    assert [line for line in text.splitlines() if line.startswith("caller : ")] == [f"caller : {u}" for u in DEMO_UTTERANCES]
    assert len([line for line in text.splitlines() if line.startswith("daemon : ")]) == 3
    assert "(fallback phrase)" not in text
    for turn in (1, 2, 3):
        assert (tmp_path / "demo" / f"turn-{turn}.wav").stat().st_size > 1000
