"""SpeechTrack, by hand: what is fed when, where each piece of speech lands, when a segment counts as played, and
what an interruption drops."""

import numpy as np

from services.delivery.pacing import SpeechTrack


def test_speech_is_fed_in_order_with_silence_between_and_remembered_by_sample():
    track = SpeechTrack(1000)
    first = track.say(np.full(30, 7, np.int16))
    track.end_segment()
    assert list(track.take(10)) == [7] * 10
    assert list(track.take(30)) == [7] * 20 + [0] * 10          # the rest of the speech, then silence
    second = track.say(np.full(5, 9, np.int16), tag="item-2")
    track.end_segment()
    assert list(track.take(10)) == [9] * 5 + [0] * 5 and track.sent == 50
    assert (first.end, second.end) == (30, 45)
    assert [(lo, hi, seg.ident) for lo, hi, seg in track.speech_in(25, 50)] == [(25, 30, 0), (40, 45, 1)]
    assert track.ended_by(29) == [] and track.ended_by(30) == [first] and track.ended_by(100) == [second]
    assert track.ended_by(100) == [], "each end is reported once"
    track.forget_before(50)
    assert track.runs == []


def test_an_interruption_drops_what_was_not_fed_and_silences_what_was():
    track = SpeechTrack(1000)
    segment = track.say(np.full(100, 5, np.int16))
    track.take(20)
    assert track.clear() == 80 and segment.interrupted
    assert list(track.take(10)) == [0] * 10
    assert track.speech_in(0, 30) == [] and track.ended_by(1000) == []
    after = track.say(np.full(4, 3, np.int16))
    track.end_segment()
    assert not after.interrupted and list(track.take(4)) == [3] * 4
