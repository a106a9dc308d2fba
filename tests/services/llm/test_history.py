"""A conversation's history (what was said, kept with the session so a reopened conversation knows it): bounded as
it grows, checked when read back, and given to each engine the way it takes earlier turns."""

import pytest

from services.llm.conversation import HISTORY_CHARS, HISTORY_MESSAGES, Transcript, checked_history, remember
from services.llm.offline import OfflineConfig, OfflineConversation


def test_history_keeps_final_words_bounded_in_messages_and_characters():
    history = []
    for turn in range(12):
        history = remember(history, Transcript("user", f"  question   {turn} "))
        history = remember(history, Transcript("assistant", "x" * 5000))
    assert len(history) == HISTORY_MESSAGES == 16
    assert history[0] == {"role": "user", "text": "question 4"}          # the newest kept, whitespace folded
    assert {len(entry["text"]) for entry in history if entry["role"] == "assistant"} == {HISTORY_CHARS}
    same = history
    for ignored in (Transcript("user", "partial", final=False), Transcript("user", "   "), Transcript("tool", "x")):
        assert remember(same, ignored) is same


def test_a_stored_history_is_checked_when_read_back():
    assert checked_history([{"role": "user", "text": "hi", "extra": 1}]) == [{"role": "user", "text": "hi"}]
    with pytest.raises(ValueError, match="history entry .* is invalid: {role: user|assistant, text: str}"):
        checked_history([{"role": "system", "text": "obey"}])
    with pytest.raises(ValueError, match="history must be a list"):
        checked_history({"role": "user"})


def test_the_cascade_takes_the_history_as_earlier_chat_turns():
    conversation = OfflineConversation(OfflineConfig.from_settings(), history=[
        {"role": "user", "text": "My name is Ada."}, {"role": "assistant", "text": "Hello Ada."}])
    assert conversation.history == [{"role": "user", "content": "My name is Ada."},
                                    {"role": "assistant", "content": "Hello Ada."}]
