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


def test_speech_in_another_voice_is_split_off_and_silence_follows_the_last_voice():
    track = SpeechTrack(1000, voice=2)
    assert [(voice, len(samples)) for voice, samples in track.take_voiced(5)] == [(2, 5)]   # before any speech
    track.say(np.full(4, 1, np.int16), tag="a", voice=0)
    track.say(np.full(3, 5, np.int16), tag="b", voice=1)
    track.end_segment()
    pieces = [(voice, list(samples)) for voice, samples in track.take_voiced(10)]
    assert pieces == [(0, [1] * 4), (1, [5] * 3 + [0] * 3)], "each voice its own speech; silence to the last one"
    assert track.voice == 1 and track.sent == 15
    assert [(lo, hi, segment.voice) for lo, hi, segment in track.speech_in(0, 15)] == [(5, 9, 0), (9, 12, 1)]
    track.say(np.full(2, 4, np.int16), tag="b", voice=0)       # the same tag in another voice: a new segment
    assert [(voice, list(samples)) for voice, samples in track.take_voiced(2)] == [(0, [4, 4])]


def test_chunk_ready_points_follow_the_engines_timeline():
    from services.delivery.avatar import chunk_ready_points

    ready = chunk_ready_points(fps=25, rate=24000, chunk_latent_frames=3, temporal_compression=4,
                               lookahead_latent_frames=2)
    per_frame = 24000 // 25
    # chunk 0 shows frames 0-8 and needs audio through frame 16; chunk 1 frames 9-20, through frame 28
    assert [ready(f * per_frame) // per_frame for f in (0, 8, 9, 20, 21)] == [17, 17, 29, 29, 41]


def test_chunk_ready_points_are_where_the_real_audio_stage_cuts_each_chunk():
    """Held to the engine itself: 1 ms short of each point the chunk is not cut yet, at the point it is (short by
    the front end's lookahead, the rest of a reply's chunk would wait for real time: up to a chunk late)."""
    import dataclasses

    from model_core.audio import AudioConfig
    from model_core.audio_stage import AudioStage
    from services.delivery.avatar import chunk_ready_points
    from tests.model_core.helpers import TINY, tiny_config

    dit, stream = tiny_config(), dataclasses.replace(TINY.stream, fps=25.0)
    stage = AudioStage(AudioConfig(), dit)
    ready = chunk_ready_points(stream.fps, 24000, stream.chunk_latent_frames, dit.temporal_compression,
                               dit.audio_lookahead_latent_frames, stage.frontend(stream.fps).lookahead_s)
    session, sent, cut = stage.open("s", stream, 1), 0, []
    for chunk in range(4):
        point = ready(sent)
        cut += stage.push(session, np.zeros(point - 24 - sent, np.int16), 24000)
        assert len(cut) == chunk, f"chunk {chunk} cut 1 ms before its point {point}: the point is late"
        cut += stage.push(session, np.zeros(24, np.int16), 24000)
        assert len(cut) == chunk + 1, f"chunk {chunk} not cut at its point {point}"
        sent = point


def test_speech_after_silence_runs_ahead_to_where_its_chunk_can_be_made_then_goes_at_real_time():
    import asyncio

    from services.delivery.avatar import pace

    class Link:
        async def send(self, message):
            pass

    async def main():
        loop = asyncio.get_running_loop()
        track = SpeechTrack(1000)
        pacer = asyncio.ensure_future(pace(track, Link(), loop.time(), 0.0,
                                           chunk_ready=lambda sample: (sample // 500 + 1) * 500 + 200))
        await asyncio.sleep(0.3)                      # 300 ms of listening: fed at real time
        before = track.sent
        track.say(np.full(300, 3, np.int16))          # a reply begins: 300 ms of it are here already
        await asyncio.sleep(0.05)
        burst = track.sent
        track.say(np.full(300, 3, np.int16))          # more arrives; the reply ends
        track.end_segment()
        await asyncio.sleep(0.05)
        ahead = track.sent
        await asyncio.sleep(0.6)
        waited = track.sent                           # silence is not fed until real time catches up
        await asyncio.sleep(0.6)
        caught_up = track.sent
        pacer.cancel()
        return before, burst, ahead, waited, caught_up, list(track.take(0))

    before, burst, ahead, waited, caught_up, _ = asyncio.run(main())
    assert 250 <= before <= 360
    assert before + 300 <= burst <= before + 330, "the speech there was fed at once (no silence after it)"
    assert 700 <= ahead <= 720, "then up to where the chunk showing the reply's start can be made, no further"
    assert waited <= 1060, "after the reply, silence is fed no further than real time (at ~1.0 s)"
    assert 1550 <= caught_up <= 1700, (ahead, waited, caught_up)


def test_the_voice_listens_between_its_speech_and_speaks_again_before_its_next():
    """The pacer sets the fed voice not speaking once only silence follows its speech, and speaking before the first
    sample of its next speech: the session shows a listening face (silence mode) between replies."""
    import asyncio

    from services.delivery.avatar import pace

    sent = []

    class Link:
        async def send(self, message):
            if message.HasField("control"):
                sent.append(("mode", [(s.character, s.speaking) for s in message.control.speaking]))
            else:
                samples = np.frombuffer(message.audio.pcm_s16le, np.int16)
                sent.append(("audio", int(samples.any()), int(samples[0] != 0) if len(samples) else 0))

    async def main():
        loop = asyncio.get_running_loop()
        track = SpeechTrack(1000)
        pacer = asyncio.ensure_future(pace(track, Link(), loop.time(), 0.0))
        await asyncio.sleep(0.15)                    # silence: it listens
        track.say(np.full(100, 3, np.int16))         # a reply
        track.end_segment()
        await asyncio.sleep(0.3)
        track.say(np.full(100, 3, np.int16))         # the next one
        await asyncio.sleep(0.3)
        pacer.cancel()

    asyncio.run(main())
    modes = [(index, states) for index, (kind, *states) in enumerate(sent) if kind == "mode"]
    assert [states[0] for _, states in modes] == [[(0, False)], [(0, True)], [(0, False)], [(0, True)], [(0, False)]]
    for index, states in modes:
        if states[0] == [(0, True)]:     # speaking again right before the audio that starts with the speech
            assert sent[index + 1][:3] == ("audio", 1, 1), sent[index - 1:index + 2]
        else:                            # listening only after audio that ended in silence
            assert sent[index - 1][0] == "audio"
    speech_sends = [index for index, item in enumerate(sent) if item[0] == "audio" and item[1]]
    for index in speech_sends:           # no speech is ever fed while the voice is set not speaking
        mode = [states for i, states in modes if i < index][-1]
        assert mode == [[(0, True)]], (index, mode)
