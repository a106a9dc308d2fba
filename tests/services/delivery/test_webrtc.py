"""The browser call's sender (`services.delivery.webrtc.AvatarMedia`): the voice is the clock — a frame goes out
when the voice has reached it, a late chunk stalls picture and sound together, a silent chunk still takes its time,
and the A/V offset it records stays within a frame."""

from __future__ import annotations

import numpy as np

from services.delivery.webrtc import AUDIO_RATE_HZ, AvatarMedia

FPS = 25
PER_FRAME = AUDIO_RATE_HZ // FPS            # 1920 samples of voice per frame
TICK = AUDIO_RATE_HZ // 50                  # the audio track's 20 ms frame


def chunk(media: AvatarMedia, first: int, count: int = 12, loud: bool = True) -> None:
    frames = [np.full((8, 8, 3), first + k, np.uint8) for k in range(count)]
    pcm = np.full(count * PER_FRAME, 1000 if loud else 0, np.int16)
    media.push_chunk(frames, pcm, AUDIO_RATE_HZ)


def play(media: AvatarMedia, seconds: float) -> list[int | None]:
    """Run both tracks' clocks for `seconds`: 20 ms of voice per tick, a video frame every 40 ms; returns the
    frame ids the video track sent (None: the last frame again)."""
    shown = []
    for tick in range(round(seconds * 50)):
        if tick % 2 == 0:
            frame = media.next_frame()
            shown.append(None if frame is None else int(frame.to_ndarray(format="rgb24")[0, 0, 0]))
        media.next_audio(TICK)
    return shown


def test_frames_follow_the_voice_and_a_late_chunk_stalls_both():
    media = AvatarMedia(FPS, 8, 8)
    chunk(media, 0)
    shown = play(media, 0.48)                          # exactly one chunk of voice
    assert shown == list(range(12))
    shown = play(media, 0.4)                           # the next chunk is late: silence, the picture holds
    assert shown == [None] * 10 and media.played == 12 * PER_FRAME
    chunk(media, 100)
    assert play(media, 0.48) == list(range(100, 112)), "it resumes in step with its voice"
    assert media.offsets_ms and max(abs(o) for o in media.offsets_ms) < 1000 / FPS


def test_a_silent_chunk_takes_its_time_and_a_hang_up_drops_what_was_not_sent():
    media = AvatarMedia(FPS, 8, 8)
    media.push_chunk([np.zeros((8, 8, 3), np.uint8)] * 12, np.zeros(0, np.int16), AUDIO_RATE_HZ)
    assert media.written == 12 * PER_FRAME, "no audio: the chunk still spans its frames' time"
    chunk(media, 50)
    assert sum(f is not None for f in play(media, 0.48)) == 12 and media.frames
    media.clear()
    assert not media.frames and not media.audio and not np.any(media.next_audio(TICK))


def test_audio_at_another_rate_is_resampled_to_the_tracks_rate():
    media = AvatarMedia(FPS, 8, 8)
    media.push_chunk([np.zeros((8, 8, 3), np.uint8)] * 12, np.full(24000 * 12 // FPS, 500, np.int16), 24000)
    assert abs(media.written - 12 * PER_FRAME) <= 960      # 24 kHz -> 48 kHz (the resampler holds ~10 ms back)


def test_the_video_shows_the_still_until_the_first_chunk_then_the_avatar():
    """The real aiortc video track: before any chunk it sends the still picture it was given (the reference image,
    not a black frame); once the voice reaches a chunk's first frame, that frame. A still of another size is
    refused by name."""
    import asyncio

    import pytest

    from services.delivery.webrtc import _tracks

    still = np.full((8, 8, 3), 77, np.uint8)
    media = AvatarMedia(FPS, 8, 8, still)
    video, _ = _tracks()

    async def main():
        track = video(media)
        before = [(await track.recv()).to_ndarray(format="rgb24") for _ in range(3)]
        chunk(media, 5)                                  # its first frame is due at once (the voice's position 0)
        return before, (await track.recv()).to_ndarray(format="rgb24")

    before, after = asyncio.run(main())
    assert all(np.array_equal(frame, still) for frame in before), "the still, not black, before the first chunk"
    assert int(after[0, 0, 0]) == 5, "then the avatar's first frame"
    assert not np.any(AvatarMedia(FPS, 8, 8).still), "black when no still is given"
    with pytest.raises(ValueError, match=r"still: \(4, 4, 3\) is not the stream's \[8, 8, 3\]"):
        AvatarMedia(FPS, 8, 8, np.zeros((4, 4, 3), np.uint8))
