"""The rolling per-call history: what the LLM is sent."""

from ivr_daemon.conversation import ConversationHistory


def test_with_no_history_kept_the_question_is_still_sent():
    history = ConversationHistory("Be brief.", max_messages=0)
    assert history.ask("hello") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    history.add("assistant", "Hi.")
    assert history.ask("again") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "again"}]
    assert len(history) == 0


def test_the_oldest_messages_roll_off():
    history = ConversationHistory("Be brief.", max_messages=2)
    history.ask("one")
    history.add("assistant", "One.")
    assert [m["content"] for m in history.ask("two")] == ["Be brief.", "One.", "two"]
