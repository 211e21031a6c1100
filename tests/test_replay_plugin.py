"""The installed pytest plugin: it patches nothing in a test process, and ``replay`` works as the README shows.

These run a plain pytest in a subprocess (``pytester``), in a directory with no conftest of this
project, so what they see is what any environment with ivr-daemon installed gets: the plugin
loaded through its ``pytest11`` entry point and nothing else.
"""

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def test_a_plain_pytest_run_is_not_monkey_patched(pytester):
    pytester.makepyfile("""
        from gevent import monkey

        def test_plugin_is_loaded_and_patches_nothing(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("ivr_daemon_replay")
            for module in ("socket", "threading", "ssl", "select", "time"):
                assert not monkey.is_module_patched(module), module
    """)
    # No "-p no:anyio": a plugin that patches nothing does not care what was imported first.
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)


def test_replay_works_the_documented_way_in_an_unpatched_process(pytester):
    one_question, history = FIXTURES / "one_question.esl", FIXTURES / "three_turns_history.esl"
    env_file = pytester.path / "replay.env"
    env_file.write_text("MAX_CONVERSATION_HISTORY=1\n")
    pytester.makepyfile(f"""
        import pytest
        from gevent import monkey

        def test_refund(replay):
            result = replay({str(one_question)!r})
            assert result.ok and result.sent
            assert all(s.line.startswith("api uuid_broadcast ") and s.call_uuid in s.line for s in result.sent)
            assert not monkey.is_module_patched("socket")

        def test_env_file_reaches_the_replayed_daemon(replay):
            assert replay({str(history)!r}).ok
            with pytest.raises(pytest.fail.Exception, match="the fixture expects history=2"):
                replay({str(history)!r}, env_file={str(env_file)!r})
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2)


def test_an_unreadable_fixture_fails_the_test_naming_file_and_line(pytester):
    bad = pytester.path / "bad.esl"
    bad.write_text("@fixture v1\n@nonsense\n")
    pytester.makepyfile(f"""
        def test_flow(replay):
            replay({str(bad)!r})
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*unreadable fixture: {bad}:2: unknown directive*"])
